"""SliderSpace (Gandikota et al., 2025): discover a model's sliders from one concept prompt.

For one concept ("a shape") the frozen model generates many images; an image embedder maps them to
unit vectors; the principal directions of those embeddings are what the model varies for that
concept, and each becomes a slider trained so that switching it on moves the embedding along its
direction.

Training slider j (one after another): a stored image is noised to a random level; the model
predicts the clean image with the slider off and on; both are decoded and embedded, and the loss
1 − cos(f_on − f_off, PC_j) turns the change the slider makes towards its direction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from .config import BatchedRunOptions
from .denoiser import Cond, Denoiser
from .errors import SliderError
from .training import SliderRun, StepCallback, TrainResult, run_metadata


@runtime_checkable
class ImageEmbedder(Protocol):
    """Images [B, H, W, 3] in 0..1 → unit embeddings [B, D], differentiable (sliders train through it)."""

    def embed(self, images: torch.Tensor) -> torch.Tensor: ...


@dataclass
class ConceptImages:
    """What the frozen model made for the concept: latents (to noise for training), decoded images,
    and the prompt and seed of each, so a run can be reproduced and reported."""

    latents: torch.Tensor
    images: torch.Tensor
    prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)


@torch.no_grad()
def generate_concept_images(denoiser: Denoiser, concept: str, count: int, *, variations: Sequence[str] = (),
                            seed: int = 0, steps: int = 25, guidance: float = 3.0, batch: int = 16,
                            resolution: int | None = None) -> ConceptImages:
    """`count` images of the concept with the frozen model, cycling through the prompt variations
    (the concept itself when none are given). Image i starts from the noise of seed `seed + i`; a
    stochastic sampler's step noise comes from one generator per batch, so the same arguments give
    the same images."""
    if not concept.strip():
        raise SliderError("the concept prompt is empty: give what to explore, e.g. 'a dog' or 'a shape'")
    if count < 2:
        raise SliderError(f"SliderSpace needs at least 2 images, got {count}")
    prompts = [p for p in variations if p.strip()] or [concept]
    resolution = resolution or denoiser.default_resolution
    uncond = denoiser.encode([""])
    latents, all_prompts, seeds = [], [], []
    for start in range(0, count, batch):
        chunk = list(range(start, min(count, start + batch)))
        chunk_prompts = [prompts[i % len(prompts)] for i in chunk]
        noise = torch.cat([denoiser.initial_noise(1, resolution, torch.Generator().manual_seed(seed + i))
                           for i in chunk])
        with denoiser.sliders.disabled():
            trajectory = denoiser.sample(denoiser.encode(chunk_prompts), uncond, guidance=guidance, steps=steps,
                                         noise=noise, generator=torch.Generator().manual_seed(seed + start))
        latents.append(trajectory.final.float().cpu())
        all_prompts += chunk_prompts
        seeds += [seed + i for i in chunk]
    latents = torch.cat(latents)
    return ConceptImages(latents=latents, images=denoiser.decode(latents), prompts=all_prompts, seeds=seeds)


def principal_directions(embeddings: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k principal directions of the embeddings [N, D] (rows orthonormal, by variance) and the
    share of the total variance each explains. Each direction's sign is fixed so that its largest
    component is positive, which makes runs comparable."""
    if embeddings.dim() != 2:
        raise SliderError(f"embeddings must be [N, D], got {tuple(embeddings.shape)}")
    n, dim = embeddings.shape
    if not 1 <= k <= min(n - 1, dim):
        raise SliderError(f"K = {k} directions need more than K images and at most {dim} dimensions; "
                          f"there are {n} images: use K ≤ {min(n - 1, dim)} or generate more images")
    centred = embeddings.double() - embeddings.double().mean(dim=0)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    variance = singular**2
    directions = vh[:k]
    signs = torch.sign(directions.gather(1, directions.abs().argmax(dim=1, keepdim=True)))
    return (directions * signs).float(), (variance[:k] / variance.sum()).float()


@dataclass
class SliderSpaceConfig(BatchedRunOptions):
    """Per-direction slider options. The reference trains rank-1 sliders on cross-attention keys and values."""

    rank: int = 1
    alpha: float = 1.0
    lr: float = 1e-2  # on the shapes model 2e-3 aligned the embeddings but barely changed the samples
    iterations: int = 200  # per slider
    layers: str = "xattn_kv"
    seed: int = 0
    batch_size: int = 4
    save_every: int = 0
    max_grad_norm: float = 0.0
    gradient_checkpointing: bool = False


def embedding_change(denoiser: Denoiser, embedder: ImageEmbedder, name: str, latents: torch.Tensor, cond: Cond,
                     gen: torch.Generator, alpha: float = 1.0) -> torch.Tensor:
    """f(x̂0 with slider `name` at α) − f(x̂0 without), for the latents noised to random levels [B, D]."""
    noise = torch.randn(latents.shape, generator=gen).to(latents.device)
    level = denoiser.random_levels(len(latents), gen)
    x_t = denoiser.add_noise(latents, noise, level)
    clean = denoiser.ddim_levels(1)[-1:].expand(len(latents))  # the clean end of a DDIM step
    c = cond.repeat_each(len(latents))
    with torch.no_grad():
        denoiser.sliders.set_scales({})
        base = embedder.embed(denoiser.decode(denoiser.ddim_step(x_t, denoiser.predict(x_t, level, c), level, clean),
                                              differentiable=True))
    denoiser.sliders.set_scales({name: alpha})
    moved = denoiser.ddim_step(x_t, denoiser.predict(x_t, level, c), level, clean)
    return embedder.embed(denoiser.decode(moved, differentiable=True)) - base


def train_sliderspace(denoiser: Denoiser, embedder: ImageEmbedder, images: ConceptImages, directions: torch.Tensor,
                      explained: torch.Tensor, concept: str, config: SliderSpaceConfig, *, name: str = "direction",
                      checkpoint_dir: str | Path | None = None, callback: StepCallback | None = None,
                      progress: bool = True) -> list[TrainResult]:
    """One slider per direction, trained one after another and left attached as `<name>_<j>`."""
    config.validate()
    if len(directions) != len(explained):
        raise SliderError(f"{len(directions)} directions but {len(explained)} explained variances")
    cond = denoiser.encode([concept])
    latents = images.latents.to(next(iter(cond.tensors.values())).device)
    results = []
    for j, direction in enumerate(directions):
        slider = f"{name}_{j}"
        path = Path(checkpoint_dir) / f"{slider}.safetensors" if checkpoint_dir else None
        run = SliderRun(denoiser, slider, config, checkpoint_path=path, callback=callback, progress=progress,
                        label=f"SliderSpace direction {j}")
        run.metadata = lambda steps, j=j: {
            **run_metadata(denoiser.family, "sliderspace", config, steps, int(images.images.shape[1]),
                           config.batch_size),
            "sliders.concept": concept, "sliders.direction": str(j),
            "sliders.explained_variance": f"{float(explained[j]):.6g}", "sliders.images": str(len(latents))}
        gen = torch.Generator().manual_seed(config.seed * 1000 + j)
        target = direction.to(latents.device).float()
        for step in run.steps():
            pick = torch.randint(len(latents), (config.batch_size,), generator=gen)
            change = embedding_change(denoiser, embedder, slider, latents[pick], cond, gen)
            run.step(step, 1 - F.cosine_similarity(change, target[None], dim=1).mean())
        results.append(run.finish())
    return results


__all__ = ["ImageEmbedder", "ConceptImages", "SliderSpaceConfig", "generate_concept_images", "principal_directions",
           "embedding_change", "train_sliderspace"]
