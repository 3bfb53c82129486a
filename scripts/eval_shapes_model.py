#!/usr/bin/env python
"""Measure how well the shapes model obeys its prompts, with the exact pixel metrics.

    python scripts/eval_shapes_model.py                       # shipped model, default sampler
    python scripts/eval_shapes_model.py --steps 25 --guidance 4
    python scripts/eval_shapes_model.py --sweep               # compare sampler settings (smaller set)

Samples go through the project's own path: ``load_diffusers_model`` + ``inference.generate``.
Prompt set (defaults: 8 seeds): every full prompt "a {size} {colour} {shape}" (36) x seeds, then
partial prompts: "a {shape}" (size and colour free) x 4 x seeds, and "a {size} shape", "a {colour}
shape" x seeds. Prints per-attribute accuracy (over the images whose prompt names that attribute),
"all three right" on the full prompts, the size and colour distributions where the prompt leaves
them free (a slider needs room in both directions), and the time taken.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sliders_core.backends.diffusers_backend import load_diffusers_model  # noqa: E402
from sliders_core.inference import generate, grid_image  # noqa: E402
from sliders_core.shapes import COLORS, SHAPES, SIZE_AREA, SIZES, attribute_accuracy, caption_attributes, measure_batch  # noqa: E402
from sliders_core.shapes.model import DEFAULT_GUIDANCE, DEFAULT_STEPS, SHAPES_MODEL_DIR  # noqa: E402

ATTRS = ("size", "color", "shape")


def full_prompts() -> list[str]:
    return [f"a {s} {c} {h}" for s in SIZES for c in COLORS for h in SHAPES]


def partial_prompts() -> list[tuple[str, int]]:
    """(prompt, seed multiplier): the size-free "a {shape}" prompts get 4x the seeds."""
    return ([(f"a {h}", 4) for h in SHAPES] + [(f"a {s} shape", 1) for s in SIZES]
            + [(f"a {c} shape", 1) for c in COLORS])


def run(denoiser, prompts: list[tuple[str, int]], seeds: int, steps: int, guidance: float, seed0: int):
    """Generate every (prompt, seeds x multiplier); returns images [N,H,W,3] and the prompt per image."""
    images, labels = [], []
    for k, (prompt, mult) in enumerate(prompts):
        seed_list = [seed0 + 1000 * k + i for i in range(seeds * mult)]
        torch.manual_seed(seed_list[0])  # DDPM's step noise comes from the global generator
        images.append(generate(denoiser, prompt, scales={}, seeds=seed_list, steps=steps, guidance=guidance,
                               resolution=32).numpy())
        labels += [prompt] * len(seed_list)
    return np.concatenate(images), labels


def report(images: np.ndarray, labels: list[str]) -> dict:
    targets = [caption_attributes(p) for p in labels]
    full = [i for i, t in enumerate(targets) if all(t[a] for a in ATTRS)]
    result = {"n_images": len(labels), "n_full": len(full)}
    if full:
        result["full"] = attribute_accuracy(images[full], [targets[i] for i in full])
    result["all_prompts"] = attribute_accuracy(images, targets)
    measured = measure_batch(images)
    free_size = [m for m, t in zip(measured, targets) if t["size"] is None]
    if free_size:
        counts = Counter(m.size for m in free_size)
        result["size_free"] = {"n": len(free_size),
                               "distribution": {k: counts.get(k, 0) / len(free_size) for k in (*SIZES, "none")},
                               "mean_area": float(np.mean([m.area_fraction for m in free_size])),
                               "data_areas": dict(SIZE_AREA)}
    free_color = [m for m, t in zip(measured, targets) if t["color"] is None]
    if free_color:
        counts = Counter(m.color for m in free_color)
        result["color_free"] = {"n": len(free_color),
                                "distribution": {k: counts.get(k, 0) / len(free_color) for k in (*COLORS, "none")}}
    per_level = {}
    for a, options in zip(ATTRS, (SIZES, COLORS, SHAPES)):
        for o in options:
            idx = [i for i in full if targets[i][a] == o]
            if idx:
                per_level[f"{a}={o}"] = float(np.mean([getattr(measured[i], a) == o for i in idx]))
    result["full_per_level"] = per_level
    return result


def print_report(r: dict, title: str) -> None:
    print(f"\n== {title}: {r['n_images']} images ({r['n_full']} with all three attributes prompted)")
    if "full" in r:
        f = r["full"]
        print(f"full prompts      size {f['size']:.3f}  colour {f['color']:.3f}  shape {f['shape']:.3f}  "
              f"all three {f['all']:.3f}")
    a = r["all_prompts"]
    print(f"every prompt      size {a['size']:.3f}  colour {a['color']:.3f}  shape {a['shape']:.3f}  "
          f"all named {a['all']:.3f}")
    if r.get("full_per_level"):
        print("per level (full): " + "  ".join(f"{k} {v:.2f}" for k, v in r["full_per_level"].items()))
    if "size_free" in r:
        s = r["size_free"]
        print(f"size word absent (n={s['n']}): " + "  ".join(f"{k} {v:.2f}" for k, v in s["distribution"].items())
              + f"  mean area {s['mean_area']:.3f} (data levels {', '.join(f'{v:.2f}' for v in SIZE_AREA.values())})")
    if "color_free" in r:
        c = r["color_free"]
        print(f"colour word absent (n={c['n']}): " + "  ".join(f"{k} {v:.2f}" for k, v in c["distribution"].items()))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=SHAPES_MODEL_DIR)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--seeds", type=int, default=8, help="seeds per prompt (x4 for 'a {shape}')")
    p.add_argument("--seed", type=int, default=12345, help="first seed (held out from training seeds)")
    p.add_argument("--no-partial", action="store_true", help="full prompts only")
    p.add_argument("--sweep", action="store_true",
                   help="compare sampler settings on full prompts x 2 seeds instead")
    p.add_argument("--grid", type=Path, help="write a PNG grid of the full prompts (first 4 seeds)")
    p.add_argument("--json", type=Path, help="write the results as JSON")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    denoiser = load_diffusers_model(args.model)
    print(f"model {args.model} (family {denoiser.family}, {sum(x.numel() for x in denoiser.unet.parameters()):,}"
          f" UNet + {sum(x.numel() for x in denoiser.pipe.text_encoder.parameters()):,} text parameters)")
    results = {}
    if args.sweep:
        settings = [(25, 3.0), (25, 5.0), (25, 7.5), (50, 5.0)]
        for steps, guidance in settings:
            t0 = time.time()
            images, labels = run(denoiser, [(q, 1) for q in full_prompts()], 2, steps, guidance, args.seed)
            r = report(images, labels)
            r["seconds"] = time.time() - t0
            results[f"steps={steps},guidance={guidance}"] = r
            f = r["full"]
            print(f"steps {steps:3d} guidance {guidance:3.1f}: size {f['size']:.3f} colour {f['color']:.3f} "
                  f"shape {f['shape']:.3f} all {f['all']:.3f}  ({r['seconds']:.0f} s for {r['n_images']})",
                  flush=True)
    else:
        t0 = time.time()
        prompts = [(q, 1) for q in full_prompts()] + ([] if args.no_partial else partial_prompts())
        images, labels = run(denoiser, prompts, args.seeds, args.steps, args.guidance, args.seed)
        elapsed = time.time() - t0
        r = report(images, labels)
        r.update(seconds=elapsed, steps=args.steps, guidance=args.guidance, sampler=type(denoiser.pipe.scheduler).__name__)
        results["eval"] = r
        print_report(r, f"{args.model.name}, {r['sampler']} {args.steps} steps, guidance {args.guidance}")
        print(f"time: {elapsed:.0f} s ({elapsed / len(labels):.2f} s per image, {args.threads} thread(s))")
        if args.grid:
            per = args.seeds
            columns = [torch.from_numpy(images[k * per:k * per + min(4, per)]) for k in range(len(full_prompts()))]
            grid_image(columns, ["".join(w[0] for w in q.split()[1:]) for q in full_prompts()],
                       cell=48).save(args.grid)
            print(f"grid: {args.grid}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
