"""What every slider training loop shares, so that each algorithm module holds only its objective.

`SliderRun` attaches a fresh (or resumed) trainable slider, then takes one loss per step and does
the rest: AdamW in fp32, optional gradient clipping, the NaN/inf guard (stop with a clear error,
keep the last good weights), checkpoints every `save_every` steps, progress and cancel through a
callback, gradient checkpointing, and the final export with metadata.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__, distributed
from .config import preset_modules
from .denoiser import Denoiser
from .errors import SliderError, TrainingDivergedError
from .formats import META_ENDS, save_slider
from .slider_weights import META_FAMILY, SliderWeights

# (steps done, total, loss) after every step; may raise to cancel. The loss is NaN for a call from
# inside a step (frozen sampling between optimiser steps), which is for progress and cancel only.
StepCallback = Callable[[int, int, float], None]
WEAK_EFFECT = 0.2  # below this share of the training push, a slider's effect is hard to see
log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    weights: SliderWeights
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    unet_samples_per_iteration: float = 0.0  # single-image UNet forwards (no backward) per iteration
    # share of its training target's push the slider delivers at α = 1 on held-out states (text sliders):
    # ≈ 1 learned, ≈ 0 no effect; and a warning for the user when it is too small
    effect: float | None = None
    warning: str | None = None

    @property
    def final_loss(self) -> float:
        """The mean loss of the last 20 steps (one step's loss is noisy)."""
        last = self.losses[-20:]
        return sum(last) / len(last) if last else float("nan")

    def report(self) -> str:
        """One line for a user: steps, time, loss, and whether the slider does anything."""
        text = (f"{len(self.losses)} steps in {self.seconds:.1f} s, loss {self.losses[0]:.4g} → "
                f"{self.final_loss:.4g}" if self.losses else "no steps run")
        if self.effect is not None:
            text += f"; at α = 1 the slider delivers {self.effect:.0%} of its training target's push"
        return text + (f". WARNING: {self.warning}" if self.warning else "")


def slider_modules(denoiser: Denoiser, layers: str) -> list[str]:
    """The module paths of a layer preset (config.LAYER_PRESETS) on this denoiser."""
    return preset_modules(denoiser.sliders.lora_candidates(), layers)


class SliderRun:
    def __init__(self, denoiser: Denoiser, name: str, config, *,
                 resume: SliderWeights | None = None, checkpoint_path: str | Path | None = None,
                 callback: StepCallback | None = None, progress: bool = True, label: str = "slider", ends: int = 1):
        """`config` has rank, alpha, layers, lr, iterations, seed, save_every, max_grad_norm,
        gradient_checkpointing; the slider goes on the modules of its `layers` preset. ends=2: a
        two-ended slider, whose α < 0 steps train its second LoRA."""
        self.denoiser, self.name, self.config = denoiser, name, config
        self.checkpoint_path, self.callback, self.progress, self.label = checkpoint_path, callback, progress, label
        self.start_step = int(resume.metadata.get("sliders.steps", 0)) if resume is not None else 0
        if self.start_step >= config.iterations:
            raise SliderError(f"the slider to resume already has {self.start_step} steps ≥ "
                              f"iterations={config.iterations}")
        if resume is not None and (resume.negative is not None) != (ends == 2):
            have, want = ("two ends", "one") if resume.negative is not None else ("one end", "two")
            raise SliderError(f"the slider to resume has {have}, this run trains {want}: train with the signs "
                              "setting it was made with ('separate' makes two-ended sliders)")
        torch.manual_seed(config.seed)  # LoRA initialisation
        self.host = denoiser.sliders
        self.host.add(name, resume, modules=slider_modules(denoiser, config.layers), rank=config.rank,
                      alpha=config.alpha, trainable=True, ends=ends)
        self.params = self.host.parameters(name)
        # under torchrun: gradients averaged across processes
        self.ddp = distributed.wrap(self.params, some_unused=ends == 2)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr)
        self.metadata: Callable[[int], dict[str, str]] = lambda steps: {}  # set by the algorithm
        self.result = TrainResult(weights=SliderWeights({}))

    @property
    def last_good_step(self) -> int:
        """Steps whose update was applied (a diverged step records no loss)."""
        return self.start_step + len(self.result.losses)

    def steps(self) -> Iterator[int]:
        """The step indices still to run, inside gradient checkpointing when asked for."""
        forwards_before = getattr(self.denoiser, "forward_count", 0)
        started = time.perf_counter()
        bar = tqdm(range(self.start_step, self.config.iterations), desc=f"training {self.label} '{self.name}'",
                   disable=not self.progress, leave=False)
        self._bar = bar
        with contextlib.ExitStack() as stack:
            if self.config.gradient_checkpointing:
                if not hasattr(self.denoiser, "gradient_checkpointing"):
                    raise SliderError(f"{type(self.denoiser).__name__} does not support gradient checkpointing")
                stack.enter_context(self.denoiser.gradient_checkpointing())
            yield from bar
        bar.close()
        self.result.seconds = time.perf_counter() - started
        done = self.config.iterations - self.start_step
        self.result.unet_samples_per_iteration = (getattr(self.denoiser, "forward_count", 0) - forwards_before) / done

    def model_call(self, *_) -> None:
        """Progress and cancel from inside a step (e.g. per step of a frozen trajectory)."""
        if self.callback is not None:
            self.callback(self.last_good_step, self.config.iterations, float("nan"))

    def predict(self, *args) -> torch.Tensor:
        """denoiser.predict for the step's trained (slider-on) forward: through DDP when data-parallel."""
        return self.denoiser.predict(*args) if self.ddp is None else self.ddp(self.denoiser.predict, *args)

    def step(self, step: int, loss: torch.Tensor) -> None:
        """Backward and one optimiser step on `loss`; stops (keeping the last good weights) on NaN/inf."""
        if not distributed.all_finite(loss):
            self.stop_diverged(step, "loss")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        if not all(torch.isfinite(p.grad).all() for p in self.params if p.grad is not None):  # the same on every rank
            self.stop_diverged(step, "gradients")
        self.optimizer.step()
        self.result.losses.append(loss.item())
        self._bar.set_postfix(loss=f"{self.result.losses[-1]:.4g}")
        if self.callback is not None:
            self.callback(step + 1, self.config.iterations, self.result.losses[-1])
        every, done = self.config.save_every, step + 1
        if self.checkpoint_path and every and done % every == 0 and done < self.config.iterations:
            self.save(self.checkpoint_path, done)

    def export(self, steps: int) -> SliderWeights:
        """The slider as it is now, with the metadata of `steps` steps."""
        weights = self.host.export(self.name)
        weights.metadata = self.metadata(steps)
        if weights.negative is not None:
            weights.metadata[META_ENDS] = "two"
        return weights

    def save(self, path: str | Path, steps: int) -> None:
        if distributed.is_main():  # data-parallel ranks hold the same weights: one writes
            save_slider(self.export(steps), path)  # atomic

    def stop_diverged(self, step: int, what: str) -> None:
        saved = ""
        if self.checkpoint_path:
            self.save(self.checkpoint_path, self.last_good_step)  # the weights are still the last good step's
            saved = f"; the last good weights (step {self.last_good_step}) are saved in {self.checkpoint_path}"
        self.host.set_scales({})
        raise TrainingDivergedError(f"training diverged at step {step + 1}: the {what} became NaN/inf{saved}. "
                                    "Lower lr (or η for text sliders), or train in float32.")

    def check_effect(self, effect: float) -> None:
        """Record the effect check; a slider that barely moves the output gets a clear warning."""
        self.result.effect = effect
        if effect < WEAK_EFFECT:
            self.result.warning = (f"the slider has almost no effect ({effect:.0%} of its training target at α = 1): "
                                   "train more iterations, raise lr or η, or make the positive and negative "
                                   "prompts differ in the concept")
            log.warning(self.result.warning)

    def finish(self) -> TrainResult:
        self.host.set_scales({})
        self.result.weights = self.export(self.config.iterations)
        if self.checkpoint_path and distributed.is_main():
            save_slider(self.result.weights, self.checkpoint_path)
        return self.result


def run_metadata(family: str, kind: str, config, steps: int, resolution: int, batch: int) -> dict[str, str]:
    """The metadata every slider file carries, whatever trained it (the algorithm adds its own keys)."""
    return {
        META_FAMILY: family,
        "sliders.format": "1",
        "sliders.version": __version__,
        "sliders.kind": kind,
        "sliders.rank": str(config.rank),
        "sliders.alpha": str(config.alpha),
        "sliders.layers": config.layers,
        "sliders.steps": str(steps),
        "sliders.seed": str(config.seed),
        "sliders.resolution": str(resolution),
        "sliders.batch_size": str(batch),
        # kohya-style keys so other UIs show something sensible
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": str(config.alpha),
        **config.to_metadata(),
    }
