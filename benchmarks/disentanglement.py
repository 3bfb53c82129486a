"""Does a slider leave the rest of the picture alone? Training variants side by side, against prompting.

Every variant trains one slider on the shapes model (eq. 8, our loop, 300 iterations, the same seed)
and is measured on the same evaluation seeds at α = −2, −1, +1, +2 against α = 0: the share of
images whose own attribute changes (and in the right direction), the share that keep each free
attribute (colour, size, shape, position within 3 px), the mean area, the pixel distance to α = 0
(the LPIPS stand-in) and ΔCLIP with the shapes encoder, each with a bootstrap 95 % interval over the
seeds. Prompting the concept ("a small circle" against "a circle", same seeds) is the baseline a
slider must match: the same change in its own attribute, at least as many free attributes kept.

Variants (TrainConfig options, issue 13): the default; no preservation prompts (the paper's
ablation); both signs trained; x_t drawn under c_t ⊕ p; x_t drawn with the slider on (the
reference's loop); an anchor prompt; a level range; ranks 1 and 8; other layer presets; η = 1; and
the default switched on late (delayed LoRA at inference); the push projected off the preserved
attributes' own directions (project_preservation), with the ends contrast, lr and rank; one end
trained alone (the negative one mirrored); other training seeds; x_t drawn with the slider on;
4 trajectories per refresh (batch 4); two-ended sliders (one LoRA per end in one file).

    python benchmarks/disentanglement.py [--seeds 96] [--only size:default size:both-signs]
    # ≈ 2 min per variant on 2 CPU threads; the JSON is written after every variant and a rerun
    # skips the variants it already holds (--fresh to start over)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from decision_steps import interval, write_json_atomic  # noqa: E402
from sliderspace_purity import changed, main_share  # noqa: E402

from sliders_core.backends.diffusers_backend import load_diffusers_model  # noqa: E402
from sliders_core.config import TrainConfig  # noqa: E402
from sliders_core.inference import generate  # noqa: E402
from sliders_core.prompts import PromptPair  # noqa: E402
from sliders_core.shapes.data import COLORS, SIZES  # noqa: E402
from sliders_core.shapes.encoder import load_shapes_encoder  # noqa: E402
from sliders_core.shapes.metrics import measure_batch  # noqa: E402
from sliders_core.shapes.model import DEFAULT_GUIDANCE, DEFAULT_STEPS, SHAPES_MODEL_DIR  # noqa: E402
from sliders_core.text_slider import train_text_slider  # noqa: E402

ALPHAS = (-2.0, -1.0, 1.0, 2.0)
ETA = 2.0  # on the mean push over the preservation attributes, as in slider_quality.py
FREE = ("size", "colour", "shape", "position")


@dataclass(frozen=True)
class Concept:
    """A slider to train and how to judge it: its prompts, the prompt it is evaluated on, the attribute
    it owns, the prompts that say its two ends, and the caption ΔCLIP scores."""

    pair: PromptPair
    eval_prompt: str
    attribute: str
    prompted: tuple[str, str]  # (α < 0 end, α > 0 end)
    caption: str
    ends: tuple[str, str]  # the attribute's values at the two ends, for "moved the right way"
    ablation: PromptPair | None = None


CONCEPTS = {
    "size": Concept(
        PromptPair(target="a circle", positive="a large {p} circle", negative="a small {p} circle",
                   eta=ETA, preservation=COLORS),
        "a circle", "size", ("a small circle", "a large circle"), "a large circle", ("small", "large"),
        ablation=PromptPair(target="a circle", positive="a large circle", negative="a small circle", eta=ETA)),
    "colour": Concept(
        PromptPair(target="a circle", positive="a {p} red circle", negative="a {p} blue circle",
                   eta=ETA, preservation=SIZES),
        "a circle", "colour", ("a blue circle", "a red circle"), "a red circle", ("blue", "red"),
        ablation=PromptPair(target="a circle", positive="a red circle", negative="a blue circle", eta=ETA)),
    "shape": Concept(
        PromptPair(target="a shape", positive="a {p} square", negative="a {p} circle",
                   eta=ETA, preservation=COLORS),
        "a shape", "shape", ("a circle", "a square"), "a square", ("circle", "square"),
        ablation=PromptPair(target="a shape", positive="a square", negative="a circle", eta=ETA)),
}


@dataclass(frozen=True)
class Variant:
    options: dict = field(default_factory=dict)  # TrainConfig fields
    ablation: bool = False  # train without the preservation prompts
    start: float = 0.0  # switch the slider on after this fraction of the sampling steps
    # trained toward the α < 0 end only (the pair's ends swapped, one sign) and applied with its sign
    # flipped, so that its rows read like the others: is one end alone easier to fit than both?
    mirrored: bool = False


def ends_projected(eta: float, mirrored: bool = False, **options) -> Variant:
    """Each sign toward its own end, both signs trained (options may say signs="plus" for one end alone,
    "separate" for one LoRA per end), the push projected off the preserved attributes."""
    return Variant({"signs": "both", "contrast": "ends", "eta": eta, "project_preservation": True, **options},
                   mirrored=mirrored)


VARIANTS = {
    "default": Variant(),
    "no-preservation": Variant(ablation=True),
    "both-signs": Variant({"signs": "both"}),
    "ends, eta 1": Variant({"signs": "both", "contrast": "ends", "eta": 1.0}),
    "x_t under c_t+p": Variant({"trajectory_prompts": "preservation"}),
    "x_t slider on": Variant({"trajectory_slider": True}),
    "anchor empty prompt": Variant({"anchors": ("",)}),
    "levels 20-100 %": Variant({"level_range": (0.2, 1.0)}),
    "rank 1": Variant({"rank": 1}),
    "rank 8": Variant({"rank": 8}),
    "layers noxattn-ff": Variant({"layers": "noxattn-ff"}),
    "layers xattn": Variant({"layers": "xattn"}),
    "eta 1": Variant({"eta": 1.0}),
    # the shape slider at η 2 matches prompting only at α ±2: a larger η puts that strength at ±1
    "eta 4": Variant({"eta": 4.0}),
    "eta 4, both-signs": Variant({"eta": 4.0, "signs": "both"}),
    "eta 4, lr 3e-3": Variant({"eta": 4.0, "lr": 3e-3}),
    "eta 4, lr 3e-3, rank 8": Variant({"eta": 4.0, "lr": 3e-3, "rank": 8}),
    "eta 0.75": Variant({"eta": 0.75}),
    "eta 1, no-preservation": Variant({"eta": 1.0}, ablation=True),
    "eta 1, both-signs": Variant({"eta": 1.0, "signs": "both"}),
    # the shipped recipe with 2 instead of 3 trajectory samples per iteration (issue 15's speed levers)
    "eta 1, both-signs, reuse 30": Variant({"eta": 1.0, "signs": "both", "trajectory_reuse": 30}),
    "eta 1, both-signs, 20 trajectory steps": Variant({"eta": 1.0, "signs": "both", "trajectory_steps": 20}),
    # the push without its component along each preserved attribute's direction (project_preservation)
    "projected": Variant({"project_preservation": True}),
    "eta 1, both-signs, projected": Variant({"eta": 1.0, "signs": "both", "project_preservation": True}),
    **{f"ends, eta {eta:g}, projected{label}": ends_projected(eta, **extra) for eta, label, extra in (
        (1.0, "", {}), (2.0, "", {}), (1.0, ", lr 3e-3", {"lr": 3e-3}), (2.0, ", lr 3e-3", {"lr": 3e-3}),
        (3.0, ", lr 3e-3", {"lr": 3e-3}), (2.0, ", lr 3e-3, rank 8", {"lr": 3e-3, "rank": 8}),
        (3.0, ", lr 3e-3, rank 8", {"lr": 3e-3, "rank": 8}), (2.0, ", lr 3e-3, rank 16", {"lr": 3e-3, "rank": 16}),
        (2.0, ", lr 3e-3, rank 8, 600 it", {"lr": 3e-3, "rank": 8, "iterations": 600}),
        (1.0, ", 600 it", {"iterations": 600}),
        # the same recipe from other training seeds: how much of a row is the training run's luck
        (3.0, ", lr 3e-3, rank 8, seed 1", {"lr": 3e-3, "rank": 8, "seed": 1}),
        (3.0, ", lr 3e-3, rank 8, seed 2", {"lr": 3e-3, "rank": 8, "seed": 2}),
        # the empty prompt's prediction held: under CFG (w 3) the slider's change is then w × its push, as
        # prompting's is w × (ε(end) − ε(c_t)), so η 1 asks for the prompted end's guided change
        (1.0, ", lr 3e-3, anchor empty", {"lr": 3e-3, "anchors": ("",)}),
        (1.0, ", lr 3e-3, rank 8, anchor empty", {"lr": 3e-3, "rank": 8, "anchors": ("",)}),
        # x_t drawn with the slider on at the sign it trains: the slider learns on the states it makes
        (2.0, ", lr 3e-3, x_t slider on", {"lr": 3e-3, "trajectory_slider": True}),
        (2.0, ", lr 3e-3, rank 8, x_t slider on", {"lr": 3e-3, "rank": 8, "trajectory_slider": True}),
        (3.0, ", lr 3e-3, x_t slider on", {"lr": 3e-3, "trajectory_slider": True}))},
    # one end each: the α > 0 end alone, and the α < 0 end alone (mirrored)
    **{f"one end {sign}, eta {eta:g}, projected, lr 3e-3{label}": ends_projected(
        eta, mirrored=sign == "−", signs="plus", lr=3e-3, **extra) for sign in "+−" for eta, label, extra in (
           (2.0, "", {}), (2.0, ", rank 8", {"rank": 8}), (1.0, "", {}),
           (2.0, ", x_t slider on", {"trajectory_slider": True}),
           (2.0, ", x_t under c_t+p", {"trajectory_prompts": "preservation"}),
           (2.0, ", seed 1", {"seed": 1}), (2.0, ", x_t slider on, seed 1", {"trajectory_slider": True, "seed": 1}),
           (2.0, ", x_t slider on, seed 2", {"trajectory_slider": True, "seed": 2}),
           # 4 trajectories per refresh and 4 states per step: 60 training images instead of 15 per run,
           # against the training seed's luck
           *((2.0, f", x_t slider on, batch 4{f', seed {seed}' if seed else ''}",
              {"trajectory_slider": True, "batch_size": 4, "seed": seed}) for seed in (0, 1, 2)))},
    # both ends in one file, one LoRA per end (signs="separate"), applied by the sign of α; the ends take
    # turns, so 600 iterations give each the 300 of a "one end" row
    **{f"two-ended, eta {eta:g}, projected, lr 3e-3, x_t slider on, 600 it{label}": ends_projected(
        eta, signs="separate", lr=3e-3, trajectory_slider=True, iterations=600, **extra) for eta, label, extra in (
           (2.0, "", {}), (2.0, ", seed 2", {"seed": 2}),
           *((2.0, f", batch 4{f', seed {seed}' if seed else ''}", {"batch_size": 4, "seed": seed}) for seed in (0, 1, 2)),
           # a stronger push for the shape slider's weak circle end
           (3.0, "", {}), (3.0, ", seed 1", {"seed": 1}), (3.0, ", seed 2", {"seed": 2}))},
    # each end its own η: the colour slider's blue end keeps the size at η 3, its red end at η 2; the
    # shape slider's circle end may want more than its square end's 3
    **{f"two-ended, eta {eta:g} (negative end {negative:g}), projected, lr 3e-3, x_t slider on, 600 it"
       f"{f', seed {seed}' if seed else ''}":
       ends_projected(eta, signs="separate", negative_eta=negative, lr=3e-3, trajectory_slider=True, iterations=600,
                      seed=seed) for eta, negative in ((2.0, 3.0), (3.0, 4.0), (3.5, 4.0)) for seed in (0, 1, 2)},
    "eta 1, on from step 5": Variant({"eta": 1.0}, start=0.2),
    "default, on from step 5": Variant(start=0.2),
}
# the order of a full run: the candidates most likely to matter first, so a run stopped early says most
DEFAULT_KEYS = [f"size:{v}" for v in (
    "default", "no-preservation", "both-signs", "ends, eta 1", "eta 1", "x_t under c_t+p", "anchor empty prompt",
    "levels 20-100 %", "eta 1, no-preservation", "eta 1, both-signs")] + [
    f"{c}:{v}" for c in ("colour", "shape") for v in ("default", "eta 1", "eta 1, both-signs", "both-signs")] + [
    f"size:{v}" for v in ("eta 1, on from step 5", "default, on from step 5", "x_t slider on", "rank 1",
                          "layers noxattn-ff", "eta 0.75")] + [
    f"{c}:{v}" for c in ("colour", "shape") for v in ("no-preservation", "eta 1, no-preservation")] + [
    "size:rank 8", "size:layers xattn"]
ENCODER = load_shapes_encoder()


def measure(images: torch.Tensor, captions) -> dict:
    return {"m": measure_batch(images.numpy()), "pixels": images.numpy(),
            "clip": {c: ENCODER.score(images.float(), [c] * len(images)).numpy() for c in captions}}


def rates(concept: Concept, base: dict, edited: dict, rng: np.random.Generator, positive: bool) -> dict:
    """Every number of one row, each as (mean, low, high) over the seeds."""
    flags = changed(base["m"], edited["m"])
    attr = concept.attribute
    field_of = {"size": "size", "colour": "color", "shape": "shape"}[attr]
    end = concept.ends[1 if positive else 0]
    own_end = np.array([getattr(m, field_of) == end for m in edited["m"]], float)
    row = {"own changed": interval(flags[attr], rng), "at the end": interval(own_end, rng),
           "area": interval(np.array([m.area_fraction for m in edited["m"]]), rng),
           "pixel L1": interval(np.abs(edited["pixels"] - base["pixels"]).mean(axis=(1, 2, 3)), rng),
           "ΔCLIP": interval(edited["clip"][concept.caption] - base["clip"][concept.caption], rng)}
    for free in FREE:
        if free != attr:
            row[f"{free} kept"] = interval(1 - flags[free], rng)
    return row


def train(model, concept: Concept, variant: Variant, iterations: int, name: str) -> float:
    options = dict(variant.options)
    pair = concept.ablation if variant.ablation else concept.pair
    if variant.mirrored:
        pair = dataclasses.replace(pair, positive=pair.negative, negative=pair.positive)
    if "eta" in options:  # on the pair, so that no-preservation variants get the same push
        eta = options.pop("eta")
        pair = dataclasses.replace(pair, eta=eta)
    config = TrainConfig(iterations=options.pop("iterations", iterations), lr=options.pop("lr", 1e-3), resolution=32,
                         rank=options.pop("rank", 4), seed=options.pop("seed", 0), **options)
    return train_text_slider(model, [pair], config, name=name, progress=False).seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=96)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--only", nargs="*", help="concept:variant keys (default: DEFAULT_KEYS)")
    parser.add_argument("--fresh", action="store_true", help="ignore the rows already in the JSON")
    parser.add_argument("--report", action="store_true", help="only rewrite the .md from the JSON")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = args.out / "disentanglement.json"
    saved = {} if args.fresh or not path.exists() else json.loads(path.read_text())
    rows, prompted = saved.get("rows", {}), saved.get("prompted", {})
    if args.report:
        args.seeds, args.iterations = saved["settings"]["seeds"], saved["settings"]["iterations"]
        return write_report(args, rows, prompted)
    keys = args.only or DEFAULT_KEYS
    model = load_diffusers_model(SHAPES_MODEL_DIR)
    render = {"seeds": list(range(3000, 3000 + args.seeds)), "steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE}
    rng = np.random.default_rng(0)
    bases, adapters = {}, {}

    def base_of(concept: Concept) -> dict:
        if concept.eval_prompt not in bases:
            bases[concept.eval_prompt] = measure(generate(model, concept.eval_prompt, scales={}, **render),
                                                 [c.caption for c in CONCEPTS.values()])
        return bases[concept.eval_prompt]

    def save() -> None:
        write_json_atomic(path, {"settings": {"seeds": args.seeds, "iterations": args.iterations,
                                              "eval_seeds": [render["seeds"][0], render["seeds"][-1]]},
                                 "rows": rows, "prompted": prompted})

    for key in keys:
        concept_name, variant_name = key.split(":", 1)
        concept, variant = CONCEPTS[concept_name], VARIANTS[variant_name]
        if key in rows and concept_name in prompted:
            continue
        base = base_of(concept)
        if concept_name not in prompted:
            prompted[concept_name] = {
                text: rates(concept, base, measure(generate(model, text, scales={}, **render), [concept.caption]),
                            rng, positive=side == 1) for side, text in enumerate(concept.prompted)}
            save()
        if key in rows:
            continue
        started = time.perf_counter()
        # a variant that differs only in its switch-on step reuses the slider trained with its options
        training = (concept_name, json.dumps(variant.options, sort_keys=True, default=str), variant.ablation,
                    variant.mirrored)
        if training not in adapters:
            name = f"{concept_name}_{len(adapters)}"
            adapters[training] = name, train(model, concept, variant, args.iterations, name)
        name, seconds = adapters[training]
        rows[key] = {"train seconds": seconds, "alphas": {
            f"{a:+g}": rates(concept, base, measure(generate(model, concept.eval_prompt,
                                                             scales={name: -a if variant.mirrored else a},
                                                             start=variant.start, **render), [concept.caption]),
                             rng, positive=a > 0) for a in ALPHAS}}
        save()
        one = rows[key]["alphas"]
        print(f"{key}: {seconds:.0f} s training, {time.perf_counter() - started:.0f} s in all; "
              + "; ".join(f"α{a}: own {r['own changed'][0]:.2f}, "
                          + ", ".join(f"{k.split()[0]} {v[0]:.2f}" for k, v in r.items() if k.endswith("kept"))
                          for a, r in one.items()), flush=True)
    write_report(args, rows, prompted)


def cell(value, percent: bool = True) -> str:
    mean, low, high = value
    return f"{mean:.0%} [{low:.0%}, {high:.0%}]" if percent else f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def write_report(args, rows: dict, prompted: dict) -> None:
    lines = [f"# Disentanglement on the shapes model ({args.seeds} evaluation seeds, {args.iterations} training "
             f"iterations, {DEFAULT_STEPS} sampling steps, CFG {DEFAULT_GUIDANCE})", "",
             "Every cell: the share of images (or the mean) with its bootstrap 95 % interval over the seeds, "
             "against α = 0 on the same seeds. *own changed*: the slider's attribute differs from α = 0; "
             "*at the end*: it shows the value of the slider's end (small/large, blue/red, circle/square). "
             "Prompting rows compare the prompt that names the end with the slider's evaluation prompt.", ""]
    for concept_name, concept in CONCEPTS.items():
        keyed = {k.split(":", 1)[1]: v for k, v in rows.items() if k.startswith(concept_name + ":")}
        if not keyed:
            continue
        free = [f for f in FREE if f != concept.attribute]
        header = ["variant", "α", "own changed", "at the end", *[f"{f} kept" for f in free], "area", "pixel L1", "ΔCLIP"]
        lines += [f"## {concept_name} slider (evaluated on \"{concept.eval_prompt}\")", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for side, text in enumerate(concept.prompted):
            r = prompted[concept_name][text]
            lines.append(f"| prompting \"{text}\" | {'+' if side else '−'} | " + " | ".join(
                [cell(r["own changed"]), cell(r["at the end"]), *[cell(r[f"{f} kept"]) for f in free],
                 cell(r["area"], False), cell(r["pixel L1"], False), f"{r['ΔCLIP'][0]:+.1f}"]) + " |")
        for variant_name, row in keyed.items():
            for a, r in row["alphas"].items():
                lines.append(f"| {variant_name} | {a} | " + " | ".join(
                    [cell(r["own changed"]), cell(r["at the end"]), *[cell(r[f"{f} kept"]) for f in free],
                     cell(r["area"], False), cell(r["pixel L1"], False), f"{r['ΔCLIP'][0]:+.1f}"]) + " |")
        lines += ["", "Training seconds: " + ", ".join(f"{v}: {row['train seconds']:.0f}" for v, row in keyed.items()), ""]
    lines += purity_table(rows, prompted)
    (args.out / "disentanglement.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def purity(minus: dict, plus: dict, attribute: str) -> tuple[str, float]:
    """SliderSpace's purity (benchmarks/sliderspace_purity.py) of one slider at ±a: each attribute's
    change rate averaged over the two signs; the largest rate's share of their sum, and which it is."""
    rates = {attribute: (minus["own changed"][0] + plus["own changed"][0]) / 2}
    rates |= {k.split()[0]: 1 - (minus[k][0] + plus[k][0]) / 2 for k in minus if k.endswith(" kept")}
    return main_share(rates)


def purity_table(rows: dict, prompted: dict) -> list[str]:
    """The named sliders and prompts measured as SliderSpace measures its discovered sliders."""
    lines = ["## Purity (SliderSpace's metric) of every row above", "",
             "The main attribute's share of the summed change rates (size, colour, shape, position), the rates "
             "averaged over −a and +a; point estimates.", "",
             "| slider | variant | ±1 | ±2 |", "|---|---|---|---|"]
    for concept_name, concept in CONCEPTS.items():
        if concept_name in prompted:
            minus, plus = prompted[concept_name].values()
            main, value = purity(minus, plus, concept.attribute)
            lines.append(f"| {concept_name} | prompting {' / '.join(concept.prompted)} | {value:.2f} ({main}) | – |")
        for key, row in rows.items():
            if key.startswith(concept_name + ":"):
                a = row["alphas"]
                cells = [f"{value:.2f} ({main})" for main, value in
                         (purity(a[f"-{m}"], a[f"+{m}"], concept.attribute) for m in (1, 2))]
                lines.append(f"| {concept_name} | {key.split(':', 1)[1]} | " + " | ".join(cells) + " |")
    return lines + [""]


if __name__ == "__main__":
    main()
