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


def line_plot(series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str, x_label: str,
              y_label: str, width: int = 640, height: int = 400) -> Image.Image:
    """A few labelled lines on linear axes (benchmark figures without a plotting dependency)."""
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    xs = [x for xs_, _ in series.values() for x in xs_]
    ys = [y for _, ys_ in series.values() for y in ys_ if math.isfinite(y)]
    if not xs or not ys:
        draw.text((10, 10), "no data", fill="black")
        return image
    x_low, x_high = min(xs), max(xs)
    y_low, y_high = min(ys), max(ys)
    y_pad = (y_high - y_low) * 0.05 or 0.5
    y_low, y_high = y_low - y_pad, y_high + y_pad
    left, top, right, bottom = 60, 30, width - 170, height - 40

    def point(x: float, y: float) -> tuple[float, float]:
        px = left + (right - left) * (x - x_low) / ((x_high - x_low) or 1)
        py = bottom - (bottom - top) * (y - y_low) / (y_high - y_low)
        return px, py

    draw.rectangle((left, top, right, bottom), outline="grey")
    draw.text((left, 8), title, fill="black")
    draw.text((left, height - 20), x_label, fill="black")
    draw.text((4, top - 16), y_label, fill="black")
    for value in (y_low + y_pad, (y_low + y_high) / 2, y_high - y_pad):
        draw.text((4, point(x_low, value)[1] - 6), f"{value:.3g}", fill="black")
    for x in sorted(set(xs)):
        draw.text((point(x, y_low)[0] - 6, bottom + 4), f"{x:g}", fill="black")
    for i, (name, (sx, sy)) in enumerate(series.items()):
        colour = palette[i % len(palette)]
        points = [point(x, y) for x, y in zip(sx, sy) if math.isfinite(y)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for px, py in points:
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colour)
        draw.text((right + 10, top + 16 * i), name, fill=colour)
    return image


def bar_plot(values: Sequence[float], labels: Sequence[str], title: str, width: int = 512,
             height: int = 256) -> Image.Image:
    """Labelled bars from 0 to each value, printed above it (e.g. each direction's explained variance)."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 6), title, fill="black")
    if not values:
        draw.text((10, 30), "no data", fill="black")
        return image
    top, bottom, left, right = 40, height - 24, 10, width - 10
    slot = (right - left) / len(values)
    peak = max(max(values), 1e-12)
    for i, (value, label) in enumerate(zip(values, labels)):
        x0, x1 = left + i * slot + slot * 0.15, left + (i + 1) * slot - slot * 0.15
        y = bottom - (bottom - top) * max(value, 0) / peak
        draw.rectangle((x0, y, x1, bottom), fill=(31, 119, 180))
        draw.text((x0, y - 12), f"{value:.3g}", fill="black")
        draw.text((x0, bottom + 6), label, fill="black")
    return image
