#!/usr/bin/env python
"""Train the shapes world's image–text encoder (sliders_core/shapes/encoder.py) and measure it.

    python scripts/train_shapes_encoder.py                  # writes models/shapes-encoder-v1
    python scripts/train_shapes_encoder.py --steps 200 --out /tmp/enc

Every step renders a fresh batch of random shapes (sliders_core/shapes/data.py), noised a little
(σ up to 0.05) so the shapes model's samples are in range, with captions that drop each attribute
word with probability 0.3. The loss is a symmetric contrastive loss whose positives are every image
a caption describes (a partial caption such as "a red shape" describes many). At the end it prints
the zero-shot accuracy of size, colour and shape on fresh renders and on shapes-model samples.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sliders_core.shapes.data import COLORS, SHAPES, SIZES, caption, random_specs, render_batch  # noqa: E402
from sliders_core.shapes.encoder import ENCODER_DIR, ShapesEncoder  # noqa: E402

ATTRIBUTES = {"size": SIZES, "color": COLORS, "shape": SHAPES}


def batch(rng: np.random.Generator, n: int, drop: float):
    """Renders, their captions (attribute words dropped), and positive[i, j]: caption j describes image i."""
    specs = random_specs(rng, n)
    keep = rng.random((n, 3)) >= drop
    texts = [caption(s, *k) for s, k in zip(specs, keep)]
    images = torch.from_numpy(render_batch(specs))
    noise_level = torch.from_numpy(rng.uniform(0, 0.05, (n, 1, 1, 1)).astype(np.float32))
    noise = torch.from_numpy(rng.standard_normal(images.shape).astype(np.float32))
    images = (images + noise_level * noise).clamp(0, 1)
    values = np.array([[SIZES.index(s.size), COLORS.index(s.color), SHAPES.index(s.shape)] for s in specs])
    agree = values[:, None, :] == values[None, :, :]  # [image, caption, attribute]
    positive = torch.from_numpy((agree | ~keep[None, :, :]).all(axis=2).astype(np.float32))
    return images, texts, positive


def loss_fn(model: ShapesEncoder, images, texts, positive) -> torch.Tensor:
    logits = model.logits(model.encode_images(images), model.encode_texts(texts))
    image_to_text = -(F.log_softmax(logits, dim=1) * positive / positive.sum(1, keepdim=True)).sum(1).mean()
    text_to_image = -(F.log_softmax(logits, dim=0) * positive / positive.sum(0, keepdim=True)).sum(0).mean()
    return (image_to_text + text_to_image) / 2


def zero_shot(model: ShapesEncoder, images: torch.Tensor, specs) -> dict[str, float]:
    """Per attribute: the share of images whose best caption among "a {value} shape" is the true value."""
    out = {}
    for attribute, values in ATTRIBUTES.items():
        prompts = [f"a {v}" if attribute == "shape" else f"a {v} shape" for v in values]
        chosen = model.classify(images, prompts)
        out[attribute] = float(np.mean([values[c] == getattr(s, attribute) for c, s in zip(chosen, specs)]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=192)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ENCODER_DIR))
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = ShapesEncoder()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps, pct_start=0.1)
    started = time.perf_counter()
    for step in range(args.steps):
        loss = loss_fn(model, *batch(rng, args.batch, drop=0.3))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
    model.eval()
    seconds = time.perf_counter() - started
    specs = random_specs(np.random.default_rng(12345), 600)
    renders = zero_shot(model, torch.from_numpy(render_batch(specs)), specs)
    model.save(args.out)
    print(json.dumps({"out": args.out, "steps": args.steps, "train_seconds": round(seconds, 1),
                      "parameters": sum(p.numel() for p in model.parameters()),
                      "zero_shot_on_600_renders": renders}, indent=1))


if __name__ == "__main__":
    main()
