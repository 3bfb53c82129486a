"""Textual concept slider training (Gandikota et al., ECCV 2024, §3, eq. 8).

For x_t from the frozen model partially denoising under c_t, the LoRA-on prediction is regressed onto

    ε_target = ε(x_t, c_n, t) + s·η·Σ_p [ ε(x_t, c+ ⊕ p, t) − ε(x_t, c- ⊕ p, t) ]

(c_n the neutral prompt, usually c_t; s = +1 enhance, −1 erase), with every preservation attribute p
summed in every step. All frozen predictions of a step share one batched forward; x_t is drawn from
a recorded frozen trajectory that is reused for `trajectory_reuse` iterations, and each state is
trained at exactly the noise level it sits at.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import __version__
from .config import TrainConfig, preset_modules
from .denoiser import Cond, Denoiser, Trajectory
from .errors import SliderError, TrainingDivergedError
from .formats import save_slider
from .prompts import PromptPair
from .slider_weights import META_FAMILY, SliderWeights

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int, float], None]  # (step done, total, loss); may raise to cancel


def slider_target(eps_neutral: torch.Tensor, eps_plus: torch.Tensor, eps_minus: torch.Tensor,
                  eta: float, sign: float) -> torch.Tensor:
    """Eq. 8. eps_plus/eps_minus are stacked over preservation attributes: [P, B, ...]."""
    return eps_neutral.float() + sign * eta * (eps_plus.float() - eps_minus.float()).sum(dim=0)


@dataclass
class _EncodedPair:
    pair: PromptPair
    eta: float
    target: Cond  # c_t, for x_t and for the LoRA-on prediction
    frozen: Cond  # [c_n, c+⊕p_1..P, c-⊕p_1..P] for the one batched frozen forward
    n_attrs: int
    trajectory: Trajectory | None = None
    uses: int = 0


def frozen_target(denoiser: Denoiser, item: _EncodedPair, x_t: torch.Tensor, level: torch.Tensor,
                  eps_neutral: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 8 target at (x_t, level): every frozen prediction of the step in one batched forward.
    `eps_neutral`, when given, is ε(x_t, c_n) already computed (the trajectory's own output at x_t)."""
    prompts = item.frozen if eps_neutral is None else Cond({k: v[1:] for k, v in item.frozen.tensors.items()})
    batch, n_prompts = x_t.shape[0], len(prompts)
    with torch.no_grad(), denoiser.sliders.disabled():
        eps = denoiser.predict(x_t.repeat(n_prompts, *[1] * (x_t.dim() - 1)), level.repeat(n_prompts),
                               prompts.repeat_each(batch))
    eps = eps.view(n_prompts, batch, *eps.shape[1:])
    if eps_neutral is not None:
        eps = torch.cat([eps_neutral.float()[None], eps])
    return slider_target(eps[0], eps[1:1 + item.n_attrs], eps[1 + item.n_attrs:], item.eta, item.pair.sign)


def encode_pair(denoiser: Denoiser, pair: PromptPair, eta: float | None = None) -> _EncodedPair:
    plus, minus = pair.contrast_prompts()
    return _EncodedPair(
        pair=pair, eta=eta if eta is not None else pair.eta, target=denoiser.encode([pair.target]),
        frozen=denoiser.encode([pair.neutral_prompt, *plus, *minus]), n_attrs=len(plus))


@dataclass
class TrainResult:
    weights: SliderWeights
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    unet_samples_per_iteration: float = 0.0  # single-image UNet forwards (no backward) per iteration


def slider_modules(denoiser: Denoiser, layers: str) -> list[str]:
    return preset_modules(denoiser.sliders.lora_candidates(), layers)


def train_text_slider(
    denoiser: Denoiser,
    pairs: Sequence[PromptPair],
    config: TrainConfig,
    *,
    name: str = "slider",
    resume: SliderWeights | None = None,
    checkpoint_path: str | Path | None = None,
    callback: StepCallback | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train one slider on `denoiser`; returns its weights (with metadata). The slider stays attached."""
    config.validate()
    if not pairs:
        raise SliderError("no prompt pairs to train on")
    resolution = config.resolution or pairs[0].resolution or denoiser.default_resolution
    batch = config.batch_size or pairs[0].batch_size or 1
    start_step = int(resume.metadata.get("sliders.steps", 0)) if resume is not None else 0
    if start_step >= config.iterations:
        raise SliderError(f"the slider to resume already has {start_step} steps ≥ iterations={config.iterations}")

    torch.manual_seed(config.seed)  # LoRA initialisation
    noise_gen = torch.Generator().manual_seed(config.seed)
    step_rng = random.Random(config.seed)
    host = denoiser.sliders
    host.add(name, resume, modules=slider_modules(denoiser, config.layers), rank=config.rank,
             alpha=config.alpha, trainable=True)
    params = host.parameters(name)
    optimizer = torch.optim.AdamW(params, lr=config.lr)

    empty = denoiser.encode([""])
    encoded = [encode_pair(denoiser, pair, config.eta) for pair in pairs]
    if hasattr(denoiser, "offload_text_encoders"):
        denoiser.offload_text_encoders()  # every prompt is encoded: free accelerator memory for the UNet

    def metadata(steps: int) -> dict[str, str]:
        return slider_metadata(denoiser.family, pairs, config, steps, resolution, batch,
                               [e.eta for e in encoded])

    result = TrainResult(weights=SliderWeights({}))
    forwards_before = getattr(denoiser, "forward_count", 0)
    started = time.perf_counter()
    last_good_step = start_step
    steps = range(start_step, config.iterations)
    bar = tqdm(steps, desc=f"training slider '{name}'", disable=not progress, leave=False)
    with contextlib.ExitStack() as stack:
        if config.gradient_checkpointing:
            if not hasattr(denoiser, "gradient_checkpointing"):
                raise SliderError(f"{type(denoiser).__name__} does not support gradient checkpointing")
            stack.enter_context(denoiser.gradient_checkpointing())
        for step in bar:
            item = encoded[step % len(encoded)]
            if item.trajectory is None or item.uses >= config.trajectory_reuse:
                noise = denoiser.initial_noise(batch, resolution, noise_gen)
                with host.disabled():
                    item.trajectory = denoiser.sample(item.target, empty, guidance=config.trajectory_guidance,
                                                      steps=config.trajectory_steps, noise=noise, record=True)
                item.uses = 0
            item.uses += 1
            k = step_rng.randrange(1, config.trajectory_steps)  # skip pure noise, as the reference does
            x_t, level = item.trajectory.states[k], item.trajectory.levels[k]
            # c_n = c_t (the usual case): the trajectory already predicted ε(x_t, c_t) with the frozen model
            reuse = item.pair.neutral_prompt == item.pair.target and len(item.trajectory.cond_outputs) > k
            target = frozen_target(denoiser, item, x_t, level, item.trajectory.cond_outputs[k] if reuse else None)
            host.set_scales({name: 1.0})
            prediction = denoiser.predict(x_t, level, item.target.repeat_each(batch))
            loss = F.mse_loss(prediction.float(), target)
            if not torch.isfinite(loss):
                stop_diverged(host, name, checkpoint_path, metadata(last_good_step), step, "loss")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            if not all(torch.isfinite(p.grad).all() for p in params if p.grad is not None):
                stop_diverged(host, name, checkpoint_path, metadata(last_good_step), step, "gradients")
            optimizer.step()
            last_good_step = step + 1
            result.losses.append(loss.item())
            bar.set_postfix(loss=f"{result.losses[-1]:.4g}")
            if callback is not None:
                callback(step + 1, config.iterations, result.losses[-1])
            if checkpoint_path and config.save_every and (step + 1) % config.save_every == 0 and step + 1 < config.iterations:
                save_checkpoint(host, name, checkpoint_path, metadata(step + 1))
    bar.close()
    host.set_scales({})
    result.seconds = time.perf_counter() - started
    done = config.iterations - start_step
    result.unet_samples_per_iteration = (getattr(denoiser, "forward_count", 0) - forwards_before) / done
    result.weights = host.export(name)
    result.weights.metadata = metadata(config.iterations)
    if checkpoint_path:
        save_slider(result.weights, checkpoint_path)
    return result


def save_checkpoint(host, name: str, path: str | Path, metadata: dict[str, str]) -> None:
    """Write the slider as it is now (atomic), with the given metadata."""
    weights = host.export(name)
    weights.metadata = metadata
    save_slider(weights, path)


def stop_diverged(host, name, checkpoint_path, metadata, step, what) -> None:
    saved = ""
    if checkpoint_path:
        save_checkpoint(host, name, checkpoint_path, metadata)  # the weights are still those of the last good step
        saved = f"; the last good weights (step {metadata['sliders.steps']}) are saved in {checkpoint_path}"
    host.set_scales({})
    raise TrainingDivergedError(
        f"training diverged at step {step + 1}: the {what} became NaN/inf{saved}. "
        "Lower lr or η, or train in float32.")


def slider_metadata(family: str, pairs: Sequence[PromptPair], config: TrainConfig, steps: int,
                    resolution: int, batch: int, etas: Sequence[float]) -> dict[str, str]:
    meta = {
        META_FAMILY: family,
        "sliders.format": "1",
        "sliders.version": __version__,
        "sliders.kind": "text",
        "sliders.prompts": json.dumps([p.to_dict() for p in pairs]),
        "sliders.eta": json.dumps(list(etas)),
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
    }
    meta.update(config.to_metadata())
    return meta


__all__ = ["train_text_slider", "slider_target", "TrainResult", "slider_modules", "slider_metadata"]
