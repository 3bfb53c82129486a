"""Visual (image-pair) concept sliders (Gandikota et al., ECCV 2024, §3.3).

For a pair (A = less of the concept, B = more) of the same subject, at strength s:

    z_A, z_B = E(A), E(B);   ε ~ N(0, I) and level t shared by both
    loss = ‖ε_{θ − sΔθ}(x_t(z_A, ε), c, t) − target(z_A, ε, t)‖² + ‖ε_{θ + sΔθ}(x_t(z_B, ε), c, t) − target(z_B, ε, t)‖²

so the slider at −s denoises towards A and at +s towards B; what A and B share cancels out, and
the LoRA learns only their difference. `target` is the backend's native training target (ε, v,
or the flow velocity). c is the pair's caption when the pairs have them, else one prompt for all:
a slider learns its push under the condition it is trained on, and captions that describe each
pair (all but the concept) carry it to other prompts better than the empty prompt (README).
The two signs need two forwards: a slider has one scale per forward on both backends (peft
scaling, ComfyUI weight wrappers), so a batch cannot mix −s and +s.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import PairTrainConfig
from .denoiser import Denoiser
from .errors import SliderError
from .image_pairs import ImagePairs
from .slider_weights import SliderWeights
from .training import SliderRun, StepCallback, TrainResult, run_metadata


@dataclass
class PairStep:
    """What one step draws; kept so tests can check that A and B really share noise and level."""

    index: list[int]
    strength: float  # every pair of a step has this strength (the LoRA scale is one number per forward)
    noise: torch.Tensor
    level: torch.Tensor


def pair_losses(denoiser: Denoiser, name: str, z_a: torch.Tensor, z_b: torch.Tensor, step: PairStep,
                cond) -> tuple[torch.Tensor, torch.Tensor]:
    """MSE of the slider at −s on A's noisy latents and at +s on B's, with one noise and level for both."""
    losses = []
    for z, sign in ((z_a, -1.0), (z_b, 1.0)):
        x_t = denoiser.add_noise(z, step.noise, step.level)
        target = denoiser.training_target(z, step.noise, step.level)
        denoiser.sliders.set_scales({name: sign * step.strength})
        losses.append(F.mse_loss(denoiser.predict(x_t, step.level, cond).float(), target.float()))
    return losses[0], losses[1]


def train_pair_slider(
    denoiser: Denoiser,
    pairs: ImagePairs,
    config: PairTrainConfig,
    *,
    prompt: str = "",
    name: str = "slider",
    resume: SliderWeights | None = None,
    checkpoint_path: str | Path | None = None,
    callback: StepCallback | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train one slider from image pairs; returns its weights (with metadata). The slider stays attached."""
    config.validate()
    config = config.with_layers_for(denoiser.sliders.lora_candidates())
    if len(pairs) == 0:
        raise SliderError("no image pairs to train on")
    run = SliderRun(denoiser, name, config, resume=resume, checkpoint_path=checkpoint_path, callback=callback,
                    progress=progress, label="pair slider")
    gen = torch.Generator().manual_seed(config.seed)  # noise and levels: the full 64-bit seed space
    order = random.Random(config.seed)
    with torch.no_grad():
        z_a, z_b = denoiser.encode_images(pairs.a), denoiser.encode_images(pairs.b)
    # one condition per distinct prompt, encoded once; each pair indexes its own
    pair_prompts = pairs.prompts or [prompt] * len(pairs)
    distinct = sorted(set(pair_prompts))
    conds = denoiser.encode(distinct)
    row = {p: i for i, p in enumerate(distinct)}
    cond_of_pair = [row[p] for p in pair_prompts]
    if hasattr(denoiser, "offload_text_encoders"):
        denoiser.offload_text_encoders()
    run.metadata = lambda steps: pair_metadata(denoiser.family, config, steps, prompt, pairs)
    # pairs of one strength share a step (the LoRA scale is one number per forward)
    by_strength: dict[float, list[int]] = {}
    for i, s in enumerate(pairs.strengths):
        by_strength.setdefault(s, []).append(i)
    # resuming replays the draws of the steps already done, so it sees what an uninterrupted run would
    for _ in range(run.start_step):
        draw_step(denoiser, by_strength, z_a, config.batch_size, gen, order)

    for step in run.steps():
        drawn = draw_step(denoiser, by_strength, z_a, config.batch_size, gen, order)
        loss_a, loss_b = pair_losses(denoiser, name, z_a[drawn.index], z_b[drawn.index], drawn,
                                     conds.take([cond_of_pair[i] for i in drawn.index]))
        run.step(step, loss_a + loss_b)  # the reference accumulates both gradients before one step
    return run.finish()


def draw_step(denoiser: Denoiser, by_strength: dict[float, list[int]], latents: torch.Tensor, batch: int,
              gen: torch.Generator, order: random.Random) -> PairStep:
    """A strength level, `batch` of its pairs, one noise per pair and one level per pair, shared by A and B."""
    strength = order.choice(sorted(by_strength))
    index = order.sample(by_strength[strength], min(batch, len(by_strength[strength])))
    noise = torch.randn((len(index), *latents.shape[1:]), generator=gen).to(latents.device)
    level = denoiser.random_levels(len(index), gen)
    return PairStep(index=index, strength=strength, noise=noise, level=level)


def pair_metadata(family: str, config: PairTrainConfig, steps: int, prompt: str, pairs: ImagePairs) -> dict[str, str]:
    captions = {"sliders.captions": json.dumps(pairs.prompts[:50])} if pairs.prompts else {}
    return {**run_metadata(family, "pairs", config, steps, pairs.a.shape[1], config.batch_size),
            "sliders.prompt": prompt, **captions,
            "sliders.pairs": json.dumps({"count": len(pairs), "names": pairs.names[:50],
                                         "strengths": sorted(set(pairs.strengths))})}


__all__ = ["train_pair_slider", "pair_losses", "draw_step", "PairStep", "pair_metadata"]
