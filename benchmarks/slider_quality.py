"""Slider quality on the shapes world: efficacy, preservation, disentanglement, composition, delay.

Every attribute is measured exactly from pixels (sliders_core.shapes.metrics), with fixed seeds and
the same noise at every α. Sliders trained here (eq. 8, our loop):
- size     : c_t "a circle", c± "a large/small {p} circle", p over the 4 colours: the shipped recipe
             (prompt_sets/shapes_size.yaml: η 1 on their mean push, both signs trained)
- size-abl : the same without preservation prompts (the paper's disentanglement ablation)
- colour   : c_t "a circle", c± "a {p} red/blue circle", p over the 3 sizes (η 2, plus sign only:
             prompt_sets/shapes_colour.yaml)
- size-ref : the size objective without preservation trained by a reference-structured loop
             (benchmarks/forward_budget.py) for the same wall time as `size-abl`
- size-ff  : `size` on the layer preset `noxattn-ff` (this project's `noxattn` before v0.2) instead
             of the official `noxattn`
- pair-size, pair-position : image-pair sliders from 6 exact shapes pairs (small → large; shape moved
             left → right, a concept no caption names), each pair trained on its caption (what it
             shows but the concept: "a red square")
- pair-size-bal : pair-size from 6 balanced pairs (colours and shape types in turn, not drawn)
- pair-size-empty : pair-size-bal on the empty prompt (the reference's default) instead of captions

    python benchmarks/slider_quality.py [--iterations 300] [--seeds 48] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from forward_budget import reference_loop  # noqa: E402

from sliders_core.backends.diffusers_backend import load_diffusers_model  # noqa: E402
from sliders_core.config import PairTrainConfig, TrainConfig  # noqa: E402
from sliders_core.image_pairs import pairs_from_batches  # noqa: E402
from sliders_core.inference import generate  # noqa: E402
from sliders_core.pair_slider import train_pair_slider  # noqa: E402
from sliders_core.plots import line_plot  # noqa: E402
from sliders_core.prompts import PromptPair  # noqa: E402
from sliders_core.shapes.data import COLORS, SIZES, pair_captions, render_concept_pairs  # noqa: E402
from sliders_core.shapes.encoder import load_shapes_encoder  # noqa: E402
from sliders_core.shapes.metrics import measure_batch  # noqa: E402
from sliders_core.shapes.model import DEFAULT_GUIDANCE, DEFAULT_STEPS, SHAPES_MODEL_DIR  # noqa: E402
from sliders_core.text_slider import train_text_slider  # noqa: E402

ALPHAS = (-2.0, -1.0, 0.0, 1.0, 2.0)
SIZE_ETA, COLOUR_ETA = 1.0, 2.0  # the shipped prompt sets' (η on the mean push over preservation attributes)
EVAL_PROMPT = "a circle"
SLIDERS = {
    "size": PromptPair(target="a circle", positive="a large {p} circle", negative="a small {p} circle",
                       eta=SIZE_ETA, preservation=COLORS),
    "size-abl": PromptPair(target="a circle", positive="a large circle", negative="a small circle", eta=SIZE_ETA),
    "colour": PromptPair(target="a circle", positive="a {p} red circle", negative="a {p} blue circle",
                         eta=COLOUR_ETA, preservation=SIZES),
}
SIGNS = {"size": "both", "size-abl": "both", "size-ff": "both", "colour": "plus"}  # as the shipped sliders


# ΔCLIP (the paper's Table 1 efficacy metric) with the shapes world's own image–text encoder: the change
# of 100 · cos(image, caption) for the caption of the slider's positive side
TARGET_CAPTION = {"size": "a large circle", "size-abl": "a large circle", "size-ref": "a large circle",
                  "size-ff": "a large circle", "pair-size": "a large circle", "pair-size-bal": "a large circle",
                  "pair-size-empty": "a large circle", "colour": "a red circle"}
SCORED_CAPTIONS = sorted({*TARGET_CAPTION.values(), "a small circle", "a blue circle"})  # + the prompted ones
ENCODER = load_shapes_encoder()


def measure(images: torch.Tensor) -> dict[str, np.ndarray]:
    array = images.numpy()
    ms = measure_batch(array)
    return {
        "clip": {c: float(ENCODER.score(images.float(), [c] * len(images)).mean()) for c in SCORED_CAPTIONS},
        "area": np.array([m.area_fraction for m in ms]),
        "color": np.array([m.color for m in ms]),
        "size": np.array([m.size for m in ms]),
        "shape": np.array([m.shape for m in ms]),
        "centroid": np.array([[m.cx, m.cy] for m in ms]) * array.shape[1],  # pixels
        "redness": np.array([m.mean_rgb[0] - m.mean_rgb[2] if m.area_fraction > 0 else np.nan for m in ms]),
        "pixels": array,
    }


# visual sliders from 6 exact shapes pairs: (concept, balanced, trained on the pairs' captions)
PAIR_SLIDERS = {"pair-size": ("size", False, True), "pair-size-bal": ("size", True, True),
                "pair-size-empty": ("size", True, False), "pair-position": ("position", False, True)}
N_PAIRS = 6


def measure_alphas(denoiser, prompt: str, slider: str, alphas, base: dict, render: dict) -> dict[float, dict]:
    """Measurements of `prompt` per α of `slider`. α = 0 is the base model (scale 0 = LoRA off), so the
    given base measurements of the same prompt and seeds stand in for it."""
    return {a: base if a == 0 else measure(generate(denoiser, prompt, scales={slider: a}, **render)) for a in alphas}


def compare(m: dict, base: dict) -> dict[str, float]:
    """Change of every attribute against the α = 0 images of the same seeds."""
    return {
        "area": float(np.nanmean(m["area"])),
        "redness": float(np.nanmean(m["redness"])),
        "colour_same": float(np.mean(m["color"] == base["color"])),
        "shape_same": float(np.mean(m["shape"] == base["shape"])),
        "centroid_shift_px": float(np.nanmean(np.linalg.norm(m["centroid"] - base["centroid"], axis=1))),
        "dx_px": float(np.nanmean(m["centroid"][:, 0] - base["centroid"][:, 0])),  # signed horizontal move
        "pixel_l1": float(np.mean(np.abs(m["pixels"] - base["pixels"]))),
        "clip": m["clip"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHAPES_MODEL_DIR))
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--pair-lr", type=float, default=3e-3,
                        help="lr of the pair sliders (their gradients are weaker: the LoRA only sees the images' residual)")
    parser.add_argument("--seeds", type=int, default=48)
    parser.add_argument("--trajectory-reuse", type=int, default=TrainConfig.trajectory_reuse,
                        help="iterations per frozen trajectory for the text sliders (default: the trainer's)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    denoiser = load_diffusers_model(args.model)
    seeds = list(range(1000, 1000 + args.seeds))
    render = dict(seeds=seeds, steps=args.steps, guidance=args.guidance, resolution=32)

    train_seconds = {}
    for name, pair in SLIDERS.items():
        config = TrainConfig(iterations=args.iterations, lr=args.lr, resolution=32, rank=4, seed=0,
                             trajectory_reuse=args.trajectory_reuse, signs=SIGNS[name])
        result = train_text_slider(denoiser, [pair], config, name=name.replace("-", "_"), progress=True)
        train_seconds[name] = result.seconds
        print(f"trained {name}: {result.seconds:.0f} s, loss {result.losses[0]:.4g} → {result.final_loss:.4g}")
    # the old 'noxattn' layer set (now 'noxattn-ff'): same size slider, other layers
    config = TrainConfig(iterations=args.iterations, lr=args.lr, resolution=32, rank=4, seed=0, layers="noxattn-ff",
                         trajectory_reuse=args.trajectory_reuse, signs=SIGNS["size-ff"])
    train_seconds["size-ff"] = train_text_slider(denoiser, [SLIDERS["size"]], config, name="size_ff").seconds
    for name, (concept, balanced, captioned) in PAIR_SLIDERS.items():
        a, b = render_concept_pairs(concept, N_PAIRS, seed=0, balanced=balanced)
        captions = pair_captions(concept, N_PAIRS, seed=0, balanced=balanced) if captioned else None
        pairs = pairs_from_batches(torch.from_numpy(a), torch.from_numpy(b), 32, prompts=captions)
        config = PairTrainConfig(iterations=args.iterations, lr=args.pair_lr, rank=4, seed=0)
        train_seconds[name] = train_pair_slider(denoiser, pairs, config, name=name.replace("-", "_")).seconds
        print(f"trained {name} from {N_PAIRS} pairs: {train_seconds[name]:.0f} s")
    _, _, ref_iterations = reference_loop(denoiser, SLIDERS["size-abl"], 10**9, 32, 0, name="size_ref", lr=args.lr,
                                          seconds=train_seconds["size-abl"], keep=True)
    print(f"trained size-ref: {ref_iterations} iterations in {train_seconds['size-abl']:.0f} s (equal wall time)")

    adapter = {name: name.replace("-", "_") for name in
               ("size", "size-abl", "colour", "size-ref", "size-ff", *PAIR_SLIDERS)}
    base = measure(generate(denoiser, EVAL_PROMPT, scales={}, **render))
    results: dict[str, dict[float, dict[str, float]]] = {}
    for name in ("size", "size-abl", "size-ref", "size-ff", "colour", *PAIR_SLIDERS):
        results[name] = {a: compare(m, base) for a, m in
                         measure_alphas(denoiser, EVAL_PROMPT, adapter[name], ALPHAS, base, render).items()}
    prompted = {word: compare(measure(generate(denoiser, f"a {word} circle", scales={}, **render)), base)
                for word in ("small", "large", "red", "blue")}
    combos = {
        "size+2 alone": results["size"][2.0],
        "colour+2 alone": results["colour"][2.0],
        "size+2 & colour+2": compare(measure(generate(denoiser, EVAL_PROMPT, scales={"size": 2.0, "colour": 2.0},
                                                      **render)), base),
        "size−2 & colour−2": compare(measure(generate(denoiser, EVAL_PROMPT, scales={"size": -2.0, "colour": -2.0},
                                                      **render)), base),
    }
    # The attribute the prompt names should survive a slider for another attribute.
    held = {}
    for name, prompt in (("size", "a blue circle"), ("size-abl", "a blue circle"), ("colour", "a large circle")):
        held_base = measure(generate(denoiser, prompt, scales={}, **render))
        for a, m in measure_alphas(denoiser, prompt, adapter[name], (-1.0, 0.0, 1.0), held_base, render).items():
            held[(name, prompt, a)] = {**compare(m, held_base), "blue": float(np.mean(m["color"] == "blue")),
                                       "large": float(np.mean(m["size"] == "large"))}
    delayed = {(alpha, start): compare(measure(generate(denoiser, EVAL_PROMPT, scales={"size": alpha}, start=start,
                                                        **render)), base)
               for alpha in (2.0, -2.0) for start in (0.0, 0.2, 0.4)}
    write_report(args, results, prompted, combos, held, delayed, base, train_seconds, ref_iterations,
                 time.perf_counter() - started)


def write_report(args, results, prompted, combos, held, delayed, base, train_seconds, ref_iterations, total) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Slider quality on the shapes model ({args.seeds} seeds, eval prompt \"{EVAL_PROMPT}\", "
             f"{args.steps} steps, CFG {args.guidance}, {args.iterations} training iterations, "
             f"{torch.get_num_threads()} threads, {total / 60:.1f} min in all)", ""]
    lines += [f"Base (α = 0): mean area fraction {np.nanmean(base['area']):.3f}, redness "
              f"{np.nanmean(base['redness']):.3f} (mean R − B of the shape).", ""]
    header = ("| slider | α | area | Δarea | redness | colour same | shape same | centroid shift px | "
              "Δx px | pixel L1 | ΔCLIP |")
    lines += ["## Efficacy and preservation", "",
              "ΔCLIP: change of the shapes encoder's CLIP score (100 · cos) with the caption of the slider's positive "
              "side ('a large circle' for size, 'a red circle' for colour; none for position) against α = 0.", "",
              header, "|" + "---|" * 11]
    for name, rows in results.items():
        zero = rows[0.0]
        caption = TARGET_CAPTION.get(name)
        for a, r in rows.items():
            clip = f"{r['clip'][caption] - zero['clip'][caption]:+.1f}" if caption else "–"
            lines.append(f"| {name} | {a:+g} | {r['area']:.3f} | {r['area'] - zero['area']:+.3f} | {r['redness']:.3f} | "
                         f"{r['colour_same']:.0%} | {r['shape_same']:.0%} | {r['centroid_shift_px']:.2f} | "
                         f"{r['dx_px']:+.2f} | {r['pixel_l1']:.3f} | {clip} |")
    lines += ["", "Prompting the attribute directly (same seeds, compared with \"a circle\"):", "",
              "| prompt | area | redness | colour same | shape same | ΔCLIP (own caption) |", "|---|---|---|---|---|---|"]
    for word, r in prompted.items():
        caption = f"a {word} circle"
        clip = f"{r['clip'][caption] - base['clip'][caption]:+.1f}" if caption in r["clip"] else "–"
        lines.append(f"| a {word} circle | {r['area']:.3f} | {r['redness']:.3f} | {r['colour_same']:.0%} | "
                     f"{r['shape_same']:.0%} | {clip} |")
    lines += ["", "## Composition", "", "| sliders | area | redness | colour same | shape same | pixel L1 |",
              "|---|---|---|---|---|---|"]
    for label, r in combos.items():
        lines.append(f"| {label} | {r['area']:.3f} | {r['redness']:.3f} | {r['colour_same']:.0%} | "
                     f"{r['shape_same']:.0%} | {r['pixel_l1']:.3f} |")
    lines += ["", "## The prompted attribute held (a slider for another attribute on a prompt that names one)", "",
              "| slider | prompt | α | area | blue | large | shape same | pixel L1 |",
              "|---|---|---|---|---|---|---|---|"]
    for (name, prompt, a), r in held.items():
        lines.append(f"| {name} | {prompt} | {a:+g} | {r['area']:.3f} | {r['blue']:.0%} | {r['large']:.0%} | "
                     f"{r['shape_same']:.0%} | {r['pixel_l1']:.3f} |")
    lines += ["", "## Delayed LoRA (size slider, switched on after a fraction of the steps)", "",
              "| size α | start | area | shape same | colour same | centroid shift px | pixel L1 |",
              "|---|---|---|---|---|---|---|"]
    for (alpha, start), r in delayed.items():
        lines.append(f"| {alpha:+g} | {start:.0%} | {r['area']:.3f} | {r['shape_same']:.0%} | {r['colour_same']:.0%} | "
                     f"{r['centroid_shift_px']:.2f} | {r['pixel_l1']:.3f} |")
    text = results["size"]
    for name in ("pair-size", "pair-size-bal", "pair-size-empty"):
        pair = results[name]
        ratio = {a: (pair[a]["area"] - pair[0.0]["area"]) / (text[a]["area"] - text[0.0]["area"]) for a in (-1.0, 1.0)}
        lines += ["", f"{name} ({N_PAIRS} pairs) against the text size slider, Δarea at α −1 / +1: "
                  f"{ratio[-1.0]:.0%} / {ratio[1.0]:.0%} of the text slider's."]
    lines.append("")
    lines += ["", "## Training cost", "", "| slider | seconds | iterations |", "|---|---|---|"]
    for name, seconds in train_seconds.items():
        lines.append(f"| {name} | {seconds:.0f} | {args.iterations} |")
    lines.append(f"| size-ref (reference-structured, equal wall time to size-abl) | {train_seconds['size-abl']:.0f} | "
                 f"{ref_iterations} |")
    report = "\n".join(lines) + "\n"
    (args.out / "slider_quality.md").write_text(report)
    (args.out / "slider_quality.json").write_text(json.dumps(
        {"results": {k: {str(a): r for a, r in v.items()} for k, v in results.items()}, "prompted": prompted,
         "composition": combos, "held": {f"{n}|{q}|{a:+g}": v for (n, q, a), v in held.items()},
         "delayed": {f"alpha={a:+g},start={st}": v for (a, st), v in delayed.items()}}, indent=1))
    plot = line_plot({name: (list(rows), [r["area"] for r in rows.values()]) for name, rows in results.items()},
                     "mean shape area vs slider strength", "alpha", "area fraction")
    plot.save(args.out / "slider_quality.png")
    print(report)


if __name__ == "__main__":
    main()
