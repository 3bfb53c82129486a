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

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from .config import BatchedRunOptions
from .denoiser import Cond, Denoiser, SampleCallback
from .errors import SliderError
from .slider_weights import SliderWeights
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


def check_concept(concept: str) -> None:
    if not concept.strip():
        raise SliderError("the concept prompt is empty: give what to explore, e.g. 'a dog' or 'a shape'")


def concept_slug(concept: str) -> str:
    """The concept as a file and adapter name: 'a red shape' → 'a_red_shape'."""
    return re.sub(r"\W+", "_", concept.strip().lower()).strip("_") or "concept"


@torch.no_grad()
def generate_concept_images(denoiser: Denoiser, concept: str, count: int, *, variations: Sequence[str] = (),
                            seed: int = 0, steps: int = 25, guidance: float = 3.0, batch: int = 16,
                            resolution: int | None = None, callback: SampleCallback | None = None) -> ConceptImages:
    """`count` images of the concept with the frozen model, cycling through the prompt variations
    (the concept itself when none are given). Image i starts from the noise of seed `seed + i`; a
    stochastic sampler's step noise comes from one generator per batch, so the same arguments give
    the same images."""
    check_concept(concept)
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
                                         noise=noise, generator=torch.Generator().manual_seed(seed + start),
                                         callback=callback)
        latents.append(trajectory.final.float().cpu())
        all_prompts += chunk_prompts
        seeds += [seed + i for i in chunk]
    latents = torch.cat(latents)
    return ConceptImages(latents=latents, images=denoiser.decode(latents), prompts=all_prompts, seeds=seeds)


ROTATIONS = ("independent", "pca")


def principal_directions(embeddings: torch.Tensor, k: int, rotation: str = "pca", seed: int = 0
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k principal directions of the embeddings [N, D] (rows orthonormal, by explained variance)
    and the share of the total variance each explains.

    rotation "pca" keeps the principal axes (the paper). "independent" keeps their span but rotates it so
    that the projections are statistically independent (FastICA on the whitened projections): when the
    model varies several things independently with similar spread (size, colour, shape), principal axes
    mix them, since any rotation of a near-degenerate eigenspace is as principal; independent axes
    separate them. Each direction's sign is fixed so its largest component is positive."""
    if embeddings.dim() != 2:
        raise SliderError(f"embeddings must be [N, D], got {tuple(embeddings.shape)}")
    if rotation not in ROTATIONS:
        raise SliderError(f"rotation must be one of {ROTATIONS}, got {rotation!r}")
    n, dim = embeddings.shape
    if not 1 <= k <= min(n - 1, dim):
        raise SliderError(f"K = {k} directions need more than K images and at most {dim} dimensions; "
                          f"there are {n} images: use K ≤ {min(n - 1, dim)} or generate more images")
    centred = embeddings.double() - embeddings.double().mean(dim=0)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    total = (singular**2).sum()
    directions = vh[:k]
    if rotation == "independent" and k > 1:
        projections = centred @ directions.T
        directions = independent_rotation(projections / projections.std(dim=0), seed) @ directions
    variance = ((centred @ directions.T) ** 2).sum(dim=0)
    order = variance.argsort(descending=True)
    directions, variance = directions[order], variance[order]
    signs = torch.sign(directions.gather(1, directions.abs().argmax(dim=1, keepdim=True)))
    return (directions * signs).float(), (variance / total).float()


def independent_rotation(whitened: torch.Tensor, seed: int = 0, iterations: int = 500) -> torch.Tensor:
    """Symmetric FastICA (Hyvärinen 1999, log-cosh contrast) on [N, K] whitened data: the orthogonal
    K×K matrix whose rows give the most non-Gaussian, hence most independent, projections. A dozen
    lines here rather than a scikit-learn dependency for the pack."""
    k = whitened.shape[1]
    gen = torch.Generator().manual_seed(seed)
    w, _ = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64))
    for _ in range(iterations):
        y = torch.tanh(whitened @ w.T)
        update = y.T @ whitened / len(whitened) - (1 - y**2).mean(dim=0)[:, None] * w
        u, _, vt = torch.linalg.svd(update)
        new = u @ vt  # the nearest orthogonal matrix keeps the components decorrelated
        converged = float((torch.diag(new @ w.T).abs() - 1).abs().max()) < 1e-10
        w = new
        if converged:
            break
    return w


@dataclass
class SliderSpaceConfig(BatchedRunOptions):
    """Per-direction slider options. The reference trains rank-1 sliders on cross-attention keys and values
    (`auto`: those on UNets, joint attention on flow transformers, whose host fuses text k/v with q)."""

    auto_layers = "xattn_kv"
    rank: int = 1
    alpha: float = 1.0
    lr: float = 1e-2  # on the shapes model 2e-3 aligned the embeddings but barely changed the samples
    iterations: int = 200  # per slider
    layers: str = "auto"
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
                      resume: Sequence[SliderWeights | None] = (), checkpoint_dir: str | Path | None = None,
                      callback: StepCallback | None = None, progress: bool = True,
                      only: Sequence[int] | None = None) -> list[TrainResult]:
    """One slider per direction, trained one after another and left attached as `<name>_<j>`.
    `resume[j]` continues direction j's slider (one that is complete is kept as it is); `callback`
    counts the steps of all K sliders together; `only`: just these directions (one process's share)."""
    config.validate()
    config = config.with_layers_for(denoiser.sliders.lora_candidates())
    if len(directions) != len(explained):
        raise SliderError(f"{len(directions)} directions but {len(explained)} explained variances")
    cond = denoiser.encode([concept])
    latents = images.latents.to(next(iter(cond.tensors.values())).device)
    total = len(directions) * config.iterations
    results = []
    for j, direction in enumerate(directions):
        if only is not None and j not in only:
            continue
        slider = f"{name}_{j}"
        prior = resume[j] if j < len(resume) else None
        if prior is not None:
            _check_resumable(prior, concept, j)
            if int(prior.metadata.get("sliders.steps", 0)) >= config.iterations:
                denoiser.sliders.add(slider, prior)
                results.append(TrainResult(weights=prior))
                continue
        path = Path(checkpoint_dir) / f"{slider}.safetensors" if checkpoint_dir else None
        overall = (lambda step, _, loss, j=j: callback(j * config.iterations + step, total, loss)) if callback else None
        run = SliderRun(denoiser, slider, config, resume=prior, checkpoint_path=path, callback=overall,
                        progress=progress, label=f"SliderSpace direction {j}")
        run.metadata = lambda steps, j=j: {
            **run_metadata(denoiser.family, "sliderspace", config, steps, int(images.images.shape[1]),
                           config.batch_size),
            "sliders.concept": concept, "sliders.direction": str(j),
            "sliders.explained_variance": f"{float(explained[j]):.6g}", "sliders.images": str(len(latents))}
        gen = torch.Generator().manual_seed(config.seed * 1000 + j + 7919 * run.start_step)
        target = direction.to(latents.device).float()
        for step in run.steps():
            pick = torch.randint(len(latents), (config.batch_size,), generator=gen)
            change = embedding_change(denoiser, embedder, slider, latents[pick], cond, gen)
            run.step(step, 1 - F.cosine_similarity(change, target[None], dim=1).mean())
        results.append(run.finish())
    return results


def _check_resumable(prior: SliderWeights, concept: str, j: int) -> None:
    meta = prior.metadata
    if meta.get("sliders.kind") != "sliderspace" or meta.get("sliders.direction") != str(j) \
            or meta.get("sliders.concept") != concept:
        raise SliderError(f"the slider given to resume direction {j} of {concept!r} is "
                          f"{meta.get('sliders.kind', 'not a SliderSpace slider')} for direction "
                          f"{meta.get('sliders.direction')} of {meta.get('sliders.concept')!r}")


@dataclass
class Discovery:
    """A SliderSpace run: the concept images, the directions found, and one trained slider per direction
    (attached to the denoiser as `names[j]`, switched off)."""

    images: ConceptImages
    directions: torch.Tensor
    explained: torch.Tensor
    results: list[TrainResult]
    names: list[str]


def embed_images(embedder: ImageEmbedder, images: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Embeddings [N, D] of the images, in chunks, refusing an embedder whose output is not one unit
    vector per image."""
    with torch.no_grad():
        embeddings = torch.cat([embedder.embed(chunk.float()) for chunk in images.split(batch)])
    if embeddings.dim() != 2 or len(embeddings) != len(images):
        raise SliderError(f"the image embedder gave {tuple(embeddings.shape)} for {len(images)} images; it must "
                          "give one embedding vector per image")
    if not torch.isfinite(embeddings).all():
        raise SliderError("the image embedder gave NaN or infinite embeddings for the concept images")
    return embeddings.cpu()


def discover_sliders(denoiser: Denoiser, embedder: ImageEmbedder, concept: str, config: SliderSpaceConfig, *,
                     count: int, k: int, variations: Sequence[str] = (), rotation: str = "independent",
                     steps: int = 25, guidance: float = 3.0, resolution: int | None = None, name: str = "direction",
                     resume: Sequence[SliderWeights | None] = (), checkpoint_dir: str | Path | None = None,
                     callback: StepCallback | None = None, sample_callback: SampleCallback | None = None,
                     progress: bool = True) -> Discovery:
    """The whole method: `count` images of the concept, their embeddings, `k` directions, one slider each.
    Inputs are checked before anything is generated."""
    config.validate()
    if rotation not in ROTATIONS:
        raise SliderError(f"rotation must be one of {ROTATIONS}, got {rotation!r}")
    if not 1 <= k < count:
        raise SliderError(f"K = {k} sliders need more than K images; asked for {count} images")
    images = generate_concept_images(denoiser, concept, count, variations=variations, seed=config.seed, steps=steps,
                                     guidance=guidance, resolution=resolution, callback=sample_callback)
    embeddings = embed_images(embedder, images.images)
    directions, explained = principal_directions(embeddings, k, rotation, seed=config.seed)
    results = train_sliderspace(denoiser, embedder, images, directions, explained, concept, config, name=name,
                                resume=resume, checkpoint_dir=checkpoint_dir, callback=callback, progress=progress)
    return Discovery(images, directions, explained, results, [f"{name}_{j}" for j in range(k)])


__all__ = ["ImageEmbedder", "ConceptImages", "SliderSpaceConfig", "ROTATIONS", "generate_concept_images",
           "principal_directions", "independent_rotation",
           "embedding_change", "train_sliderspace", "Discovery", "embed_images", "discover_sliders", "check_concept",
           "concept_slug"]
