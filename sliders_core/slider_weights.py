"""A slider's weights in memory: one low-rank pair per module, keyed by the diffusers module path."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

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
