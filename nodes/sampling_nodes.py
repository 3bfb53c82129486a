"""Delayed-LoRA Sampler and Slider Sweep: sliders as weight wrappers whose α follows the sampling step."""

from __future__ import annotations

from ..sliders_core.config import parse_numbers
from ..sliders_core.inference import grid_image
from .apply_nodes import ALPHA_INPUT
from .common import CATEGORY, SLIDER, SliderFile, check_alpha, pil_to_image


def _sampler_inputs() -> dict:
    import comfy.samplers

    return {
        "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip": "Noise seed."}),
        "steps": ("INT", {"default": 30, "min": 1, "max": 10000, "tooltip": "Sampling steps."}),
        "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": "Classifier-free guidance."}),
        "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"tooltip": "Any sampler, ancestral and SDE included."}),
        "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"tooltip": "Sigma schedule."}),
        "positive": ("CONDITIONING", {"tooltip": "Positive conditioning."}),
        "negative": ("CONDITIONING", {"tooltip": "Negative conditioning."}),
        "latent_image": ("LATENT", {"tooltip": "The latent to denoise (e.g. Empty Latent Image)."}),
    }


def scheduled_patcher(model, slider: SliderFile):
    """A MODEL clone carrying the slider as weight wrappers plus a unet wrapper that sets α per step.

    Returns (patcher, set_schedule): set_schedule(list of α per step) before each sampling run.
    One pass with per-step weights is exact for ancestral and SDE samplers too, unlike a two-KSampler split.
    """
    from .comfy_backend import ComfySliderHost, module_names, step_of

    weights = slider.resolve(model)
    patcher = model.clone()
    host = ComfySliderHost(patcher, module_names(patcher))
    host.add("slider", weights)
    schedule: list[float] = []
    previous = patcher.model_options.get("model_function_wrapper")

    def unet_wrapper(apply_model, args):
        sigmas = args["c"].get("transformer_options", {}).get("sample_sigmas")
        step = step_of(args["timestep"], sigmas) if sigmas is not None else 0
        alpha = schedule[min(step, len(schedule) - 1)]
        host.set_scales({"slider": alpha} if alpha != 0.0 else {})
        if previous is not None:
            return previous(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    patcher.set_model_unet_function_wrapper(unet_wrapper)

    def set_schedule(alphas: list[float]) -> None:
        schedule[:] = alphas

    return patcher, set_schedule


def delayed_schedule(alpha: float, start_step: int, steps: int, alpha_schedule: str = "") -> list[float]:
    if alpha_schedule.strip():
        values = [check_alpha(a) for a in parse_numbers(alpha_schedule, "alpha_schedule")]
        if len(values) != steps:
            raise ValueError(f"alpha_schedule has {len(values)} values for {steps} steps; give one per step")
        return values
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step {start_step} is beyond the step count {steps} (use 0..{steps})")
    return [0.0] * start_step + [check_alpha(alpha)] * (steps - start_step)


class DelayedLoraSampler:
    DESCRIPTION = ("KSampler that runs the base model for the first steps (fixing the layout) and switches the "
                   "slider on from start_step, in one pass, so it is exact for ancestral and SDE samplers too. "
                   "start_step 0 = plain application; start_step = steps = base model.")
    CATEGORY = f"{CATEGORY}/sampling"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised latent.",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        required = {"model": ("MODEL", {"tooltip": "The base model (without the slider applied)."}),
                    "slider": (SLIDER, {"tooltip": "The slider to switch on."}),
                    "alpha": ALPHA_INPUT,
                    "start_step": ("INT", {"default": 6, "min": 0, "max": 10000, "tooltip":
                                   "Step at which the slider switches on (reference: 20 % of the steps for SD1, "
                                   "30 % for SDXL, 50 % for real-image edits)."})}
        required.update(_sampler_inputs())
        required["denoise"] = ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                         "tooltip": "Denoising strength."})
        return {"required": required, "optional": {
            "alpha_schedule": ("STRING", {"default": "", "tooltip":
                               "Optional α per step, comma-separated (one value per step); overrides alpha and "
                               "start_step."})}}

    def sample(self, model, slider, alpha, start_step, seed, steps, cfg, sampler_name, scheduler, positive,
               negative, latent_image, denoise, alpha_schedule=""):
        import nodes

        schedule = delayed_schedule(alpha, start_step, steps, alpha_schedule)
        patcher, set_schedule = scheduled_patcher(model, slider)
        set_schedule(schedule)
        return nodes.common_ksampler(patcher, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                     latent_image, denoise=denoise)


class SliderSweep:
    DESCRIPTION = ("Renders the same seed once per α and returns a labelled grid (one column per α): the quickest "
                   "way to see what a slider does.")
    CATEGORY = f"{CATEGORY}/sampling"
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The α-sweep grid.",)
    FUNCTION = "sweep"

    @classmethod
    def INPUT_TYPES(cls):
        required = {"model": ("MODEL", {"tooltip": "The base model."}),
                    "slider": (SLIDER, {"tooltip": "The slider to sweep."}),
                    "vae": ("VAE", {"tooltip": "Decodes each latent."}),
                    "alphas": ("STRING", {"default": "-2, -1, 0, 1, 2", "tooltip": "Comma-separated strengths."}),
                    "start_step": ("INT", {"default": 0, "min": 0, "max": 10000,
                                   "tooltip": "Delayed LoRA: step at which the slider switches on."})}
        required.update(_sampler_inputs())
        return {"required": required, "hidden": {"unique_id": "UNIQUE_ID"}}

    def sweep(self, model, slider, vae, alphas, start_step, seed, steps, cfg, sampler_name, scheduler, positive,
              negative, latent_image, unique_id=None):
        import comfy.model_management
        import comfy.utils

        from .comfy_backend import ksample, show_text

        values = [check_alpha(a) for a in parse_numbers(alphas, "alphas")]
        if not values:
            raise ValueError("alphas is empty: give comma-separated strengths such as -2, -1, 0, 1, 2")
        patcher, set_schedule = scheduled_patcher(model, slider)
        progress = comfy.utils.ProgressBar(steps * len(values))  # one bar over the whole sweep
        columns = []
        for k, alpha in enumerate(values):
            comfy.model_management.throw_exception_if_processing_interrupted()
            show_text(unique_id, f"α = {alpha:g} ({k + 1} of {len(values)})")
            set_schedule(delayed_schedule(alpha, start_step, steps))
            latent = ksample(patcher, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                             progress=progress, offset=k * steps)
            columns.append(vae.decode(latent["samples"]).float().cpu())
        side = columns[0].shape[2]
        grid = grid_image(columns, [f"alpha={a:g}" for a in values], cell=max(128, min(512, side)))
        return (pil_to_image(grid),)
