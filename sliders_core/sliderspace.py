"""SliderSpace (Gandikota et al., 2025): discover a model's sliders from one concept prompt.

For one concept ("a shape") the frozen model generates many images; an image embedder maps them to
unit vectors; the principal directions of those embeddings are what the model varies for that
concept, and each becomes a slider trained so that switching it on moves the embedding along its
direction.

This module holds the discovery half so far: the concept images and their principal directions.
The per-direction slider training is not built yet (see the issue notes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from .denoiser import Denoiser
from .errors import SliderError


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


__all__ = ["ImageEmbedder", "ConceptImages", "generate_concept_images", "principal_directions"]
