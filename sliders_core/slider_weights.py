"""A slider's weights in memory: one low-rank pair per module, keyed by the diffusers module path."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch

from .errors import SliderError

META_FAMILY = "sliders.base_family"


@dataclass
class LoraModule:
    down: torch.Tensor  # [rank, in] or [rank, in, kh, kw]   (peft lora_A, kohya lora_down)
    up: torch.Tensor  # [out, rank] or [out, rank, 1, 1]     (peft lora_B, kohya lora_up)
    alpha: float  # scale = alpha / rank, as in kohya, peft and ComfyUI

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta_weight(self) -> torch.Tensor:
        """ΔW at α = 1, shaped like the base weight (used by tests and backends that patch weights)."""
        down, up = self.down.float(), self.up.float()
        if down.dim() == 2:
            delta = up @ down
        else:  # conv: up is 1×1, so ΔW = up[:, :, 0, 0] · down over the flattened kernel
            delta = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        return delta * (self.alpha / self.rank)


@dataclass
class SliderWeights:
    modules: dict[str, LoraModule]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def family(self) -> str | None:
        return self.metadata.get(META_FAMILY)


def modules_to_attach(name: str, attached: Collection[str], weights: SliderWeights | None,
                      modules: Sequence[str], known: Collection[str]) -> list[str]:
    """The module paths a new slider ``name`` covers (from its weights, else ``modules``), checked the same
    way by every backend: a fresh name, at least one module, and only modules this model can take."""
    if name in attached:
        raise SliderError(f"a slider named {name!r} is already attached; remove it or pick another name")
    paths = list(weights.modules) if weights is not None else list(modules)
    if not paths:
        raise SliderError("a slider needs at least one target module")
    missing = [p for p in paths if p not in known]
    if missing:
        raise SliderError(f"the slider names modules this model does not have or cannot adapt, e.g. {missing[:3]}; "
                          "it was probably made for another model family")
    return paths
