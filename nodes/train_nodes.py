"""Train Text Slider: eq. 8 training (sliders_core.text_slider) on the MODEL and CLIP the graph loaded."""

from __future__ import annotations

import torch

from ..sliders_core.config import LAYER_PRESETS, TrainConfig
from ..sliders_core.formats import load_slider, safe_output_path
from ..sliders_core.plots import loss_plot
from ..sliders_core.prompts import ACTIONS, pair_from_dict
from ..sliders_core.text_slider import train_text_slider
from .common import CATEGORY, SLIDER, SliderFile, lora_files, lora_path, pil_to_image, sliders_dir

NO_RESUME = "none"


class TrainTextSlider:
    DESCRIPTION = ("Trains a text concept slider (Concept Sliders eq. 8) on the loaded model: the slider learns to "
                   "move from the negative towards the positive prompt while the preservation attributes stay put. "
                   "Saves models/loras/sliders/<slider_name>.safetensors, loadable by the stock LoraLoader.")
    CATEGORY = f"{CATEGORY}/train"
    RETURN_TYPES = (SLIDER, "IMAGE")
    RETURN_NAMES = ("slider", "loss_plot")
    OUTPUT_TOOLTIPS = ("The trained slider.", "The training loss curve.")
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The base model (SD1.x, SD2 or SDXL) the slider is trained for."}),
            "clip": ("CLIP", {"tooltip": "The model's text encoder."}),
            "target": ("STRING", {"default": "a photo of a person", "tooltip":
                       "c_t: the prompts the slider will edit; training images come from it."}),
            "positive": ("STRING", {"default": "a photo of a person, old", "tooltip": "c+: more of the concept."}),
            "negative": ("STRING", {"default": "a photo of a person, young", "tooltip": "c-: less of the concept."}),
            "preservation": ("STRING", {"default": "male\nfemale", "multiline": True, "tooltip":
                             "Attributes to hold fixed, one per line (summed in every step). Use {p} in the "
                             "positive/negative prompts to place them; otherwise they are appended."}),
            "action": (list(ACTIONS), {"tooltip": "enhance: towards the positive prompt; erase: away from it."}),
            "eta": ("FLOAT", {"default": 2.0, "min": 0.01, "max": 50.0, "step": 0.1, "tooltip":
                    "η, the training target's strength (reference: 1–4). It multiplies the sum over preservation "
                    "attributes."}),
            "rank": ("INT", {"default": 4, "min": 1, "max": 128, "tooltip": "LoRA rank."}),
            "alpha": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 128.0, "step": 0.5,
                      "tooltip": "LoRA alpha; the scale is alpha / rank."}),
            "layers": (sorted(LAYER_PRESETS), {"default": "noxattn", "tooltip":
                       "Which layers carry the slider: noxattn (attention + resnets, no cross-attention; the "
                       "reference default), attn, xattn, xattn_kv, all."}),
            "iterations": ("INT", {"default": 500, "min": 1, "max": 100000, "tooltip": "Training steps."}),
            "lr": ("FLOAT", {"default": 2e-4, "min": 1e-6, "max": 0.1, "step": 1e-5, "tooltip": "AdamW learning rate."}),
            "resolution": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 64,
                           "tooltip": "Training image size (512 for SD1.x, 1024 for SDXL)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "control_after_generate": "fixed",
                     "tooltip": "Same seed, same slider."}),
            "slider_name": ("STRING", {"default": "my_slider", "tooltip":
                            "File name in models/loras/sliders (no folders, no '..')."}),
            "save_every": ("INT", {"default": 0, "min": 0, "max": 100000,
                           "tooltip": "Write a checkpoint every N steps (0: only at the end)."}),
            "resume_from": ([NO_RESUME, *lora_files()], {"tooltip": "Continue training a slider saved earlier."}),
        }, "optional": {
            "gradient_checkpointing": ("BOOLEAN", {"default": False, "tooltip":
                                       "Recompute activations during backward: less memory, slower."}),
        }}

    def train(self, model, clip, target, positive, negative, preservation, action, eta, rank, alpha, layers,
              iterations, lr, resolution, seed, slider_name, save_every, resume_from, gradient_checkpointing=False):
        import comfy.model_management
        import comfy.utils

        from .comfy_backend import ComfyDenoiser

        pair = pair_from_dict({"target": target, "positive": positive, "unconditional": negative,
                               "action": action, "guidance_scale": eta, "preservation": preservation})
        config = TrainConfig(rank=rank, alpha=alpha, lr=lr, iterations=iterations, eta=eta, resolution=resolution,
                             layers=layers, seed=seed, save_every=save_every,
                             gradient_checkpointing=gradient_checkpointing)
        config.validate()
        out = safe_output_path(sliders_dir(), slider_name)
        previous = out.read_bytes() if out.exists() else None  # restored if the user cancels a retrain
        progress = comfy.utils.ProgressBar(iterations)

        def on_step(step: int, total: int, loss: float) -> None:
            progress.update_absolute(step, total)
            comfy.model_management.throw_exception_if_processing_interrupted()  # the UI's cancel

        with torch.inference_mode(False):  # ComfyUI runs nodes under inference mode
            denoiser = ComfyDenoiser(model, clip)
            resume = None
            if resume_from != NO_RESUME:
                resume = load_slider(lora_path(resume_from), denoiser.naming, denoiser.family)
            try:
                result = train_text_slider(denoiser, [pair], config, name="slider", resume=resume,
                                           checkpoint_path=out, callback=on_step, progress=False)
            except comfy.model_management.InterruptProcessingException:
                # a cancelled run leaves no slider file behind, and an earlier slider as it was
                if previous is None:
                    out.unlink(missing_ok=True)
                elif out.read_bytes() != previous:
                    restore = out.with_name(f".{out.name}.restore")
                    restore.write_bytes(previous)
                    restore.replace(out)
                raise
        return (SliderFile.from_weights(result.weights, out.stem), pil_to_image(loss_plot(result.losses)))
