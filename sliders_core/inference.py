"""Using sliders: attach files at strengths, compose several, delay the switch-on, render α sweeps."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from .denoiser import Cond, Denoiser, SampleCallback, SliderSchedule
from .errors import SliderError
from .formats import load_slider

_NUMBER = r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?"


@dataclass(frozen=True)
class SliderSpec:
    """A slider file and its strength α (any real number; negative moves the other way)."""

    path: Path
    alpha: float

    @staticmethod
    def parse(text: str) -> SliderSpec:
        """'file.safetensors:1.5' or 'file.safetensors' (α = 1)."""
        path, sep, alpha = text.rpartition(":")
        if not sep or not re.fullmatch(_NUMBER, alpha):
            return SliderSpec(Path(text), 1.0)
        return SliderSpec(Path(path), float(alpha))


def parse_slider_mix(text: str) -> list[tuple[str, float]]:
    """A slider mix as text, one slider per line, 'name: α' (or just 'name' for α = 1); blank lines and
    '#' comments are skipped. Names are returned as written, for the caller to resolve."""
    mix = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, alpha = line.rpartition(":")
        if not sep:
            name, alpha = line, "1"
        name, alpha = name.strip(), alpha.strip()
        if not name or not re.fullmatch(_NUMBER, alpha):
            raise SliderError(f"line {number} of the slider mix, {line!r}: write 'name: α', e.g. 'sliders/age.safetensors: 1.5'")
        mix.append((name, float(alpha)))
    return mix


def attach_slider_file(denoiser: Denoiser, path: str | Path, name: str | None = None) -> str:
    """Load a slider file for this model (any supported format) and attach it, switched off."""
    weights = load_slider(path, denoiser.naming, family=denoiser.family)
    name = name or _adapter_name(Path(path), denoiser.sliders.names())
    denoiser.sliders.add(name, weights)
    return name


def _adapter_name(path: Path, taken: Sequence[str]) -> str:
    base = re.sub(r"\W", "_", path.stem) or "slider"
    if base[0].isdigit():
        base = "s_" + base
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    return name


def delayed_schedule(scales: dict[str, float], start: float) -> SliderSchedule:
    """Delayed LoRA (SDEdit idea): the base model for the first `start` fraction of the steps fixes
    the layout; the sliders are on for the rest. In one pass, so exact for stochastic samplers too."""
    if not 0.0 <= start <= 1.0:
        raise SliderError(f"slider start must be a fraction in [0, 1], got {start}")

    def schedule(step: int, total: int) -> dict[str, float]:
        return dict(scales) if step >= round(start * total) else {}

    return schedule


@torch.no_grad()
def generate(denoiser: Denoiser, prompt: str, *, scales: dict[str, float], seeds: Sequence[int],
             steps: int = 30, guidance: float = 7.5, resolution: int | None = None,
             start: float = 0.0, negative_prompt: str = "", progress: bool = False,
             callback: SampleCallback | None = None) -> torch.Tensor:
    """Images [N, H, W, 3] for each seed with the given slider scales (same noise for equal seeds);
    `callback` runs after every model call (progress, cancel)."""
    resolution = resolution or denoiser.default_resolution
    noise = torch.cat([denoiser.initial_noise(1, resolution, torch.Generator().manual_seed(s)) for s in seeds])
    cond, uncond = denoiser.encode([prompt]), denoiser.encode([negative_prompt])
    schedule = delayed_schedule(scales, start)
    # the sliders folded into the weights at their switch-on step: one slider or fifty, the same cost
    with denoiser.sliders.merging():
        trajectory = denoiser.sample(cond, uncond, guidance=guidance, steps=steps, noise=noise,
                                     slider_schedule=schedule, progress=progress, callback=callback,
                                     generator=torch.Generator().manual_seed(seeds[0]))
    return denoiser.decode(trajectory.final)


@torch.no_grad()
def alpha_strip(denoiser: Denoiser, cond: Cond, uncond: Cond, slider: str, noise: torch.Tensor, *,
                alphas: Sequence[float] = (-1.0, 0.0, 1.0), steps: int = 15, guidance: float = 3.0) -> torch.Tensor:
    """One noise denoised at each α, the final latents side by side [1, C, H, W·len(alphas)]: a small
    live view of a slider while it trains. Every slider is off afterwards."""
    finals = []
    try:
        for alpha in alphas:
            trajectory = denoiser.sample(cond, uncond, guidance=guidance, steps=steps, noise=noise[:1],
                                         slider_schedule=lambda step, total, a=alpha: {slider: a})
            finals.append(trajectory.final)
    finally:
        denoiser.sliders.set_scales({})
    return torch.cat(finals, dim=-1)


def sweep(denoiser: Denoiser, prompt: str, slider: str, alphas: Sequence[float], *, seeds: Sequence[int] = (0,),
          others: dict[str, float] | None = None, **kwargs) -> list[torch.Tensor]:
    """One image batch (one per seed) per α of `slider`, other sliders held at their scales."""
    columns = tqdm(alphas, desc="α sweep", disable=not kwargs.get("progress", False), leave=False)
    return [generate(denoiser, prompt, scales={**(others or {}), slider: a}, seeds=seeds, **kwargs) for a in columns]


def slider_rows(denoiser: Denoiser, prompt: str, sliders: Sequence[str], alphas: Sequence[float], *, seed: int,
                **kwargs) -> list[torch.Tensor]:
    """One image batch per α with a row per slider (one seed): what each of several sliders does."""
    return [torch.cat([generate(denoiser, prompt, scales={name: alpha}, seeds=[seed], **kwargs) for name in sliders])
            for alpha in alphas]


def grid_image(columns: Sequence[torch.Tensor], labels: Sequence[str], cell: int = 128) -> Image.Image:
    """Columns of images [N, H, W, 3] → one labelled grid (a column per α, a row per seed)."""
    rows = columns[0].shape[0]
    label_h = 16
    grid = Image.new("RGB", (cell * len(columns), label_h + cell * rows), "white")
    draw = ImageDraw.Draw(grid)
    for c, (images, label) in enumerate(zip(columns, labels)):
        draw.text((c * cell + 4, 2), label, fill="black")
        for r in range(rows):
            array = (images[r].numpy() * 255).round().astype(np.uint8)
            tile = Image.fromarray(array).resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (c * cell, label_h + r * cell))
    return grid
