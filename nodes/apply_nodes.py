"""Load Slider, Apply Slider with Alpha, Slider Stack: static LoRA patches through ComfyUI's own loader."""

from __future__ import annotations

from pathlib import Path

from ..sliders_core.errors import SliderError
from ..sliders_core.formats import read_state_dict, to_kohya_state_dict
from .common import ALPHA_LIMIT, CATEGORY, SLIDER, SliderFile, check_alpha, lora_files, lora_path

ALPHA_INPUT = ("FLOAT", {"default": 1.0, "min": -ALPHA_LIMIT, "max": ALPHA_LIMIT, "step": 0.05,
                         "tooltip": "Slider strength α: 0 = base model, negative moves the other way."})


def apply_slider(model, slider: SliderFile, alpha: float):
    """A clone of MODEL with the slider as static patches at strength α (exactly what LoraLoader does)."""
    import comfy.lora

    alpha = check_alpha(alpha)
    weights = slider.resolve(model)  # family and fit checks, any key form → diffusers paths
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    loaded = comfy.lora.load_lora(to_kohya_state_dict(weights), key_map)
    if len(loaded) != len(weights.modules):
        raise SliderError(f"only {len(loaded)} of {len(weights.modules)} modules of slider '{slider.name}' "
                          "fit this MODEL: it was made for another model")
    patched = model.clone()
    patched.add_patches(loaded, alpha)
    return patched


class LoadSlider:
    DESCRIPTION = ("Loads a slider from the loras folder: files trained here (in sliders/), the official Concept "
                   "Sliders .pt files, or kohya / ComfyUI / peft LoRA files.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (SLIDER,)
    OUTPUT_TOOLTIPS = ("The slider (weights + metadata); connect it to Apply Slider, Slider Stack, the Delayed-LoRA "
                       "Sampler or Slider Sweep.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "slider_name": (lora_files(), {"tooltip": "A file in models/loras (trained sliders are in sliders/)."}),
        }}

    @classmethod
    def IS_CHANGED(cls, slider_name):
        """ComfyUI caches outputs by inputs: re-read the file when it changes (a slider retrained under its name)."""
        try:
            stat = lora_path(slider_name).stat()
        except Exception:  # missing file: load() reports it
            return ""
        return f"{stat.st_mtime_ns}-{stat.st_size}-{stat.st_ino}"

    def load(self, slider_name):
        tensors, metadata = read_state_dict(lora_path(slider_name))
        return (SliderFile(tensors, metadata, Path(slider_name).stem),)


class ApplySlider:
    DESCRIPTION = "Applies one slider to MODEL at strength α. Chain several to compose them."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with the slider applied.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to apply the slider to."}),
            "slider": (SLIDER, {"tooltip": "A slider from Load Slider or Train Text Slider."}),
            "alpha": ALPHA_INPUT,
        }}

    def apply(self, model, slider, alpha):
        return (apply_slider(model, slider, alpha),)


class SliderStack:
    DESCRIPTION = "Applies up to four sliders, each at its own strength, in one node."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with every connected slider applied.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        optional = {}
        for i in range(1, 5):
            optional[f"slider_{i}"] = (SLIDER, {"tooltip": f"Slider {i} (optional)."})
            optional[f"alpha_{i}"] = ALPHA_INPUT
        return {"required": {"model": ("MODEL", {"tooltip": "The model to apply the sliders to."})},
                "optional": optional}

    def apply(self, model, **kwargs):
        for i in range(1, 5):
            slider = kwargs.get(f"slider_{i}")
            if slider is not None:
                model = apply_slider(model, slider, kwargs.get(f"alpha_{i}", 1.0))
        return (model,)
