"""Shapes world data: one coloured shape on a plain background, with a short caption.

Pure numpy. Every attribute named in a caption can be measured back from the pixels
(see ``metrics.py``), which is what makes this world usable as a slider benchmark.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SIZES = ("small", "medium", "large")
COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")

# Size is area (fraction of the image), the same for every shape type.
# Levels are geometric (x2.5 apart) so each sits the same log-distance from the class
# thresholds at the geometric midpoints (.063, .158). Both ends leave room for a slider:
# below "small" down to ~.01 (~10 px at 32x32, still measurable) and above "large" up to
# ~.45 (a circle 24 px across still fits). The earlier trial's base model drew everything
# too large, so the top level is kept below the frame's limit on purpose.
SIZE_AREA = {"small": 0.04, "medium": 0.10, "large": 0.25}

# Saturated primaries and yellow: hues 0/120/240/60 degrees, at least 60 degrees apart,
# so nearest-hue classification has a +-30 degree margin.
COLOR_RGB = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
}
COLOR_HUE = {"red": 0.0, "green": 120.0, "blue": 240.0, "yellow": 60.0}

# The bounding-box centre is jittered by up to 3 px (at 32 px) around the image centre;
# stored as a fraction so the data is resolution independent.
JITTER = 3 / 32
SHAPE_PLACEHOLDER = "shape"  # replaces a dropped shape word: "a red shape"

_SQRT3 = math.sqrt(3.0)
_RENDER_CHUNK = 4096  # images per vectorised step; bounds temporary memory


@dataclass(frozen=True)
class ShapeSpec:
    """One image's content. (cx, cy) is the shape's area centroid in 0..1 image units."""

    size: str
    color: str
    shape: str
    cx: float
    cy: float


def _triangle_height(area: np.ndarray | float) -> np.ndarray | float:
    # Equilateral, apex up: area = h^2 / sqrt(3).
    return np.sqrt(_SQRT3 * np.asarray(area))


def _centroid_below_box_centre(shape: str, area: float) -> float:
    # A triangle's centroid sits h/6 below its bounding-box centre; circle and square: 0.
    return float(_triangle_height(area)) / 6 if shape == "triangle" else 0.0


def random_specs(rng: np.random.Generator, n: int) -> list[ShapeSpec]:
    """n uniformly random specs; the bounding box (not the centroid) is jittered so every
    shape type stays inside the frame."""
    size_idx = rng.integers(len(SIZES), size=n)
    color_idx = rng.integers(len(COLORS), size=n)
    shape_idx = rng.integers(len(SHAPES), size=n)
    box_centre = 0.5 + rng.uniform(-JITTER, JITTER, size=(n, 2))
    specs = []
    for i in range(n):
        size, shape = SIZES[size_idx[i]], SHAPES[shape_idx[i]]
        dy = _centroid_below_box_centre(shape, SIZE_AREA[size])
        specs.append(ShapeSpec(size, COLORS[color_idx[i]], shape,
                               float(box_centre[i, 0]), float(box_centre[i, 1] + dy)))
    return specs


def random_spec(rng: np.random.Generator) -> ShapeSpec:
    return random_specs(rng, 1)[0]


def _shape_masks(specs: list[ShapeSpec], resolution: int) -> np.ndarray:
    """[N,H,W] bool, sampled at pixel centres (no anti-aliasing)."""
    area = np.array([SIZE_AREA[s.size] for s in specs])[:, None, None]
    kind = np.array([SHAPES.index(s.shape) for s in specs])[:, None, None]
    centres = (np.arange(resolution) + 0.5) / resolution
    x = centres[None, None, :] - np.array([s.cx for s in specs])[:, None, None]
    y = centres[None, :, None] - np.array([s.cy for s in specs])[:, None, None]

    circle = x * x + y * y <= area / math.pi
    half_side = np.sqrt(area) / 2
    square = (np.abs(x) <= half_side) & (np.abs(y) <= half_side)
    height = _triangle_height(area)
    below_apex = y + 2 * height / 3  # the apex is 2h/3 above the centroid
    triangle = (below_apex >= 0) & (y <= height / 3) & (np.abs(x) <= below_apex / _SQRT3)
    return np.where(kind == 0, circle, np.where(kind == 1, square, triangle))


def render_batch(specs: list[ShapeSpec], resolution: int = 32,
                 background: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """[N,H,W,3] float32 in 0..1."""
    images = np.empty((len(specs), resolution, resolution, 3), dtype=np.float32)
    bg = np.asarray(background, dtype=np.float32)
    for start in range(0, len(specs), _RENDER_CHUNK):
        chunk = specs[start:start + _RENDER_CHUNK]
        mask = _shape_masks(chunk, resolution)[..., None]
        rgb = np.array([COLOR_RGB[s.color] for s in chunk], dtype=np.float32)[:, None, None, :]
        images[start:start + len(chunk)] = np.where(mask, rgb, bg)
    return images


def render(spec: ShapeSpec, resolution: int = 32,
           background: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """[H,W,3] float32 in 0..1."""
    return render_batch([spec], resolution, background)[0]


def caption(spec: ShapeSpec, keep_size: bool = True, keep_color: bool = True,
            keep_shape: bool = True) -> str:
    words = ["a"]
    if keep_size:
        words.append(spec.size)
    if keep_color:
        words.append(spec.color)
    words.append(spec.shape if keep_shape else SHAPE_PLACEHOLDER)
    return " ".join(words)


def make_dataset(n: int, seed: int, resolution: int = 32, drop_prob: float = 0.3,
                 empty_prob: float = 0.1) -> tuple[np.ndarray, list[str], list[ShapeSpec]]:
    """(images [N,H,W,3] float32, captions, specs). Each attribute word is dropped
    independently with drop_prob; a caption is "" with empty_prob (for CFG training)."""
    rng = np.random.default_rng(seed)
    specs = random_specs(rng, n)
    keep = rng.random((n, 3)) >= drop_prob
    empty = rng.random(n) < empty_prob
    captions = ["" if empty[i] else caption(s, *keep[i]) for i, s in enumerate(specs)]
    return render_batch(specs, resolution), captions, specs


def caption_vocabulary() -> list[str]:
    """Every word a caption can contain, sorted (for a word-level tokenizer)."""
    return sorted({"a", SHAPE_PLACEHOLDER, *SIZES, *COLORS, *SHAPES})


def caption_attributes(text: str) -> dict[str, str | None]:
    """Attributes a caption names; None where it names none (e.g. "a red shape")."""
    words = set(text.split())

    def named(options: tuple[str, ...]) -> str | None:
        return next((w for w in options if w in words), None)

    return {"size": named(SIZES), "color": named(COLORS), "shape": named(SHAPES)}


# -- exact image pairs for visual sliders: only the concept differs between A and B -----------------
PAIR_CONCEPTS = ("size", "position")
PAIR_SHIFT = 3 / 32  # position pairs: A this far left of centre, B this far right (the data's jitter range)


def concept_pair_specs(concept: str, n: int, seed: int, balanced: bool = False) -> list[tuple[ShapeSpec, ShapeSpec]]:
    """n (A, B) spec pairs. size: A small, B large; position: A left, B right (a concept no caption
    names). Everything else (colour, shape, the other coordinates) is drawn once and shared.
    `balanced`: colours and shape types in turn instead of drawn, so that none is over-represented
    (a few drawn pairs can be mostly red squares, and the slider then pushes towards red squares)."""
    if concept not in PAIR_CONCEPTS:
        raise ValueError(f"concept must be one of {PAIR_CONCEPTS}, got {concept!r}")
    rng = np.random.default_rng(seed)
    pairs = []
    for i, spec in enumerate(random_specs(rng, n)):
        if balanced:
            shape, area = SHAPES[i % len(SHAPES)], SIZE_AREA[spec.size]  # the same box, the new shape's centroid
            cy = spec.cy - _centroid_below_box_centre(spec.shape, area) + _centroid_below_box_centre(shape, area)
            spec = ShapeSpec(spec.size, COLORS[i % len(COLORS)], shape, spec.cx, cy)
        if concept == "size":
            a = ShapeSpec("small", spec.color, spec.shape, spec.cx, spec.cy)
            b = ShapeSpec("large", spec.color, spec.shape, spec.cx, spec.cy)
        else:
            a = ShapeSpec(spec.size, spec.color, spec.shape, 0.5 - PAIR_SHIFT, spec.cy)
            b = ShapeSpec(spec.size, spec.color, spec.shape, 0.5 + PAIR_SHIFT, spec.cy)
        pairs.append((a, b))
    return pairs


def pair_captions(concept: str, n: int, seed: int, balanced: bool = False) -> list[str]:
    """One caption per pair of `concept_pair_specs`: what the pair shares, never the concept itself
    ("a red square" for a size pair; a position pair's caption may name its size)."""
    captions = []
    for a, _ in concept_pair_specs(concept, n, seed, balanced):
        words = [a.color, a.shape] if concept == "size" else [a.size, a.color, a.shape]
        captions.append("a " + " ".join(words))
    return captions


def render_concept_pairs(concept: str, n: int, seed: int, resolution: int = 32,
                         balanced: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(A images, B images), each [n, H, W, 3] float32 in 0..1."""
    pairs = concept_pair_specs(concept, n, seed, balanced)
    return render_batch([a for a, _ in pairs], resolution), render_batch([b for _, b in pairs], resolution)
