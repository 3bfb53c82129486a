"""Textual concept slider training (Gandikota et al., ECCV 2024, §3, eq. 8).

For x_t from the frozen model partially denoising under c_t, the LoRA-on prediction is regressed onto

    ε_target = ε(x_t, c_n, t) + s·η·mean_p [ ε(x_t, c+ ⊕ p, t) − ε(x_t, c- ⊕ p, t) ]

(c_n the neutral prompt, usually c_t; s = +1 enhance, −1 erase), with every preservation attribute p
in every step. The paper writes a sum over p; the reference samples one p per step, which is the mean
in expectation, so η keeps the reference's scale whatever the number of attributes (`preservation_reduce`
= "sum" is the paper's literal form). All frozen predictions of a step share one batched forward; x_t is
drawn from a recorded frozen trajectory that is reused for `trajectory_reuse` iterations (a state drawn
again reuses its frozen predictions), and each state is trained at exactly the noise level it sits at.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import distributed
from .config import TrainConfig
from .denoiser import Cond, Denoiser, Trajectory
from .errors import SliderError
from .prompts import PromptPair, compose
from .slider_weights import SliderWeights
from .training import SliderRun, StepCallback, TrainResult, run_metadata, slider_modules


def slider_target(eps_neutral: torch.Tensor, eps_plus: torch.Tensor, eps_minus: torch.Tensor,
                  eta: float, sign: float, reduce: str = "mean", held: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 8. eps_plus/eps_minus are stacked over preservation attributes: [P, B, ...]. `held`, when
    given, [P, B, ...]: directions the push must not move along (project_preservation)."""
    push = eps_plus.float() - eps_minus.float()
    push = push.mean(dim=0) if reduce == "mean" else push.sum(dim=0)
    if held is not None:
        push = without_directions(push, held.float())
    return eps_neutral.float() + sign * eta * push


def without_directions(push: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """push [B, ...] minus its least-squares fit on directions [P, B, ...], sample by sample: what is left
    is orthogonal to every direction (a zero or repeated direction removes nothing more)."""
    d = directions.flatten(2).transpose(0, 1)  # [B, P, N]
    p = push.flatten(1).unsqueeze(-1)  # [B, N, 1]
    coefficients = torch.linalg.pinv(d @ d.transpose(1, 2), hermitian=True) @ (d @ p)
    return (p - d.transpose(1, 2) @ coefficients).view_as(push)


@dataclass
class _EncodedPair:
    pair: PromptPair
    eta: float
    negative_eta: float | None  # η of the −1 steps; None: eta
    target: Cond  # c_t, for x_t and for the LoRA-on prediction
    frozen: Cond  # [c_n, c+⊕p_1..P, c-⊕p_1..P(, c_n⊕p_1..P when projecting)] for the one batched frozen forward
    n_attrs: int
    project: bool = False  # the push loses its component along ε(c_n⊕p) − ε(c_n) for every p
    reduce: str = "mean"  # over the preservation attributes: "mean" or "sum"
    # contrast="ends": per direction (±1), [c_n, c±⊕p_1..P, c_n⊕p_1..P]: each end against the neutral prompt
    frozen_ends: dict[float, Cond] | None = None
    trajectory_prompts: list[tuple[str, Cond]] = field(default_factory=list)  # cycled per trajectory
    trajectory: Trajectory | None = None
    trajectory_prompt: str = ""
    # frozen predictions at the current trajectory's states, by (state index, direction): a state drawn
    # again (≈ 1 in 4 draws at 20 uses of 29 states) costs no frozen forward; cleared with the trajectory
    frozen_outputs: dict = field(default_factory=dict)
    uses: int = 0
    refreshes: int = 0


def frozen_target(denoiser: Denoiser, item: _EncodedPair, x_t: torch.Tensor, level: torch.Tensor,
                  eps_neutral: torch.Tensor | None = None, scale: float = 1.0, state: int | None = None) -> torch.Tensor:
    """Eq. 8 target at (x_t, level) for the LoRA at `scale` (±1): every frozen prediction of the step in
    one batched forward. `eps_neutral`, when given, is ε(x_t, c_n) already computed (the trajectory's
    own output at x_t). `state`, when given, is x_t's index in item's trajectory: its frozen predictions
    are kept for the next time that state is drawn."""
    direction = item.pair.sign * scale
    frozen = item.frozen if item.frozen_ends is None else item.frozen_ends[direction]
    prompts = frozen if eps_neutral is None else Cond({k: v[1:] for k, v in frozen.tensors.items()})
    batch, n_prompts = x_t.shape[0], len(prompts)

    def predict() -> torch.Tensor:
        with torch.no_grad(), denoiser.sliders.disabled():
            return denoiser.predict(repeat(x_t, n_prompts), level.repeat(n_prompts), prompts.repeat_each(batch))

    key = None if state is None else (state, direction if item.frozen_ends is not None else 0.0, eps_neutral is None)
    eps = cached(item.frozen_outputs, key, predict)
    eps = eps.view(n_prompts, batch, *eps.shape[1:])
    if eps_neutral is not None:
        eps = torch.cat([eps_neutral.float()[None], eps])
    # "ends" stacks [c±⊕p, c_n⊕p]: the end the LoRA moves to, against the neutral prompt
    p = item.n_attrs
    held = None
    if item.project:  # c_n⊕p: the second stack with "ends", appended after c-⊕p with "pair"
        held = (eps[1 + p:1 + 2 * p] if item.frozen_ends is not None else eps[1 + 2 * p:]) - eps[0]
    eta = item.negative_eta if scale < 0 and item.negative_eta is not None else item.eta
    return slider_target(eps[0], eps[1:1 + p], eps[1 + p:1 + 2 * p], eta,
                         direction if item.frozen_ends is None else 1.0, item.reduce, held=held)


def cached(cache: dict, key, compute):
    """cache[key], computed once; key None: computed and not kept."""
    if key is None:
        return compute()
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def encode_pair(denoiser: Denoiser, pair: PromptPair, eta: float | None = None,
                trajectory_prompts: str = "target", contrast: str = "pair", reduce: str = "mean",
                project: bool = False, negative_eta: float | None = None) -> _EncodedPair:
    plus, minus = pair.contrast_prompts()
    neutral = [compose(pair.neutral_prompt, p) for p in pair.preservation or (None,)]
    if project and not pair.preservation:
        raise SliderError(f"project_preservation needs preservation attributes: the pair {pair.positive!r} / "
                          f"{pair.negative!r} has none (add a preservation list, or leave the option off)")
    ends = None if contrast == "pair" else {
        1.0: denoiser.encode([pair.neutral_prompt, *plus, *neutral]),
        -1.0: denoiser.encode([pair.neutral_prompt, *minus, *neutral])}
    target = denoiser.encode([pair.target])
    sampled = [pair.target] if trajectory_prompts == "target" or not pair.preservation else [
        compose(pair.target, p) for p in pair.preservation]
    return _EncodedPair(
        pair=pair, eta=eta if eta is not None else pair.eta, negative_eta=negative_eta, target=target,
        frozen=denoiser.encode([pair.neutral_prompt, *plus, *minus, *(neutral if project and ends is None else ())]),
        n_attrs=len(plus), frozen_ends=ends, reduce=reduce, project=project,
        trajectory_prompts=[(text, target if text == pair.target else denoiser.encode([text])) for text in sampled])


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
    config = config.with_layers_for(denoiser.sliders.lora_candidates())
    if not pairs:
        raise SliderError("no prompt pairs to train on")
    resolution = config.resolution or pairs[0].resolution or denoiser.default_resolution
    batch = config.batch_size or pairs[0].batch_size or 1
    run = SliderRun(denoiser, name, config, resume=resume, checkpoint_path=checkpoint_path, callback=callback,
                    progress=progress, ends=2 if config.signs == "separate" else 1)
    share = distributed.batch_share(batch)  # data-parallel: this process's samples of the batch (all in one process)
    noise_gen = torch.Generator().manual_seed(config.seed)
    step_rng = random.Random(config.seed)
    host = denoiser.sliders

    empty = denoiser.encode([""])
    encoded = [encode_pair(denoiser, pair, config.eta, config.trajectory_prompts, config.contrast,
                           config.preservation_reduce, config.project_preservation, config.negative_eta)
               for pair in pairs]
    anchors = denoiser.encode(list(config.anchors)) if config.anchors else None
    if hasattr(denoiser, "offload_text_encoders"):
        denoiser.offload_text_encoders()  # every prompt is encoded: free accelerator memory for the UNet
    run.metadata = lambda steps: slider_metadata(denoiser.family, pairs, config, steps, resolution, batch,
                                                 [e.eta for e in encoded])
    # trajectory indices x_t is drawn from; index 0 (pure noise) is skipped, as the reference does
    first = max(1, round(config.level_range[0] * config.trajectory_steps))
    last = max(first + 1, round(config.level_range[1] * config.trajectory_steps))

    # signs="both": the LoRA alternates between +1 and −1, each with its own eq. 8 target ("separate":
    # the same, the host running the two-ended slider's second LoRA at −1); with x_t drawn with the
    # slider on, per trajectory, so every x_t comes from the sign it trains
    both = config.signs != "plus"
    for step in run.steps():
        item = encoded[step % len(encoded)]
        refresh = item.trajectory is None or item.uses >= config.trajectory_reuse
        if both and config.trajectory_slider:
            trajectory_index = item.refreshes if refresh else item.refreshes - 1
            scale = -1.0 if trajectory_index % 2 else 1.0
        else:
            scale = -1.0 if both and (step // len(encoded)) % 2 else 1.0
        if refresh:
            noise = denoiser.initial_noise(batch, resolution, noise_gen)
            draw_trajectory(denoiser, item, config, empty, noise, name if config.trajectory_slider else None, scale,
                            run.model_call)
        item.uses += 1
        k = step_rng.randrange(first, last)
        # data-parallel: every rank draws the whole batch's trajectory (a stochastic sampler's noise then
        # matches one process's) and trains on its share of it
        x_t, level = item.trajectory.states[k][share], item.trajectory.levels[k][share]
        # c_n = the frozen trajectory's prompt (the usual case): it already predicted ε(x_t, c_n)
        reuse = (item.pair.neutral_prompt == item.trajectory_prompt and not config.trajectory_slider
                 and len(item.trajectory.cond_outputs) > k)
        target = frozen_target(denoiser, item, x_t, level, item.trajectory.cond_outputs[k][share] if reuse else None,
                               scale, state=k)
        if anchors is None:
            host.set_scales({name: scale})
            loss = F.mse_loss(run.predict(x_t, level, item.target.repeat_each(x_t.shape[0])).float(), target)
        else:
            loss = anchored_loss(denoiser, item, anchors, x_t, level, target, name, scale, config.anchor_weight, k,
                                 run.predict)
        run.step(step, loss)
    run.check_effect(slider_effect(denoiser, encoded, empty, name, batch, resolution, config, noise_gen))
    return run.finish()


def draw_trajectory(denoiser: Denoiser, item: _EncodedPair, config: TrainConfig, empty: Cond, noise: torch.Tensor,
                    slider: str | None, scale: float, callback) -> None:
    """A fresh recorded trajectory for `item`, under its next trajectory prompt (c_t, or c_t ⊕ p in turn),
    from the frozen model, or with `slider` on at `scale` (the reference's loop)."""
    item.trajectory_prompt, cond = item.trajectory_prompts[item.refreshes % len(item.trajectory_prompts)]
    with contextlib.ExitStack() as stack:
        if slider is None:
            stack.enter_context(denoiser.sliders.disabled())
        else:
            denoiser.sliders.set_scales({slider: scale})
        item.trajectory = denoiser.sample(cond, empty, guidance=config.trajectory_guidance,
                                          steps=config.trajectory_steps, noise=noise, record=True, callback=callback)
    item.uses, item.refreshes = 0, item.refreshes + 1
    item.frozen_outputs.clear()


def anchored_loss(denoiser: Denoiser, item: _EncodedPair, anchors: Cond, x_t: torch.Tensor, level: torch.Tensor,
                  target: torch.Tensor, name: str, scale: float, weight: float, state: int | None = None,
                  trained_predict=None) -> torch.Tensor:
    """The eq. 8 loss plus `weight` × the change the slider makes to each anchor prompt's prediction
    (as ai-toolkit's anchors), with c_t and the anchors in one LoRA-on forward."""
    batch, n = x_t.shape[0], 1 + len(anchors)

    def predict() -> torch.Tensor:
        with torch.no_grad(), denoiser.sliders.disabled():
            return denoiser.predict(repeat(x_t, n - 1), level.repeat(n - 1), anchors.repeat_each(batch)).float()

    frozen = cached(item.frozen_outputs, None if state is None else (state, "anchors"), predict)
    denoiser.sliders.set_scales({name: scale})
    prediction = (trained_predict or denoiser.predict)(repeat(x_t, n), level.repeat(n),
                                  Cond.cat([item.target.repeat_each(batch), anchors.repeat_each(batch)])).float()
    return F.mse_loss(prediction[:batch], target) + weight * F.mse_loss(prediction[batch:], frozen)


def repeat(x: torch.Tensor, n: int) -> torch.Tensor:
    """[B, ...] → [n·B, ...], prompt-major, matching `Cond.repeat_each`."""
    return x.repeat(n, *[1] * (x.dim() - 1))


@torch.no_grad()
def slider_effect(denoiser: Denoiser, encoded: Sequence[_EncodedPair], empty: Cond, name: str, batch: int,
                  resolution: int, config: TrainConfig, noise_gen: torch.Generator, n_states: int = 4) -> float:
    """Share of the eq. 8 push the slider delivers, on states of a fresh trajectory per prompt pair:
    ⟨Δ, push⟩ / ‖push‖², Δ = ε_slider(x_t, c_t) − ε(x_t, c_t), push = target − ε(x_t, c_n). The trained
    objective makes it 1; 0 is no effect. At α = 1; for a two-ended slider, the weaker of its ends."""
    host = denoiser.sliders
    scales = (1.0, -1.0) if config.signs == "separate" else (1.0,)
    dot, norm = dict.fromkeys(scales, 0.0), dict.fromkeys(scales, 0.0)
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
            for scale in scales:
                push = frozen_target(denoiser, item, x_t, level, eps_neutral, scale) - eps_neutral
                host.set_scales({name: scale})
                delta = denoiser.predict(x_t, level, c) - base
                host.set_scales({})
                dot[scale] += float((delta * push).sum())
                norm[scale] += float(push.pow(2).sum())
    return min(dot[s] / norm[s] if norm[s] > 0 else 0.0 for s in scales)


def slider_metadata(family: str, pairs: Sequence[PromptPair], config: TrainConfig, steps: int,
                    resolution: int, batch: int, etas: Sequence[float]) -> dict[str, str]:
    return {**run_metadata(family, "text", config, steps, resolution, batch),
            "sliders.prompts": json.dumps([p.to_dict() for p in pairs]),
            "sliders.eta": json.dumps(list(etas))}


__all__ = ["train_text_slider", "slider_target", "TrainResult", "StepCallback", "slider_modules", "slider_metadata"]
