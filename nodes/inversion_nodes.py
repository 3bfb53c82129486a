"""Null-Text Invert, Inversion Sampler, Save / Load Inversion: edit real photos with sliders
(sliders_core.inversion on the graph's MODEL; sampling through the host's guider)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..sliders_core.errors import SliderError
from ..sliders_core.formats import safe_output_path
from ..sliders_core.inversion import METHODS, Inversion, InversionConfig, invert, load_inversion, psnr, save_inversion
from .apply_nodes import ALPHA_INPUT
from .common import CATEGORY, SLIDER

INVERSION = "INVERSION"  # a sliders_core.inversion.Inversion
INVERSIONS_SUBFOLDER = "inversions"


def inversions_dir() -> Path:
    import folder_paths

    return Path(folder_paths.get_output_directory()) / INVERSIONS_SUBFOLDER


def inversion_files() -> list[str]:
    folder = inversions_dir()
    return sorted(p.name for p in folder.glob("*.safetensors")) if folder.is_dir() else []


def _check_fits(model, inversion: Inversion) -> None:
    """Refuse a MODEL the inversion was not made for (family, checkpoint, the schedule it names)."""
    from .comfy_backend import ComfyDenoiser

    denoiser = ComfyDenoiser(model)
    denoiser.ddim_scheduler = inversion.scheduler or denoiser.ddim_scheduler
    inversion.check_fits(denoiser)


def _sample(model, inversion: Inversion, slider=None, alpha: float = 0.0, start_at: float = 0.5):
    """LATENT samples of the inversion on `model`, with `slider` at α from `start_at` of the steps."""
    import comfy.utils

    from .comfy_backend import sample_inversion_in_host
    from .sampling_nodes import delayed_schedule, scheduled_patcher

    _check_fits(model, inversion)
    if not 0.0 <= start_at <= 1.0:
        raise SliderError(f"start_at must be a fraction in [0, 1], got {start_at}")
    patcher = model
    if slider is not None:
        patcher, set_schedule = scheduled_patcher(model, slider)
        set_schedule(delayed_schedule(alpha, round(start_at * inversion.steps), inversion.steps))
    progress = comfy.utils.ProgressBar(inversion.steps)
    return sample_inversion_in_host(patcher, inversion, callback=lambda i, *_: progress.update_absolute(i + 1))


class NullTextInvert:
    DESCRIPTION = ("Inverts a photo into the model so sliders can edit it: DDIM inversion under the source prompt, "
                   "then null-text optimisation (Mokady et al.) so that sampling at your guidance reproduces the "
                   "photo. negative-prompt is much faster and less faithful at high guidance; ddim (the empty "
                   "prompt) is the unoptimised baseline. Outputs the inversion, its reconstruction and PSNR.")
    CATEGORY = f"{CATEGORY}/inversion"
    RETURN_TYPES = (INVERSION, "IMAGE", "FLOAT", "STRING")
    RETURN_NAMES = ("inversion", "reconstruction", "psnr", "report")
    OUTPUT_TOOLTIPS = ("The inverted photo: feed it to Inversion Sampler (or Save Inversion).",
                       "The photo sampled back from the inversion with no slider: how faithful it is.",
                       "Reconstruction PSNR in dB against the input photo (30+ is hard to tell apart).",
                       "A one-line summary: PSNR, the VAE's own limit, time and model calls.")
    FUNCTION = "invert"

    @classmethod
    def INPUT_TYPES(cls):
        import comfy.samplers

        defaults = InversionConfig()
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model you will edit with (inversions are tied to it)."}),
            "vae": ("VAE", {"tooltip": "The model's VAE."}),
            "image": ("IMAGE", {"tooltip": "The photo(s); width and height must be multiples of 8 (64 is safest)."}),
            "source_prompt": ("STRING", {"default": "a photo of a person", "multiline": True, "tooltip":
                              "A caption of the photo; encoded with the CLIP input (ignored when a "
                              "conditioning is connected)."}),
            "steps": ("INT", {"default": defaults.steps, "min": 2, "max": 1000, "tooltip":
                      "Sampling steps; edits of this inversion use the same count."}),
            "cfg": ("FLOAT", {"default": defaults.guidance, "min": 1.0, "max": 30.0, "step": 0.1, "tooltip":
                    "The guidance the edits will sample at (reference 7.5)."}),
            "method": (list(METHODS), {"default": defaults.method, "tooltip":
                       "null-text: faithful, about 10 model calls per step; negative-prompt: one call per step; "
                       "ddim: the empty prompt, no optimisation (the baseline)."}),
            "inner_iterations": ("INT", {"default": defaults.inner_iterations, "min": 0, "max": 100, "tooltip":
                                 "null-text: at most this many optimiser steps per sampling step (stops early "
                                 "once converged)."}),
            "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"default": "normal", "tooltip":
                          "Sigma schedule of the deterministic (Euler = DDIM) sampler the inversion is made for."}),
        }, "optional": {
            "clip": ("CLIP", {"tooltip": "Encodes source_prompt and the empty prompt null-text starts from."}),
            "conditioning": ("CONDITIONING", {"tooltip": "The source prompt already encoded (instead of CLIP); "
                             "null-text then starts from its zeroed copy."}),
        }}

    def invert(self, model, vae, image, source_prompt, steps, cfg, method, inner_iterations, scheduler, clip=None,
               conditioning=None):
        import comfy.model_management
        import comfy.utils

        from .comfy_backend import ComfyDenoiser, cond_from_conditioning

        if clip is None and conditioning is None:
            raise SliderError("connect a CLIP (to encode source_prompt) or a CONDITIONING for the photo")
        if image.shape[1] % 8 or image.shape[2] % 8:
            raise SliderError(f"the photo is {image.shape[2]}×{image.shape[1]}: width and height must be multiples "
                              "of 8 (resize or crop it first, e.g. with Upscale Image)")
        config = InversionConfig(steps=steps, guidance=cfg, method=method, inner_iterations=inner_iterations)
        config.validate()
        progress = comfy.utils.ProgressBar(steps)

        def on_call(step: int, iteration: int, loss: float) -> None:
            progress.update_absolute(step + 1, steps)
            comfy.model_management.throw_exception_if_processing_interrupted()  # the UI's cancel, per model call

        with torch.inference_mode(False):  # gradients w.r.t. the unconditional embeddings
            denoiser = ComfyDenoiser(model, clip, vae)
            denoiser.ddim_scheduler = scheduler
            cond = cond_from_conditioning(conditioning) if conditioning is not None else None
            empty = None
            if cond is not None and clip is None:
                empty = type(cond)({k: torch.zeros_like(v) for k, v in cond.tensors.items()})
            inversion = invert(denoiser, image[..., :3].clone(), source_prompt, config, cond=cond, empty=empty,
                               callback=on_call)
        latent = _sample(model, inversion)
        reconstruction = vae.decode(latent).float().cpu()
        photo = image[..., :3].float().cpu()
        vae_limit = psnr(vae.decode(vae.encode(photo)).float().cpu(), photo)
        score = psnr(reconstruction, photo)
        report = (f"{method}: reconstruction PSNR {score:.2f} dB (the VAE alone: {vae_limit:.2f} dB); "
                  f"{inversion.report['seconds']:.1f} s, {inversion.report['forwards']} model calls, "
                  f"{inversion.report.get('backward_passes', 0)} backward passes for {steps} steps")
        return {"ui": {"text": [report]}, "result": (inversion, reconstruction, score, report)}


class InversionSampler:
    DESCRIPTION = ("Samples an inverted photo back with a slider switched on from start_at (delayed LoRA, as the "
                   "paper edits real images: half-way). alpha 0 or no slider gives the reconstruction exactly. "
                   "Steps, guidance and schedule come from the inversion.")
    CATEGORY = f"{CATEGORY}/inversion"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The edited photo as a latent (VAE Decode it).",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model the photo was inverted on (other sliders applied to it stay "
                                "on from the first step)."}),
            "inversion": (INVERSION, {"tooltip": "From Null-Text Invert or Load Inversion."}),
            "alpha": ALPHA_INPUT,
            "start_at": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip":
                         "Fraction of the steps sampled without the slider, keeping the photo's layout "
                         "(reference: 0.5; lower edits more)."}),
        }, "optional": {"slider": (SLIDER, {"tooltip": "The slider to switch on; none: the reconstruction."})}}

    def sample(self, model, inversion, alpha, start_at, slider=None):
        return ({"samples": _sample(model, inversion, slider, alpha, start_at)},)


class SaveInversion:
    DESCRIPTION = "Saves an inversion to output/inversions/<name>.safetensors, so a photo is inverted once."
    CATEGORY = f"{CATEGORY}/inversion"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "inversion": (INVERSION, {"tooltip": "From Null-Text Invert."}),
            "name": ("STRING", {"default": "photo", "tooltip": "File name (no folders, no '..')."}),
        }}

    def save(self, inversion, name):
        path = save_inversion(inversion, safe_output_path(inversions_dir(), name))
        return {"ui": {"text": [f"saved {path.name}"]}}


class LoadInversion:
    DESCRIPTION = "Loads an inversion saved by Save Inversion (output/inversions)."
    CATEGORY = f"{CATEGORY}/inversion"
    RETURN_TYPES = (INVERSION,)
    OUTPUT_TOOLTIPS = ("The inversion, for Inversion Sampler.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"name": (inversion_files(), {"tooltip": "A file in output/inversions."})}}

    @classmethod
    def IS_CHANGED(cls, name):
        path = cls._path(name)
        return path.stat().st_mtime_ns if path.is_file() else ""

    @staticmethod
    def _path(name: str) -> Path:
        return safe_output_path(inversions_dir(), name)

    def load(self, name):
        return (load_inversion(self._path(name)),)
