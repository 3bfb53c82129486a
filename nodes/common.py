"""Shared pieces of the node adapters: the SLIDER type, the sliders folder, image conversions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..sliders_core.errors import FamilyMismatchError
from ..sliders_core.formats import from_state_dict, to_kohya_state_dict
from ..sliders_core.slider_weights import META_FAMILY, SliderWeights

SLIDER = "SLIDER"  # a SliderFile: a slider's tensors in any supported key form + its metadata
CATEGORY = "sliders"
SLIDERS_SUBFOLDER = "sliders"
# sliders shipped with the pack (for the shapes model) appear in the slider lists under this prefix
SHIPPED_PREFIX = "concept-sliders-pack/"
SHIPPED_SLIDERS_DIR = Path(__file__).resolve().parents[1] / "models" / "sliders"
ALPHA_LIMIT = 20.0  # the paper shows strengths up to ±5 and beyond; past ±20 images break down


@dataclass
class SliderFile:
    """A slider as loaded or trained, not yet tied to a model: key names resolve when it is applied."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    name: str

    @property
    def family(self) -> str | None:
        return self.metadata.get(META_FAMILY)

    @staticmethod
    def from_weights(weights: SliderWeights, name: str) -> SliderFile:
        return SliderFile(to_kohya_state_dict(weights), dict(weights.metadata), name)

    def resolve(self, model) -> SliderWeights:
        """SliderWeights keyed by this MODEL's diffusers module paths; refuses another family or a misfit."""
        from .comfy_backend import model_family, module_naming

        family = model_family(model)
        if self.family is not None and self.family != family:
            raise FamilyMismatchError(
                f"slider '{self.name}' was trained for base family '{self.family}' but the MODEL is '{family}'; "
                "load a checkpoint of that family or train the slider on this one")
        return from_state_dict(self.tensors, module_naming(model), self.metadata, source=self.name)


def sliders_dir() -> Path:
    """`<first loras folder>/sliders`: the stock LoraLoader lists files there at once."""
    import folder_paths

    return Path(folder_paths.get_folder_paths("loras")[0]) / SLIDERS_SUBFOLDER


def lora_files() -> list[str]:
    """The loras folder's files, then the sliders shipped with the pack."""
    import folder_paths

    shipped = sorted(SHIPPED_PREFIX + p.name for p in SHIPPED_SLIDERS_DIR.glob("*.safetensors"))
    return folder_paths.get_filename_list("loras") + shipped


def lora_path(name: str) -> Path:
    import folder_paths

    if name.startswith(SHIPPED_PREFIX):
        path = SHIPPED_SLIDERS_DIR / Path(name[len(SHIPPED_PREFIX):]).name  # never leaves the folder
        if not path.is_file():
            raise FileNotFoundError(f"the pack ships no slider {name!r}; shipped: {lora_files()}")
        return path
    return Path(folder_paths.get_full_path_or_raise("loras", name))


def check_alpha(alpha: float) -> float:
    if not -ALPHA_LIMIT <= alpha <= ALPHA_LIMIT:
        raise ValueError(f"slider strength {alpha} is outside [-{ALPHA_LIMIT}, {ALPHA_LIMIT}]")
    return float(alpha)


def pil_to_image(image) -> torch.Tensor:
    """PIL → ComfyUI IMAGE [1, H, W, 3] float 0..1."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]
