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
    # a two-ended slider (signs="separate"): the α < 0 end's own LoRA, applied at |α|; `modules` then
    # serve α > 0 only. None: one LoRA for both signs (α < 0 is its negation), every other slider
    negative: dict[str, LoraModule] | None = None

    @property
    def family(self) -> str | None:
        return self.metadata.get(META_FAMILY)

    def end_at(self, alpha: float) -> tuple[dict[str, LoraModule], float]:
        """The LoRA modules strength α applies and the multiplier on them: a two-ended slider's negative
        end at |α| for α < 0, else `modules` at α."""
        if alpha < 0 and self.negative is not None:
            return self.negative, -alpha
        return self.modules, alpha


def ends_of(weights: SliderWeights | None, ends: int) -> int:
    """How many ends (LoRAs) a slider being attached has: its weights say, else `ends` (1 or 2)."""
    if ends not in (1, 2):
        raise SliderError(f"a slider has 1 or 2 ends, got {ends!r}")
    if weights is None:
        return ends
    have = 1 if weights.negative is None else 2
    if ends == 2 and have == 1:
        raise SliderError("these slider weights have one end (one LoRA for both signs): they cannot attach as a "
                          "two-ended slider")
    return have


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
