"""Load Shapes Model: the pack's own small shapes model as MODEL, CLIP and VAE, so that a slider can be
trained and seen in ComfyUI with no checkpoint to download."""

from __future__ import annotations

from pathlib import Path

from ..sliders_core.errors import SliderError
from ..sliders_core.shapes.model import SHAPES_MODEL_DIR
from .common import CATEGORY

MODELS_DIR = SHAPES_MODEL_DIR.parent  # <pack>/models: one folder per shipped model


def shapes_models() -> list[str]:
    return sorted(p.parent.name for p in MODELS_DIR.glob("*/sliders_model.json")) or [SHAPES_MODEL_DIR.name]


class LoadShapesModel:
    DESCRIPTION = ("The pack's embedded shapes model (6 MB, trained by this project, no download): 32×32 pictures "
                   "of one circle, square or triangle, large or small, red, green, blue or yellow. Prompts use those "
                   "words, e.g. 'a large red circle'. It trains a slider in a minute on CPU, so you can see one work "
                   "before using a real checkpoint. Use Empty Latent Image for Chroma Radiance (32×32) as its latent, "
                   "and any sampler with about 25 steps and cfg 3.")
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = ("The shapes UNet (pixel space, 3-channel latents).",
                       "Its text encoder (16 words, 8 tokens).",
                       "The identity pixel-space VAE: VAE Decode and VAE Encode just convert the range.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (shapes_models(), {"tooltip": "A model folder shipped in the pack's models/."}),
            "clamp_x0": ("BOOLEAN", {"default": True, "tooltip":
                         "Clip each step's predicted image to the valid range, as the model was trained to be "
                         "sampled (its scheduler's thresholding). Off: most samplers return noise."}),
        }}

    def load(self, model_name, clamp_x0):
        from .comfy_backend import load_shapes

        folder = MODELS_DIR / Path(model_name).name  # a widget value never leaves models/
        if Path(model_name).name != model_name or not (folder / "sliders_model.json").is_file():
            raise SliderError(f"no shipped model named {model_name!r}; available: {shapes_models()}")
        return load_shapes(folder, clamp=clamp_x0)
