"""The small interface every algorithm in the core talks to, whatever runs the model underneath.

A backend (diffusers today, ComfyUI next) wraps one frozen denoiser and the LoRA sliders attached
to it. The algorithms only
- encode prompts into a batched `Cond`,
- `predict` the model's native output for a batch of (x_t, noise level, condition),
- `sample` with classifier-free guidance (optionally a different unconditional per step — null-text
  inversion — and a per-step slider scale — delayed LoRA), recording the trajectory,
- attach, scale, switch off and export sliders through `SliderHost`,
- noise given latents at a training level and name the output a perfect model would give there
  (training on images: image-pair sliders, SliderSpace),
- take deterministic (DDIM) steps in either direction between the levels of a schedule (inverting a
  real image and sampling it back: null-text inversion).

Noise levels are opaque to the core (diffusers timesteps, ComfyUI sigmas, flow times): the core
only hands back the levels a backend gave it, so the latent is always trained at the level it
really sits at. Model outputs are compared only with each other at the same (x_t, level), so the
eq. 8 target works for ε-, v-, x0- and flow-parameterised models alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from .errors import SliderError
from .formats import UnetNaming
from .slider_weights import SliderWeights


@dataclass
class Cond:
    """A batch of text conditions: named tensors that all share batch dimension 0."""

    tensors: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    @staticmethod
    def cat(conds: Sequence[Cond]) -> Cond:
        return Cond({k: torch.cat([c.tensors[k] for c in conds]) for k in conds[0].tensors})

    def repeat_each(self, n: int) -> Cond:
        """[a, b] → [a×n, b×n]: prompt-major layout, matching `x.repeat(len(cond), ...)`."""
        return Cond({k: v.repeat_interleave(n, dim=0) for k, v in self.tensors.items()})

    def take(self, index: Sequence[int]) -> Cond:
        """The entries at `index`, in that order (repeats allowed)."""
        rows = torch.as_tensor(list(index), dtype=torch.long)
        return Cond({k: v[rows.to(v.device)] for k, v in self.tensors.items()})

    def for_batch(self, n: int) -> Cond:
        """This condition for a batch of n samples: as it is when it has n entries, repeated when it has one."""
        if len(self) == n:
            return self
        if len(self) == 1:
            return self.repeat_each(n)
        raise SliderError(f"condition batch {len(self)} does not match sample batch {n}")


@dataclass
class Trajectory:
    """A sampling run: `states[i]` is the model input at step i and sits exactly at `levels[i]`."""

    final: torch.Tensor  # the denoised latent
    states: list[torch.Tensor] = field(default_factory=list)
    levels: list[torch.Tensor] = field(default_factory=list)
    # the model's conditional output at each recorded state (before guidance): a frozen prediction
    # the text-slider loop would otherwise compute again when its neutral prompt is c_t
    cond_outputs: list[torch.Tensor] = field(default_factory=list)


# (step index, number of steps) -> {slider name: scale}; None leaves the scales as they are.
SliderSchedule = Callable[[int, int], "dict[str, float] | None"]
# (steps done, number of steps) after every sampling step: progress, and cancel by raising
SampleCallback = Callable[[int, int], None]


@runtime_checkable
class SliderHost(Protocol):
    """LoRA sliders living on a backend's denoiser, each with its own continuous scale α."""

    def lora_candidates(self) -> dict[str, str]:
        """Every module a slider may target: diffusers-style module path → layer kind (config.LAYER_KINDS)."""

    def add(self, name: str, weights: SliderWeights | None = None, *, modules: Sequence[str] = (),
            rank: int = 4, alpha: float = 1.0, trainable: bool = False, ends: int = 1) -> None:
        """Attach a slider, from weights or freshly initialised (up = 0, so it starts as a no-op). A
        two-ended slider (weights with a `negative` end, or a fresh one with ends=2) has a second LoRA
        for α < 0, run at |α| instead of the first."""

    def remove(self, name: str) -> None: ...

    def names(self) -> list[str]: ...

    def set_scales(self, scales: dict[str, float]) -> None:
        """Activate exactly these sliders with these scales (α may be any real number)."""

    def disabled(self) -> contextlib.AbstractContextManager[None]:
        """Context in which the model runs frozen, as if no slider were attached."""

    def merging(self) -> contextlib.AbstractContextManager[None]:
        """Context in which set_scales may fold sliders into the weights, so sampling costs the same
        whatever their number; sliders whose scale changes inside it stay live. On exit the weights are
        restored and every slider is off."""

    def parameters(self, name: str) -> list[torch.nn.Parameter]: ...

    def export(self, name: str) -> SliderWeights: ...


@runtime_checkable
class Denoiser(Protocol):
    family: str  # base model family a slider is tied to: "sd1", "sd2", "sdxl", "shapes", ...
    default_resolution: int
    sliders: SliderHost
    naming: UnetNaming  # resolves every LoRA key form to this model's module paths

    def encode(self, prompts: Sequence[str]) -> Cond: ...

    def predict(self, x_t: torch.Tensor, level: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Native model output for a batch; `level` has one entry per sample."""

    def initial_noise(self, batch: int, resolution: int, generator: torch.Generator) -> torch.Tensor: ...

    # -- training on given images (image-pair sliders, SliderSpace) --------------------------------
    def random_levels(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training noise levels, uniform over the model's training schedule, in the backend's units."""

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """Clean latents → the model input x_t at `level` (the space `predict` and trajectories use)."""

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """What `predict(add_noise(x0, noise, level), level, c)` returns for a perfect model."""

    def sample(self, cond: Cond, uncond: Cond | Sequence[Cond], *, guidance: float, steps: int,
               noise: torch.Tensor, slider_schedule: SliderSchedule | None = None,
               record: bool = False, generator: torch.Generator | None = None,
               progress: bool = False, callback: SampleCallback | None = None) -> Trajectory:
        """CFG sampling. `uncond` is one Cond or one per step (null-text inversion); `generator`
        seeds stochastic samplers; `record` keeps every state with its level; `callback` runs after
        every step (one model call), so a cancel acts within one call."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, H, W, 3] in 0..1 → clean latents x0 in the space `add_noise` and `decode` use
        (the VAE; the identity up to range for pixel-space models)."""

    def decode(self, latents: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
        """Latents → images [B, H, W, 3] in 0..1 (float32, CPU). differentiable: keep the graph (and
        the device), for losses on images (SliderSpace)."""

    # -- deterministic sampling and its inversion (real-image editing) ------------------------------
    def ddim_levels(self, steps: int) -> torch.Tensor:
        """[steps + 1] levels of a deterministic `steps`-step schedule, noisiest first; the last is the
        clean image and is never a model input."""

    def ddim_step(self, x: torch.Tensor, output: torch.Tensor, level: torch.Tensor,
                  next_level: torch.Tensor) -> torch.Tensor:
        """DDIM (η = 0): move x from `level` to `next_level` along the model output predicted there.
        Towards a noisier level it is the DDIM inversion step. Differentiable."""

    def state_at(self, x: torch.Tensor, level: torch.Tensor, new_level: torch.Tensor) -> torch.Tensor:
        """x, a state at `level`, as the model input for `new_level` with the same image content (DDIM
        inversion evaluates the model at the next level on the current state). The identity where
        states are variance preserving; a rescale where they grow with the noise (k-diffusion σ)."""

    def model_signature(self) -> list[float]:
        """A few numbers that tell one checkpoint from another (norms of the first and last convolutions),
        so a file made on one model is refused on another of the same family."""
