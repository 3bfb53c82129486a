"""Small dependency-free plots (PIL only) for the UI: the training loss curve."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw


def loss_plot(losses: Sequence[float], width: int = 512, height: int = 256, smooth: int = 20) -> Image.Image:
    """Raw loss (light) and its running mean (dark) on a log axis, with first/last values printed."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    values = [v for v in losses if math.isfinite(v) and v > 0]
    if len(values) < 2:
        draw.text((10, 10), "not enough loss values to plot", fill="black")
        return image
    logs = [math.log10(v) for v in values]
    low, high = min(logs), max(logs)
    span = (high - low) or 1.0
    left, top, right, bottom = 50, 20, width - 10, height - 25

    def point(i: int, value: float) -> tuple[float, float]:
        x = left + (right - left) * i / (len(logs) - 1)
        y = bottom - (bottom - top) * (value - low) / span
        return x, y

    draw.rectangle((left, top, right, bottom), outline="grey")
    draw.line([point(i, v) for i, v in enumerate(logs)], fill=(170, 190, 230), width=1)
    window = max(1, min(smooth, len(logs) // 5 or 1))
    running = [sum(logs[max(0, i - window + 1): i + 1]) / len(logs[max(0, i - window + 1): i + 1])
               for i in range(len(logs))]
    draw.line([point(i, v) for i, v in enumerate(running)], fill=(20, 60, 160), width=2)
    draw.text((4, top - 4), f"{10 ** high:.2g}", fill="black")
    draw.text((4, bottom - 8), f"{10 ** low:.2g}", fill="black")
    draw.text((left, height - 18), f"loss (log): first {values[0]:.3g}, last {values[-1]:.3g}, "
              f"{len(values)} steps", fill="black")
    return image
