"""Train Text Slider (eq. 8, sliders_core.text_slider) and Train Pair Slider (sliders_core.pair_slider), on the
MODEL, CLIP and VAE the graph loaded."""

from __future__ import annotations

import logging
import math
import time

import torch

from ..sliders_core.config import (
    CONTRASTS,
    LAYER_PRESETS,
    TRAINED_SIGNS,
    PairTrainConfig,
    TrainConfig,
    layer_presets_help,
    parse_numbers,
)
from ..sliders_core.formats import load_slider, safe_output_path
from ..sliders_core.image_pairs import pairs_from_batches, prompts_per_pair
from ..sliders_core.inference import alpha_strip
from ..sliders_core.pair_slider import train_pair_slider
from ..sliders_core.plots import loss_plot
from ..sliders_core.prompts import ACTIONS, pair_from_dict
from ..sliders_core.text_slider import train_text_slider
from .common import CATEGORY, SLIDER, SliderFile, lora_files, lora_path, pil_to_image, sliders_dir

NO_RESUME = "none"
NATIVE = 0  # the resolution widget's "the model's own size"
PREVIEW_STEPS = 15  # sampling steps of each live-preview image
ESTIMATE_AFTER = 5  # steps timed before the run's cost is told
log = logging.getLogger(__name__)


OPTIONAL_TRAINING_INPUTS = {
    "gradient_checkpointing": ("BOOLEAN", {"default": False, "tooltip":
                               "Recompute activations during backward: less memory, slower."}),
    "preview_every": ("INT", {"default": 50, "min": 0, "max": 100000, "tooltip":
                      "Every N steps, show the prompt at α = −1 / 0 / +1 on this node (one noise, "
                      f"{PREVIEW_STEPS} steps each: 3 small samplings). 0: no preview."}),
}
HIDDEN_INPUTS = {"unique_id": "UNIQUE_ID"}


class TrainingNode:
    """What both training nodes show the graph: where they sit and what they output."""

    CATEGORY = f"{CATEGORY}/train"
    RETURN_TYPES = (SLIDER, "IMAGE", "STRING")
    RETURN_NAMES = ("slider", "loss_plot", "report")
    OUTPUT_TOOLTIPS = ("The trained slider.", "The training loss curve.",
                       "Steps, time, loss and (text sliders) how much of its training target the slider delivers "
                       "at α = 1, with a warning when it has almost no effect.")
    FUNCTION = "train"


def training_inputs(iterations: int, slider_name: str, resolution_tooltip: str) -> dict:
    """The LoRA and run inputs both training nodes share, in the order their widgets appear."""
    return {
        "rank": ("INT", {"default": 4, "min": 1, "max": 128, "tooltip": "LoRA rank."}),
        "alpha": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 128.0, "step": 0.5,
                  "tooltip": "LoRA alpha; the scale is alpha / rank."}),
        "layers": (list(LAYER_PRESETS), {"default": "auto", "tooltip":
                   "Which layers carry the slider. auto: the official default for the model, noxattn on SD1.x/SD2/"
                   "SDXL (self-attention, resnets and sampler convs), dit-attn on Flux and SD3 (joint attention "
                   "only, as the reference trains Flux). The official sliders' training methods select exactly "
                   "their layers. " + layer_presets_help()}),
        "iterations": ("INT", {"default": iterations, "min": 1, "max": 100000, "tooltip": "Training steps."}),
        "lr": ("FLOAT", {"default": 2e-4, "min": 1e-6, "max": 0.1, "step": 1e-5, "tooltip": "AdamW learning rate."}),
        "resolution": ("INT", {"default": NATIVE, "min": 0, "max": 2048, "step": 8, "tooltip":
                       resolution_tooltip + " 0: the model's own size (512 SD1.x, 768 SD2, 1024 SDXL, Flux and SD3, 32 shapes)."}),
        "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "control_after_generate": "fixed",
                 "tooltip": "Same seed, same slider."}),
        "slider_name": ("STRING", {"default": slider_name, "tooltip":
                        "File name in models/loras/sliders (no folders, no '..')."}),
        "save_every": ("INT", {"default": 0, "min": 0, "max": 100000,
                       "tooltip": "Write a checkpoint every N steps (0: only at the end)."}),
        "resume_from": ([NO_RESUME, *lora_files()], {"tooltip": "Continue training a slider saved earlier."}),
    }


class TrainTextSlider(TrainingNode):
    DESCRIPTION = ("Trains a text concept slider (Concept Sliders eq. 8) on the loaded model: the slider learns to "
                   "move from the negative towards the positive prompt while the preservation attributes stay put. "
                   "Saves models/loras/sliders/<slider_name>.safetensors, loadable by the stock LoraLoader.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The base model (SD1.x, SD2, SDXL or the shapes model) the slider is "
                                "trained for."}),
            "clip": ("CLIP", {"tooltip": "The model's text encoder."}),
            "target": ("STRING", {"default": "a photo of a person", "tooltip":
                       "c_t: the prompts the slider will edit; training images come from it."}),
            "positive": ("STRING", {"default": "a photo of a person, old", "tooltip": "c+: more of the concept."}),
            "negative": ("STRING", {"default": "a photo of a person, young", "tooltip": "c-: less of the concept."}),
            "preservation": ("STRING", {"default": "male\nfemale", "multiline": True, "tooltip":
                             "Attributes to hold fixed, one per line (all in every step, their pushes averaged). Use {p} in the "
                             "positive/negative prompts to place them; otherwise they are appended."}),
            "action": (list(ACTIONS), {"tooltip": "enhance: towards the positive prompt; erase: away from it."}),
            "eta": ("FLOAT", {"default": 2.0, "min": 0.01, "max": 50.0, "step": 0.1, "tooltip":
                    "η, the training target's strength (reference: 1–4), on the push averaged over the "
                    "preservation attributes. On the shapes model η 1 leaks least (README → Disentanglement)."}),
            **training_inputs(iterations=500, slider_name="my_slider",
                              resolution_tooltip="Training image size."),
        }, "optional": {**OPTIONAL_TRAINING_INPUTS, "signs": (list(TRAINED_SIGNS), {"default": "plus", "tooltip":
                        "plus: train the slider at α = +1 (the paper; −1 is extrapolated). both: every other step "
                        "trains α = −1 towards the negative end too, at no extra cost; on the shapes size slider "
                        "it keeps the shape at α −2. separate: the same steps on a two-ended slider, one LoRA per "
                        "end in one file (each end gets half the iterations; α < 0 applies the negative end's), for "
                        "concepts whose two ends one LoRA cannot both follow (README → Disentanglement)."}),
            "contrast": (list(CONTRASTS), {"default": "pair", "tooltip":
                         "pair: push positive against negative (eq. 8). ends: each sign pushes toward its own end "
                         "against the target prompt, so α +1 and −1 can differ (with signs = plus: the positive end "
                         "alone)."}),
            "project_preservation": ("BOOLEAN", {"default": False, "tooltip":
                                     "Remove from the push whatever moves a preservation attribute (its own "
                                     "direction in the model's prediction), not just average it out: on the shapes "
                                     "colour slider, red stops making shapes larger (README → Disentanglement)."}),
            "negative_eta": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 50.0, "step": 0.1, "tooltip":
                             "η of the α = −1 steps (signs both or separate): the negative end's own strength. "
                             "0: the same as eta. On the shapes colour slider the blue end wants 3 where the red "
                             "end wants 2 (README → Disentanglement)."}),
            "trajectory_slider": ("BOOLEAN", {"default": False, "tooltip":
                                  "Draw the training states with the slider on (at the sign each step trains), as "
                                  "the reference's loop does, so the slider learns on the pictures it makes: with "
                                  "contrast = ends it keeps the shapes colour slider's blue end from growing the "
                                  "circles (README → Disentanglement)."})},
            "hidden": HIDDEN_INPUTS}

    def train(self, model, clip, target, positive, negative, preservation, action, eta, rank, alpha, layers,
              iterations, lr, resolution, seed, slider_name, save_every, resume_from, gradient_checkpointing=False,
              preview_every=0, signs="plus", contrast="pair", project_preservation=False, negative_eta=0.0,
              trajectory_slider=False, unique_id=None):
        pair = pair_from_dict({"target": target, "positive": positive, "unconditional": negative,
                               "action": action, "guidance_scale": eta, "preservation": preservation})
        config = TrainConfig(rank=rank, alpha=alpha, lr=lr, iterations=iterations, eta=eta,
                             resolution=resolution or None,
                             layers=layers, seed=seed, save_every=save_every,
                             gradient_checkpointing=gradient_checkpointing, signs=signs, contrast=contrast,
                             project_preservation=project_preservation, trajectory_slider=trajectory_slider,
                             negative_eta=negative_eta or None)
        config.validate()

        def run(denoiser, resume, out, on_step):
            return train_text_slider(denoiser, [pair], config, name="slider", resume=resume,
                                     checkpoint_path=out, callback=on_step, progress=False)

        return train_in_graph(run, model, clip, None, slider_name, resume_from, iterations,
                              preview=LivePreview(target, preview_every, resolution), node_id=unique_id)


class TrainPairSlider(TrainingNode):
    DESCRIPTION = ("Trains a visual slider from image pairs (Concept Sliders §3.3): at −strength the slider "
                   "denoises towards image A, at +strength towards image B, so it learns only what differs "
                   "between them. For concepts words cannot say. Saves models/loras/sliders/<slider_name>.safetensors.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The base model (SD1.x, SD2, SDXL or the shapes model) the slider is "
                                "trained for."}),
            "clip": ("CLIP", {"tooltip": "The model's text encoder (encodes the prompt, empty by default)."}),
            "vae": ("VAE", {"tooltip": "The model's VAE: the pairs are trained on as latents."}),
            "images_a": ("IMAGE", {"tooltip": "A: less of the concept. One image per pair, in the order of B."}),
            "images_b": ("IMAGE", {"tooltip": "B: more of the concept, the same subjects in the same order as A."}),
            "prompt": ("STRING", {"default": "", "multiline": True, "tooltip":
                                  "One line: the text condition of every pair (empty is the reference's default). "
                                  "One line per pair: each pair's caption, in order, describing all it shows but "
                                  "the concept (connect Load Image Pairs' captions). Captions carry the slider to "
                                  "your prompts better than the empty prompt."}),
            "strengths": ("STRING", {"default": "1", "tooltip": "The strength s each pair trains at (A at −s, B at +s): "
                                     "one number for all, or one per pair (Load Image Pairs gives them)."}),
            **training_inputs(iterations=1000, slider_name="my_pair_slider", resolution_tooltip=
                              "Training size: pairs of another size are resized and centre-cropped (A and B alike)."),
        }, "optional": OPTIONAL_TRAINING_INPUTS, "hidden": HIDDEN_INPUTS}

    def train(self, model, clip, vae, images_a, images_b, prompt, strengths, rank, alpha, layers, iterations, lr,
              resolution, seed, slider_name, save_every, resume_from, gradient_checkpointing=False,
              preview_every=0, unique_id=None):
        from .comfy_backend import native_resolution

        config = PairTrainConfig(rank=rank, alpha=alpha, lr=lr, iterations=iterations, layers=layers, seed=seed,
                                 save_every=save_every, gradient_checkpointing=gradient_checkpointing)
        config.validate()
        resolution = resolution or native_resolution(model)
        shared_prompt, captions = prompts_per_pair(prompt, images_a.shape[0])
        pairs = pairs_from_batches(images_a, images_b, resolution, parse_numbers(strengths, "strengths") or [1.0],
                                   prompts=captions)

        def run(denoiser, resume, out, on_step):
            return train_pair_slider(denoiser, pairs, config, prompt=shared_prompt, name="slider", resume=resume,
                                     checkpoint_path=out, callback=on_step, progress=False)

        preview_prompt = captions[0] if captions else shared_prompt  # the preview shows the first pair's caption
        return train_in_graph(run, model, clip, vae, slider_name, resume_from, iterations,
                              preview=LivePreview(preview_prompt, preview_every, resolution), node_id=unique_id)


class LivePreview:
    """Every `every` steps, the prompt at α = −1 / 0 / +1 from one fixed noise, as the node's progress preview."""

    def __init__(self, prompt: str, every: int, resolution: int):
        self.prompt, self.every, self.resolution = prompt, every, resolution
        self.noise = self.conds = None

    def due(self, step: int, total: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == total)

    def image(self, denoiser):
        from .comfy_backend import preview_image

        if self.conds is None:
            self.conds = denoiser.encode([self.prompt]), denoiser.encode([""])
            self.noise = denoiser.initial_noise(1, self.resolution or denoiser.default_resolution,
                                                torch.Generator().manual_seed(0))
        strip = alpha_strip(denoiser, *self.conds, "slider", self.noise, steps=PREVIEW_STEPS)
        return preview_image(denoiser.patcher, strip)


def train_in_graph(run, model, clip, vae, slider_name: str, resume_from: str, iterations: int, *,
                   preview: LivePreview | None = None, node_id=None):
    """What both training nodes share: the output file, progress, cancel and live preview, what the run
    costs, inference mode off, and a cancelled run leaving no new file (an earlier slider of that name
    stays as it was)."""
    import comfy.model_management
    import comfy.utils

    from .comfy_backend import ComfyDenoiser, runs_on_cpu, show_text

    out = safe_output_path(sliders_dir(), slider_name)
    previous = out.read_bytes() if out.exists() else None
    progress = comfy.utils.ProgressBar(iterations)
    clock = {"start": time.perf_counter(), "first_step": None}

    def on_step(step: int, total: int, loss: float) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()  # the UI's cancel
        if math.isnan(loss):  # a model call inside a step (frozen sampling): progress and cancel only
            progress.update_absolute(step, total)
            return
        if clock["first_step"] is None:
            clock["first_step"] = step - 1
        done = step - clock["first_step"]
        per_step = (time.perf_counter() - clock["start"]) / max(done, 1)
        left = f"about {_duration(per_step * (total - step))} left"
        show_text(node_id, f"step {step}/{total} · loss {loss:.4g} · {per_step:.2f} s/step · {left}")
        if done == ESTIMATE_AFTER and runs_on_cpu():
            log.warning("Concept Sliders: training on CPU at %.2f s/step; %d steps take about %s. A GPU is "
                        "many times faster; on CPU try fewer iterations or the shapes model first.",
                        per_step, total, _duration(per_step * total))
        image = preview.image(denoiser) if preview is not None and preview.due(step, total) else None
        progress.update_absolute(step, total, image)

    with torch.inference_mode(False):  # ComfyUI runs nodes under inference mode
        denoiser = ComfyDenoiser(model, clip, vae)
        resume = None
        if resume_from != NO_RESUME:
            resume = load_slider(lora_path(resume_from), denoiser.naming, denoiser.family)
        try:
            result = run(denoiser, resume, out, on_step)
        except comfy.model_management.InterruptProcessingException:
            if previous is None:
                out.unlink(missing_ok=True)
            elif out.read_bytes() != previous:
                restore = out.with_name(f".{out.name}.restore")
                restore.write_bytes(previous)
                restore.replace(out)
            raise
    report = result.report()
    return {"ui": {"text": [report]},
            "result": (SliderFile.from_weights(result.weights, out.stem), pil_to_image(loss_plot(result.losses)), report)}


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"
