"""Textual concept slider training (Gandikota et al., ECCV 2024, §3, eq. 8).

For x_t from the frozen model partially denoising under c_t, the LoRA-on prediction is regressed onto

    ε_target = ε(x_t, c_n, t) + s·η·Σ_p [ ε(x_t, c+ ⊕ p, t) − ε(x_t, c- ⊕ p, t) ]

(c_n the neutral prompt, usually c_t; s = +1 enhance, −1 erase), with every preservation attribute p
summed in every step. All frozen predictions of a step share one batched forward; x_t is drawn from
a recorded frozen trajectory that is reused for `trajectory_reuse` iterations, and each state is
trained at exactly the noise level it sits at.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .denoiser import Cond, Denoiser, Trajectory
from .errors import SliderError
from .prompts import PromptPair
from .slider_weights import SliderWeights
from .training import SliderRun, StepCallback, TrainResult, run_metadata, slider_modules


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
    run = SliderRun(denoiser, name, config, resume=resume,
                    checkpoint_path=checkpoint_path, callback=callback, progress=progress)
    noise_gen = torch.Generator().manual_seed(config.seed)
    step_rng = random.Random(config.seed)
    host = denoiser.sliders

    empty = denoiser.encode([""])
    encoded = [encode_pair(denoiser, pair, config.eta) for pair in pairs]
    if hasattr(denoiser, "offload_text_encoders"):
        denoiser.offload_text_encoders()  # every prompt is encoded: free accelerator memory for the UNet
    run.metadata = lambda steps: slider_metadata(denoiser.family, pairs, config, steps, resolution, batch,
                                                 [e.eta for e in encoded])

    for step in run.steps():
        item = encoded[step % len(encoded)]
        if item.trajectory is None or item.uses >= config.trajectory_reuse:
            noise = denoiser.initial_noise(batch, resolution, noise_gen)
            with host.disabled():
                item.trajectory = denoiser.sample(item.target, empty, guidance=config.trajectory_guidance,
                                                  steps=config.trajectory_steps, noise=noise, record=True,
                                                  callback=run.model_call)
            item.uses = 0
        item.uses += 1
        k = step_rng.randrange(1, config.trajectory_steps)  # skip pure noise, as the reference does
        x_t, level = item.trajectory.states[k], item.trajectory.levels[k]
        # c_n = c_t (the usual case): the trajectory already predicted ε(x_t, c_t) with the frozen model
        reuse = item.pair.neutral_prompt == item.pair.target and len(item.trajectory.cond_outputs) > k
        target = frozen_target(denoiser, item, x_t, level, item.trajectory.cond_outputs[k] if reuse else None)
        host.set_scales({name: 1.0})
        prediction = denoiser.predict(x_t, level, item.target.repeat_each(batch))
        run.step(step, F.mse_loss(prediction.float(), target))
    run.check_effect(slider_effect(denoiser, encoded, empty, name, batch, resolution, config, noise_gen))
    return run.finish()


@torch.no_grad()
def slider_effect(denoiser: Denoiser, encoded: Sequence[_EncodedPair], empty: Cond, name: str, batch: int,
                  resolution: int, config: TrainConfig, noise_gen: torch.Generator, n_states: int = 4) -> float:
    """Share of the eq. 8 push the slider delivers, on states of a fresh trajectory per prompt pair:
    ⟨Δ, push⟩ / ‖push‖², Δ = ε_slider(x_t, c_t) − ε(x_t, c_t), push = target − ε(x_t, c_n). The trained
    objective makes it 1; 0 is no effect."""
    host = denoiser.sliders
    dot = norm = 0.0
    for item in encoded:
        noise = denoiser.initial_noise(batch, resolution, noise_gen)
        with host.disabled():
            trajectory = denoiser.sample(item.target, empty, guidance=config.trajectory_guidance,
                                         steps=config.trajectory_steps, noise=noise, record=True)
        for k in torch.linspace(1, config.trajectory_steps - 1, n_states).round().long().tolist():
            x_t, level = trajectory.states[k], trajectory.levels[k]
            c = item.target.repeat_each(batch)
            neutral = Cond({key: v[:1] for key, v in item.frozen.tensors.items()}).repeat_each(batch)
            with host.disabled():
                base = denoiser.predict(x_t, level, c)
                eps_neutral = base if item.pair.neutral_prompt == item.pair.target else denoiser.predict(
                    x_t, level, neutral)
            push = frozen_target(denoiser, item, x_t, level, eps_neutral) - eps_neutral
            host.set_scales({name: 1.0})
            delta = denoiser.predict(x_t, level, c) - base
            host.set_scales({})
            dot += float((delta * push).sum())
            norm += float(push.pow(2).sum())
    return dot / norm if norm > 0 else 0.0


def slider_metadata(family: str, pairs: Sequence[PromptPair], config: TrainConfig, steps: int,
                    resolution: int, batch: int, etas: Sequence[float]) -> dict[str, str]:
    return {**run_metadata(family, "text", config, steps, resolution, batch),
            "sliders.prompts": json.dumps([p.to_dict() for p in pairs]),
            "sliders.eta": json.dumps(list(etas))}


__all__ = ["train_text_slider", "slider_target", "TrainResult", "StepCallback", "slider_modules", "slider_metadata"]
