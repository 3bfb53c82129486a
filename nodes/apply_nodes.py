"""Load Slider, Apply Slider with Alpha, Slider Stack: static LoRA patches through ComfyUI's own loader."""

from __future__ import annotations

from pathlib import Path

from ..sliders_core.config import parse_numbers
from ..sliders_core.errors import SliderError
from ..sliders_core.formats import read_state_dict, to_kohya_state_dict
from ..sliders_core.inference import parse_slider_mix
from ..sliders_core.slider_weights import SliderWeights
from .common import ALPHA_LIMIT, CATEGORY, SLIDER, SliderFile, check_alpha, lora_files, lora_path

ALPHA_INPUT = ("FLOAT", {"default": 1.0, "min": -ALPHA_LIMIT, "max": ALPHA_LIMIT, "step": 0.05,
                         "tooltip": "Slider strength α: 0 = base model, negative moves the other way."})


def apply_sliders(model, sliders):
    """One clone of MODEL with every (slider, α) as static patches, exactly what chained LoraLoaders do.
    ComfyUI folds all patches into the weights once when it loads the model, so sampling costs the same
    with fifty sliders as with one."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patched = model.clone()
    for slider, alpha in sliders:
        alpha = check_alpha(alpha)
        weights = slider.resolve(model)  # family and fit checks, any key form → diffusers paths
        modules, strength = weights.end_at(alpha)  # a two-ended slider's negative end for α < 0
        loaded = comfy.lora.load_lora(to_kohya_state_dict(SliderWeights(modules)), key_map)
        if len(loaded) != len(modules):
            raise SliderError(f"only {len(loaded)} of {len(modules)} modules of slider '{slider.name}' "
                              "fit this MODEL: it was made for another model")
        patched.add_patches(loaded, strength)
    return patched


def apply_slider(model, slider: SliderFile, alpha: float):
    return apply_sliders(model, [(slider, alpha)])


def resolve_lora_name(name: str, files: list[str]) -> str:
    """A name as a user writes it ('sliders/age', 'age.safetensors', 'age') → one listed file; only
    listed files can match, so a name never reaches outside the loras folder."""
    wanted = name.replace("\\", "/")
    listed = {f.replace("\\", "/"): f for f in files}
    matches = [f for key, f in listed.items() if wanted in (key, str(Path(key).with_suffix("")))]
    if not matches:
        matches = [f for key, f in listed.items() if Path(wanted).name in (Path(key).name, Path(key).stem)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise SliderError(f"no slider file {name!r} in models/loras or the pack ({len(files)} files listed)")
    raise SliderError(f"{name!r} matches several files: {sorted(matches)}; write the folder too")


def load_slider_file(name: str) -> SliderFile:
    """A listed file of the loras folder (or the pack's) as a SLIDER."""
    tensors, metadata = read_state_dict(lora_path(name))
    return SliderFile(tensors, metadata, Path(name).stem)


def file_stamp(name: str) -> str:
    """Changes when the file does (a slider retrained under its name), for ComfyUI's IS_CHANGED."""
    stat = lora_path(name).stat()
    return f"{stat.st_mtime_ns}-{stat.st_size}-{stat.st_ino}"


def mix_from_text(text: str) -> list[tuple[SliderFile, float]]:
    files = lora_files()
    return [(load_slider_file(resolve_lora_name(name, files)), alpha) for name, alpha in parse_slider_mix(text)]


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
            return file_stamp(slider_name)
        except Exception:  # missing file: load() reports it
            return ""

    def load(self, slider_name):
        return (load_slider_file(slider_name),)


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


class SliderMixer:
    DESCRIPTION = ("Applies any number of sliders, each at its own strength, in one node: lines 'name: α' naming "
                   "files in models/loras (or the pack's), a list from Discover Sliders, one more slider, or all "
                   "of these. ComfyUI folds "
                   "them into the weights once, so sampling with fifty sliders costs what sampling with one does.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "report")
    OUTPUT_TOOLTIPS = ("The model with every slider of the mix applied.", "Each slider applied, with its α.")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to apply the sliders to."}),
            "mix": ("STRING", {"multiline": True, "default": "", "tooltip": (
                "One slider per line, 'name: α', e.g. 'sliders/age: 1.5' (the .safetensors may be left out; "
                "a bare file name works when it is unique). '#' starts a comment; a line without α means 1.")}),
        }, "optional": {
            "sliders": ("SLIDERS", {"tooltip": "A list of sliders, e.g. what Discover Sliders found."}),
            "alphas": ("STRING", {"default": "1.0", "tooltip": (
                "Strengths for the list: one α for all, or one per slider in order, comma separated.")}),
            "slider": (SLIDER, {"tooltip": "One more slider, e.g. from Load Slider or a Train node."}),
            "alpha": ALPHA_INPUT,
        }}

    @classmethod
    def IS_CHANGED(cls, model=None, mix="", sliders=None, alphas="1.0", slider=None, alpha=1.0):
        """Re-read the mix's files when one of them changes (a slider retrained under its name)."""
        stamps = [mix, alphas, str(alpha)]
        try:
            files = lora_files()
            for name, _ in parse_slider_mix(mix):
                stamps.append(file_stamp(resolve_lora_name(name, files)))
        except Exception:  # a bad line or missing file: apply() reports it
            pass
        return "|".join(stamps)

    def apply(self, model, mix, sliders=None, alphas="1.0", slider=None, alpha=1.0):
        chosen = mix_from_text(mix)
        if sliders:
            values = parse_numbers(alphas, "alphas")
            if len(values) == 1:
                values = values * len(sliders)
            if len(values) != len(sliders):
                raise SliderError(f"{len(values)} alphas for {len(sliders)} sliders: give one α for all or one per slider")
            chosen += list(zip(sliders, values))
        if slider is not None:
            chosen.append((slider, alpha))
        if not chosen:
            raise SliderError("the mix is empty: write 'name: α' lines or connect a slider or a list of sliders")
        report = "\n".join(f"{slider.name}: {alpha:g}" for slider, alpha in chosen)
        return (apply_sliders(model, chosen), f"{len(chosen)} sliders\n{report}")
