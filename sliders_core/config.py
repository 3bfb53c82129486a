"""Training options as one dataclass whose fields are also written into the slider file's metadata."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from .errors import SliderError

# Which UNet layers carry the slider's LoRA. Each preset is a set of layer kinds; a backend labels
# every candidate module with one kind (see `backends.*.lora_candidates`).
#   attn     : self- and cross-attention projections (to_q/k/v/out)
#   noxattn  : everything in transformer and resnet blocks except cross-attention (reference default)
#   xattn    : cross-attention projections only
#   xattn_kv : cross-attention keys and values only (SliderSpace)
#   all      : every Linear/Conv in transformer and resnet blocks
LAYER_KINDS = ("self_attn", "cross_attn_q_out", "cross_attn_kv", "transformer_other", "resnet")
LAYER_PRESETS: dict[str, frozenset[str]] = {
    "attn": frozenset({"self_attn", "cross_attn_q_out", "cross_attn_kv"}),
    "noxattn": frozenset({"self_attn", "transformer_other", "resnet"}),
    "xattn": frozenset({"cross_attn_q_out", "cross_attn_kv"}),
    "xattn_kv": frozenset({"cross_attn_kv"}),
    "all": frozenset(LAYER_KINDS),
}

_ATTN_PROJ = ("to_q", "to_k", "to_v", "to_out.0")


def classify_unet_module(path: str) -> str | None:
    """Layer kind of a diffusers UNet module path (see config.LAYER_KINDS), or None if not a target."""
    if ".attentions." in path:
        if ".attn1." in path and path.endswith(_ATTN_PROJ):
            return "self_attn"
        if ".attn2." in path and path.endswith(("to_k", "to_v")):
            return "cross_attn_kv"
        if ".attn2." in path and path.endswith(("to_q", "to_out.0")):
            return "cross_attn_q_out"
        if path.endswith(("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")):
            return "transformer_other"
        return None
    if ".resnets." in path and path.endswith(("conv1", "conv2", "time_emb_proj", "conv_shortcut")):
        return "resnet"
    return None


MAX_ETA = 50.0  # the reference uses 1–4; beyond this the target is dominated by the η term


@dataclass
class TrainConfig:
    """Text-slider training options. Defaults are the reference's (MISSION §1) unless noted."""

    rank: int = 4
    alpha: float = 1.0
    lr: float = 2e-4
    iterations: int = 1000
    eta: float | None = None  # None: take η from the prompt set (its guidance_scale), else 1.0
    resolution: int | None = None  # None: the prompt set's, else the model's native size
    batch_size: int | None = None  # None: the prompt set's, else 1
    layers: str = "noxattn"
    seed: int = 0
    # x_t comes from one frozen denoising trajectory per refresh, reused for several iterations
    # (the reference re-denoises for every iteration, ≈80 % of its cost).
    trajectory_steps: int = 30
    trajectory_reuse: int = 20
    trajectory_guidance: float = 3.0  # CFG while generating x_t (reference: 3)
    save_every: int = 0  # 0: only at the end
    max_grad_norm: float = 0.0  # 0: no clipping
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30 % slower

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise SliderError(msg)

        need(isinstance(self.rank, int) and self.rank >= 1, f"rank must be an integer ≥ 1, got {self.rank!r}")
        need(math.isfinite(self.alpha) and self.alpha > 0, f"alpha must be > 0, got {self.alpha!r}")
        need(math.isfinite(self.lr) and 0 < self.lr < 1, f"lr must be in (0, 1), got {self.lr!r}")
        need(self.iterations >= 1, f"iterations must be ≥ 1, got {self.iterations!r}")
        if self.eta is not None:
            check_eta(self.eta)
        need(self.resolution is None or (self.resolution >= 8 and self.resolution % 8 == 0),
             f"resolution must be a multiple of 8, got {self.resolution!r}")
        need(self.batch_size is None or self.batch_size >= 1, f"batch_size must be ≥ 1, got {self.batch_size!r}")
        need(self.layers in LAYER_PRESETS,
             f"layers must be one of {sorted(LAYER_PRESETS)}, got {self.layers!r}")
        need(self.trajectory_steps >= 2, "trajectory_steps must be ≥ 2")
        need(self.trajectory_reuse >= 1, "trajectory_reuse must be ≥ 1")
        need(self.trajectory_guidance >= 1, "trajectory_guidance must be ≥ 1 (1 = no CFG)")
        need(self.save_every >= 0, "save_every must be ≥ 0")

    def to_metadata(self) -> dict[str, str]:
        return {"sliders.train_config": json.dumps(dataclasses.asdict(self), sort_keys=True)}


def check_eta(eta: float) -> float:
    if not (isinstance(eta, (int, float)) and math.isfinite(eta)) or eta <= 0:
        raise SliderError(f"η (guidance_scale) must be a positive number, got {eta!r}; the reference uses 1–4")
    if eta > MAX_ETA:
        raise SliderError(f"η = {eta} is absurdly large (max {MAX_ETA}); the reference uses 1–4")
    return float(eta)


def parse_numbers(text: str, what: str = "value") -> list[float]:
    """"-2, -1, 0, 1, 2" → floats. Commas or semicolons separate; empty items are skipped; NaN and
    infinities are refused (an α of NaN would blank the image without saying why)."""
    try:
        values = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError as exc:
        raise SliderError(f"{what} must be comma-separated numbers such as '-2, 0, 2', got {text!r}") from exc
    if not all(math.isfinite(v) for v in values):
        raise SliderError(f"{what} must be finite numbers, got {text!r}")
    return values
