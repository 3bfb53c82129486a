"""Image pairs for visual sliders: folders on disk or two image batches, checked and made square.

A pair is (A, B): the same subject with less (A) and more (B) of the concept. Folder layouts:

    <dir>/A/<name>.png + <dir>/B/<name>.png            every pair at strength 1
    <dir>/<s>/A/<name>.png + <dir>/<s>/B/<name>.png    one level per strength s > 0 (e.g. 1/, 2/)
    <dir>/-<s>/<name>.png + <dir>/<s>/<name>.png       the official image-slider layout (folders named
                                                       by signed scale; -s holds A, +s holds B)

Files pair up by name (the stem; the extension may differ). Images of other sizes are resized
(shorter side) and centre-cropped to the training resolution, A and B the same way. A caption
`<name>.txt` beside the A (or B) image is that pair's prompt: what the pair shows, without the
concept ("a red square" for a small → large pair). Either every pair has one or none has.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import SliderError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MIN_PAIRS = 2  # one pair teaches that picture, not a direction


@dataclass
class ImagePairs:
    """Pairs as image batches [N, H, W, 3] in 0..1 (the ComfyUI IMAGE layout), one strength per pair, and
    optionally one prompt (caption) per pair; None: the training prompt conditions every pair."""

    a: torch.Tensor
    b: torch.Tensor
    strengths: list[float]
    names: list[str]
    prompts: list[str] | None = None

    def __len__(self) -> int:
        return self.a.shape[0]


def square_image(image: torch.Tensor, resolution: int) -> torch.Tensor:
    """[H, W, 3] 0..1 → [resolution, resolution, 3]: shorter side resized, then centre-cropped."""
    h, w = image.shape[:2]
    if (h, w) == (resolution, resolution):
        return image
    scale = resolution / min(h, w)
    size = (max(resolution, round(h * scale)), max(resolution, round(w * scale)))
    x = torch.nn.functional.interpolate(image.permute(2, 0, 1)[None].float(), size=size, mode="bicubic",
                                        align_corners=False, antialias=True)[0].clamp(0, 1)
    top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return x[:, top:top + resolution, left:left + resolution].permute(1, 2, 0)


def pairs_from_batches(a: torch.Tensor, b: torch.Tensor, resolution: int, strengths: Sequence[float] = (1.0,),
                       names: Sequence[str] | None = None, prompts: Sequence[str] | None = None) -> ImagePairs:
    """Two IMAGE batches in the same order → checked, square pairs. `strengths`: one for all or one per pair;
    `prompts`: None, or one caption per pair."""
    if a.dim() != 4 or b.dim() != 4 or a.shape[-1] < 3 or b.shape[-1] < 3:
        raise SliderError(f"image batches must be [N, H, W, 3], got A {tuple(a.shape)} and B {tuple(b.shape)}")
    if a.shape[0] != b.shape[0]:
        raise SliderError(f"{a.shape[0]} image(s) in A but {b.shape[0]} in B: each A image needs its B image, "
                          "in the same order")
    names = list(names) if names is not None else [f"pair {i + 1}" for i in range(a.shape[0])]
    return _checked(list(a[..., :3]), list(b[..., :3]), resolution, strengths, names, prompts)


def prompts_per_pair(text: str, count: int) -> tuple[str, list[str] | None]:
    """A prompt box → (the prompt for every pair, or None per-pair captions). One line: that prompt for all;
    as many non-empty lines as pairs: one caption per pair, in order (what Load Image Pairs gives)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) <= 1:
        return (lines[0] if lines else ""), None
    if len(lines) != count:
        raise SliderError(f"the prompt has {len(lines)} lines for {count} pairs: give one line for every pair "
                          "(a caption each, in the pairs' order) or a single prompt for all")
    return "", lines


def _checked(a: list[torch.Tensor], b: list[torch.Tensor], resolution: int, strengths: Sequence[float],
             names: list[str], prompts: Sequence[str] | None = None) -> ImagePairs:
    if len(a) < MIN_PAIRS:
        raise SliderError(f"{len(a)} image pair(s): give at least {MIN_PAIRS} (4–6 pairs of the same kind of "
                          "subject work); one pair teaches that picture, not a direction")
    strengths = [float(s) for s in strengths]
    if len(strengths) == 1:
        strengths *= len(a)
    if len(strengths) != len(a):
        raise SliderError(f"{len(strengths)} strengths for {len(a)} pairs: give one strength, or one per pair")
    if not all(math.isfinite(s) and s > 0 for s in strengths):
        raise SliderError(f"pair strengths must be positive numbers (A trains at −s, B at +s), got {strengths}")
    if prompts is not None:
        prompts = [str(p).strip() for p in prompts]
        if len(prompts) != len(a):
            raise SliderError(f"{len(prompts)} captions for {len(a)} pairs: give one caption per pair, or none")
    if resolution < 8:
        raise SliderError(f"resolution must be ≥ 8, got {resolution}")
    resized = [n for n, x, y in zip(names, a, b) if x.shape[:2] != (resolution, resolution)
               or y.shape[:2] != (resolution, resolution)]
    mismatched = [n for n, x, y in zip(names, a, b) if x.shape[:2] != y.shape[:2]]
    if mismatched:
        log.warning("A and B differ in size for %s; both are resized and centre-cropped to %d px the same way",
                    ", ".join(mismatched[:5]), resolution)
    elif resized:
        log.info("%d pair(s) resized and centre-cropped to %d px", len(resized), resolution)
    return ImagePairs(a=torch.stack([square_image(x, resolution) for x in a]),
                      b=torch.stack([square_image(y, resolution) for y in b]), strengths=strengths, names=names,
                      prompts=prompts)


def _images(folder: Path) -> dict[str, Path]:
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            if path.stem in files:
                raise SliderError(f"{folder}: two images are named {path.stem!r} ({files[path.stem].name}, {path.name})")
            files[path.stem] = path
    return files


def read_image(path: Path) -> torch.Tensor:
    """An image file → [H, W, 3] float 0..1; unreadable files name themselves."""
    if not path.is_file():
        raise SliderError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise SliderError(f"cannot read image {path}: {exc}") from exc
    return torch.from_numpy(array)


def _matched(a_dir: Path, b_dir: Path) -> list[tuple[str, Path, Path]]:
    a, b = _images(a_dir), _images(b_dir)
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        detail = [f"{a[n]} has no {b_dir / n}.*" for n in only_a] + [f"{b[n]} has no {a_dir / n}.*" for n in only_b]
        raise SliderError("image pairs must have the same names on both sides: " + "; ".join(detail[:5]))
    return [(n, a[n], b[n]) for n in sorted(a)]


def _number(name: str) -> float | None:
    try:
        value = float(name)
    except ValueError:
        return None
    return value if math.isfinite(value) and value != 0 else None


def pair_folders(folder: str | Path) -> list[tuple[float, str, Path, Path]]:
    """(strength, name, A file, B file) for every pair under `folder`, in one of the layouts above."""
    root = Path(folder)
    if not root.is_dir():
        raise SliderError(f"pairs folder not found: {root}")
    if (root / "A").is_dir() or (root / "B").is_dir():
        if not ((root / "A").is_dir() and (root / "B").is_dir()):
            raise SliderError(f"{root} needs both an A/ and a B/ folder")
        return [(1.0, n, a, b) for n, a, b in _matched(root / "A", root / "B")]
    levels = {v: p for p in sorted(root.iterdir()) if p.is_dir() and (v := _number(p.name)) is not None}
    found = []
    if levels and all(v > 0 for v in levels):
        for s, level in sorted(levels.items()):
            if not ((level / "A").is_dir() and (level / "B").is_dir()):
                raise SliderError(f"{level} needs both an A/ and a B/ folder")
            found += [(s, f"{level.name}/{n}", a, b) for n, a, b in _matched(level / "A", level / "B")]
    elif levels:
        for s in sorted(v for v in levels if v > 0):
            if -s not in levels:
                raise SliderError(f"{levels[s]} (B side at +{s:g}) has no folder for -{s:g} (its A side)")
            found += [(s, f"{s:g}/{n}", a, b) for n, a, b in _matched(levels[-s], levels[s])]
        unpaired = sorted(v for v in levels if v < 0 and -v not in levels)
        if unpaired:
            raise SliderError(f"{levels[unpaired[0]]} (A side at {unpaired[0]:g}) has no folder for +{-unpaired[0]:g}")
    if not found:
        raise SliderError(f"{root} has no image pairs: expected A/ and B/ folders (see the README's pair layout)")
    return found


def pair_caption(a_file: Path, b_file: Path) -> str | None:
    """The pair's caption: `<name>.txt` beside A or B (the same text if both have one), else None."""
    found = {}
    for path in (a_file.with_suffix(".txt"), b_file.with_suffix(".txt")):
        if path.is_file():
            try:
                found[path] = " ".join(path.read_text(encoding="utf-8").split())
            except (OSError, UnicodeDecodeError) as exc:
                raise SliderError(f"cannot read caption {path}: {exc}") from exc
    if len(set(found.values())) > 1:
        a_txt, b_txt = found
        raise SliderError(f"captions {a_txt} and {b_txt} differ: a pair has one caption (keep one file, or make "
                          "them equal)")
    return next(iter(found.values()), None)


def load_pair_folder(folder: str | Path, resolution: int) -> ImagePairs:
    entries = pair_folders(folder)
    captions = [pair_caption(e[2], e[3]) for e in entries]
    missing = [e[2].with_suffix(".txt") for e, c in zip(entries, captions) if c is None]
    if len(missing) not in (0, len(entries)):
        raise SliderError(f"{len(entries) - len(missing)} of {len(entries)} pairs have a caption (.txt); give every "
                          f"pair one or none. Missing: {', '.join(str(m) for m in missing[:5])}")
    a, b = [read_image(e[2]) for e in entries], [read_image(e[3]) for e in entries]
    return _checked(a, b, resolution, [e[0] for e in entries], [e[1] for e in entries],
                    None if missing else captions)
