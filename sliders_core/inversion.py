"""Real images: DDIM inversion and null-text inversion (Mokady et al. 2023; MISSION §4), then slider edits.

The photo's clean latent x*_S is walked up a deterministic S-step schedule under its source prompt at
guidance 1 (DDIM inversion): x*_S … x*_0, x*_i at level i. Sampled back at the user's guidance w with
the empty prompt as the unconditional, that path drifts. Null-text optimisation learns, for every
step i, the unconditional embedding ∅_i such that the CFG step from the current x_i,

    x_{i+1} = DDIM(x_i, ε(x_i, ∅_i) + w·[ε(x_i, c) − ε(x_i, ∅_i)]),

lands on x*_{i+1} (Adam, a few iterations, decaying lr, early stop, warm start from ∅_{i−1}).
Negative-prompt inversion (Miyake et al. 2023) takes ∅_i = c instead: no optimisation, the CFG step
reduces to the guidance-1 step the inversion made. Editing samples the same path with sliders on
from a chosen step (delayed LoRA; α = 0 is the reconstruction).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import need
from .denoiser import Cond, Denoiser, SliderSchedule
from .errors import SliderError
from .formats import inversion_state_dict, read_state_dict, split_inversion_state_dict, write_safetensors
from .inference import delayed_schedule

METHODS = ("null-text", "negative-prompt", "ddim")  # ddim: the empty prompt as unconditional (the baseline)
FORMAT_VERSION = "1"

# (step, inner iteration, loss) after every model call of the optimisation: progress and cancel
InversionCallback = Callable[[int, int, float], None]


@dataclass
class InversionConfig:
    """Defaults are the reference's (MISSION §4) unless noted."""

    steps: int = 50
    guidance: float = 7.5
    method: str = "null-text"
    inner_iterations: int = 10
    lr: float = 1e-2  # decays linearly to half over the steps
    early_stop: float = 1e-5  # stop a step's optimisation once the loss is below this + step·early_stop_growth
    early_stop_growth: float = 2e-5

    def validate(self) -> None:
        need(self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}")
        need(self.steps >= 1, f"steps must be ≥ 1, got {self.steps}")
        need(self.guidance >= 1.0, f"guidance must be ≥ 1, got {self.guidance}")
        need(self.inner_iterations >= 0, f"inner_iterations must be ≥ 0, got {self.inner_iterations}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")


@dataclass
class Inversion:
    """Everything that samples a photo back: start latent x_0 (at levels[0]), the source prompt's
    condition, one unconditional per step, and the schedule, model and guidance they were made for."""

    latent: torch.Tensor
    cond: Cond
    unconds: list[Cond]
    levels: torch.Tensor
    guidance: float
    method: str
    family: str
    signature: list[float]
    prompt: str = ""
    scheduler: str = ""  # the backend's name for the schedule `levels` came from
    report: dict = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.levels) - 1

    def check_fits(self, denoiser: Denoiser, steps: int | None = None) -> None:
        """Sampling it anywhere else than where it was made gives garbage: refuse with the reason."""
        if steps is not None and steps != self.steps:
            raise SliderError(f"this inversion was made for {self.steps} steps, not {steps}: its unconditional "
                              "embeddings belong to those steps; sample with its step count or invert again")
        if denoiser.family != self.family:
            raise SliderError(f"this inversion was made on a '{self.family}' model, not '{denoiser.family}'; "
                              "invert the image again on this model")
        levels = denoiser.ddim_levels(self.steps)
        if levels.shape != self.levels.shape or not torch.allclose(levels.double().cpu(), self.levels.double().cpu(),
                                                                    rtol=1e-4, atol=1e-6):
            raise SliderError("this inversion was made for another noise schedule or sampler (its levels differ from "
                              "this model's deterministic schedule); invert the image again here")
        signature = denoiser.model_signature()
        if not torch.allclose(torch.tensor(signature), torch.tensor(self.signature), rtol=1e-3):
            raise SliderError("this inversion was made on another checkpoint of the same family (its weights "
                              "differ); invert the image again on this model")


def _levels(level: torch.Tensor, batch: int) -> torch.Tensor:
    return level.expand(batch)


@torch.no_grad()
def ddim_invert(denoiser: Denoiser, x_clean: torch.Tensor, cond: Cond, levels: torch.Tensor) -> list[torch.Tensor]:
    """DDIM inversion at guidance 1: states[i] sits at levels[i], states[-1] is x_clean. The model is
    evaluated at the less noisy state with the next level's label (ε(x_{i+1}) ≈ ε(x_i), as the reference)."""
    batch = x_clean.shape[0]
    c = cond.for_batch(batch)
    states = [x_clean.float()]
    for i in reversed(range(len(levels) - 1)):
        x, level, here = states[-1], _levels(levels[i], batch), _levels(levels[i + 1], batch)
        out = denoiser.predict(denoiser.state_at(x, here, level), level, c)
        states.append(denoiser.ddim_step(x, out, here, level))
    return states[::-1]


def cfg_step(denoiser: Denoiser, x: torch.Tensor, levels: torch.Tensor, i: int, cond: Cond, uncond: Cond,
             guidance: float) -> torch.Tensor:
    """One guided DDIM step from levels[i] to levels[i + 1] (conditional and unconditional in one batch)."""
    batch = x.shape[0]
    level = _levels(levels[i], batch)
    c, u = cond.for_batch(batch), uncond.for_batch(batch)
    if guidance == 1.0 or _same(c, u):
        out = denoiser.predict(x, level, c)  # ε(x, ∅) + w·[ε(x, c) − ε(x, ∅)] = ε(x, c) when ∅ = c
    else:
        out_u, out_c = denoiser.predict(torch.cat([x, x]), torch.cat([level, level]), Cond.cat([u, c])).chunk(2)
        out = out_u + guidance * (out_c - out_u)
    return denoiser.ddim_step(x, out, level, _levels(levels[i + 1], batch))


def _same(a: Cond, b: Cond) -> bool:
    return a is b or (a.tensors.keys() == b.tensors.keys()
                      and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors))


def optimise_null_text(denoiser: Denoiser, states: Sequence[torch.Tensor], levels: torch.Tensor, cond: Cond,
                       empty: Cond, config: InversionConfig, callback: InversionCallback | None = None,
                       progress: bool = False) -> tuple[list[Cond], list[float], int]:
    """One unconditional per step such that sampling from states[0] retraces `states`.
    Returns (unconds, final loss per step, inner iterations run)."""
    batch = states[0].shape[0]
    c = cond.for_batch(batch)
    uncond = {k: v.detach().clone().float() for k, v in empty.for_batch(batch).tensors.items()}
    unconds, losses, iterations = [], [], 0
    x = states[0].float()
    steps = len(levels) - 1
    for i in tqdm(range(steps), desc="null-text inversion", disable=not progress, leave=False):
        level = _levels(levels[i], batch)
        next_level = _levels(levels[i + 1], batch)
        target = states[i + 1].float()
        with torch.no_grad():
            out_c = denoiser.predict(x, level, c)
        params = {k: v.clone().requires_grad_(True) for k, v in uncond.items()}
        optimiser = torch.optim.Adam(params.values(), lr=config.lr * (1 - i / (2 * steps)))
        threshold = config.early_stop + config.early_stop_growth * i
        x_next, loss_value = None, float("nan")
        for j in range(config.inner_iterations + 1):
            with torch.set_grad_enabled(j < config.inner_iterations):
                out_u = denoiser.predict(x, level, Cond(params))
                x_next = denoiser.ddim_step(x, out_u + config.guidance * (out_c - out_u), level, next_level)
                # per image, so one image's convergence does not stop another's
                per_image = (x_next.float() - target).pow(2).flatten(1).mean(1)
                loss_value = float(per_image.detach().max())
            if callback is not None:
                callback(i, j, loss_value)
            if not torch.isfinite(per_image).all():
                raise SliderError(f"null-text optimisation diverged at step {i} (loss {loss_value}); "
                                  "lower lr or use method 'negative-prompt'")
            if loss_value < threshold or j == config.inner_iterations:
                break  # x_next already comes from the final embedding: no extra forward
            optimiser.zero_grad(set_to_none=True)
            per_image.sum().backward()
            optimiser.step()
            iterations += 1
        uncond = {k: v.detach() for k, v in params.items()}
        unconds.append(Cond(uncond))
        losses.append(loss_value)
        x = x_next.detach()
    return unconds, losses, iterations


def invert(denoiser: Denoiser, images: torch.Tensor, prompt: str, config: InversionConfig | None = None, *,
           cond: Cond | None = None, empty: Cond | None = None, callback: InversionCallback | None = None,
           progress: bool = False) -> Inversion:
    """Images [B, H, W, 3] in 0..1 (the model's resolution multiple) → an Inversion of each. `cond` /
    `empty` replace the encoded source prompt / empty prompt when given (e.g. a graph's CONDITIONING)."""
    config = config or InversionConfig()
    config.validate()
    started, forwards = time.perf_counter(), getattr(denoiser, "forward_count", 0)
    levels = denoiser.ddim_levels(config.steps)
    x_clean = denoiser.encode_images(images)
    cond = cond if cond is not None else denoiser.encode([prompt])
    states = ddim_invert(denoiser, x_clean, cond, levels)
    report: dict = {}
    if config.method != "negative-prompt" and empty is None:
        empty = denoiser.encode([""])
    if config.method == "null-text":
        unconds, losses, iterations = optimise_null_text(denoiser, states, levels, cond, empty, config, callback,
                                                         progress)
        report.update(final_loss_max=max(losses), backward_passes=iterations)
    else:
        unconds = [cond if config.method == "negative-prompt" else empty] * config.steps
    report.update(seconds=round(time.perf_counter() - started, 3),
                  forwards=getattr(denoiser, "forward_count", 0) - forwards, images=int(x_clean.shape[0]))
    return Inversion(latent=states[0], cond=cond, unconds=unconds, levels=levels.cpu(), guidance=config.guidance,
                     method=config.method, family=denoiser.family, signature=denoiser.model_signature(),
                     prompt=prompt, scheduler=getattr(denoiser, "ddim_scheduler", "ddim"), report=report)


@torch.no_grad()
def sample_inversion(denoiser: Denoiser, inversion: Inversion, slider_schedule: SliderSchedule | None = None,
                     progress: bool = False) -> torch.Tensor:
    """The inversion sampled back (latents), optionally with a per-step slider schedule."""
    inversion.check_fits(denoiser)
    x = inversion.latent.to(getattr(denoiser, "device", inversion.latent.device)).float()
    levels = inversion.levels
    for i in tqdm(range(inversion.steps), desc="sampling inversion", disable=not progress, leave=False):
        if slider_schedule is not None:
            scales = slider_schedule(i, inversion.steps)
            if scales is not None:
                denoiser.sliders.set_scales(scales)
        x = cfg_step(denoiser, x, levels, i, inversion.cond, inversion.unconds[i], inversion.guidance)
    return x


def edit(denoiser: Denoiser, inversion: Inversion, scales: dict[str, float], start: float = 0.5,
         progress: bool = False) -> torch.Tensor:
    """Images [B, H, W, 3]: the inverted photo with sliders at `scales`, switched on after the first
    `start` fraction of the steps (reference for real images: half-way). α = 0 is the reconstruction."""
    try:
        latents = sample_inversion(denoiser, inversion, delayed_schedule(scales, start), progress)
    finally:
        denoiser.sliders.set_scales({})
    return denoiser.decode(latents)


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in 0..1 (over the whole batch)."""
    mse = F.mse_loss(images.float().cpu(), reference.float().cpu()).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


# -- files ---------------------------------------------------------------------------------------
def save_inversion(inversion: Inversion, path: str | Path) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise SliderError(f"inversions are saved as .safetensors, got {path.name}")
    shared = all(u is inversion.unconds[0] for u in inversion.unconds)
    tensors = inversion_state_dict(inversion.latent, inversion.levels, inversion.cond.tensors,
                                   inversion.unconds[0].tensors if shared else [u.tensors for u in inversion.unconds])
    metadata = {"sliders.kind": "inversion", "inversion.version": FORMAT_VERSION, "inversion.steps": inversion.steps,
                "inversion.guidance": inversion.guidance, "inversion.method": inversion.method,
                "inversion.family": inversion.family, "inversion.signature": json.dumps(inversion.signature),
                "inversion.prompt": inversion.prompt, "inversion.scheduler": inversion.scheduler,
                "inversion.report": json.dumps(inversion.report)}
    return write_safetensors(tensors, metadata, path)


def load_inversion(path: str | Path) -> Inversion:
    path = Path(path)
    tensors, metadata = read_state_dict(path, what="inversion")
    if metadata.get("sliders.kind") != "inversion":
        raise SliderError(f"{path.name} is not an inversion file (no 'sliders.kind = inversion' metadata)")
    try:
        steps = int(metadata["inversion.steps"])
        latent, levels, cond, unconds = split_inversion_state_dict(tensors, steps, path.name)
        as_conds = {id(u): Cond(u) for u in unconds}  # one shared unconditional stays one object
        return Inversion(
            latent=latent, cond=Cond(cond), unconds=[as_conds[id(u)] for u in unconds], levels=levels,
            guidance=float(metadata["inversion.guidance"]), method=metadata["inversion.method"],
            family=metadata["inversion.family"], signature=json.loads(metadata["inversion.signature"]),
            prompt=metadata.get("inversion.prompt", ""), scheduler=metadata.get("inversion.scheduler", ""),
            report=json.loads(metadata.get("inversion.report", "{}")))
    except (KeyError, ValueError) as exc:
        raise SliderError(f"{path.name}: corrupt inversion metadata ({exc})") from exc


__all__ = ["InversionConfig", "Inversion", "invert", "ddim_invert", "optimise_null_text", "sample_inversion",
           "edit", "psnr", "save_inversion", "load_inversion", "METHODS"]
