"""SliderSpace on the shapes world: which attribute does each discovered slider move, and how purely?

For each concept, SliderSpace (sliders_core/sliderspace.py) generates images, embeds them with the
shapes encoder, takes K principal directions and trains one slider per direction. Each slider is
then measured with the exact pixel metrics on fresh seeds at α = −1 and +1 against α = 0 (the same
noise): the share of images whose size class, colour or shape changes, and whose centroid moves by
more than 3 px. A slider's purity is its largest rate over the sum of its four rates (1 = it moves
one attribute only).

    python benchmarks/sliderspace_purity.py [--concepts "a shape" "a circle"] [--k 4] [--seeds 32]
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

from sliders_core.backends.diffusers_backend import load_diffusers_model  # noqa: E402
from sliders_core.inference import generate  # noqa: E402
from sliders_core.shapes.encoder import load_shapes_encoder  # noqa: E402
from sliders_core.shapes.metrics import measure_batch  # noqa: E402
from sliders_core.shapes.model import DEFAULT_GUIDANCE, DEFAULT_STEPS, SHAPES_MODEL_DIR  # noqa: E402
from sliders_core.sliderspace import (  # noqa: E402
    ROTATIONS,
    SliderSpaceConfig,
    generate_concept_images,
    principal_directions,
    train_sliderspace,
)

ATTRIBUTES = ("size", "colour", "shape", "position")
# the floor a slider is compared with: naming one attribute in the prompt, same seeds
PROMPTED = {"a shape": ("a large shape", "a red shape", "a circle"), "a circle": ("a large circle", "a red circle")}
MOVED_PX = 3.0


def changed(base, edited, side: int = 32) -> dict[str, np.ndarray]:
    """Per image: 1 where the attribute differs from the α = 0 image of the same seed."""
    def moved(a, b):
        return np.hypot(a.cx - b.cx, a.cy - b.cy) * side > MOVED_PX if np.isfinite(a.cx) and np.isfinite(b.cx) else True
    return {"size": np.array([a.size != b.size for a, b in zip(base, edited)], float),
            "colour": np.array([a.color != b.color for a, b in zip(base, edited)], float),
            "shape": np.array([a.shape != b.shape for a, b in zip(base, edited)], float),
            "position": np.array([moved(a, b) for a, b in zip(base, edited)], float)}


def change_rates(base, edited, side: int = 32) -> dict[str, float]:
    """Share of images whose attribute differs from the α = 0 image of the same seed."""
    return {a: float(flags.mean()) for a, flags in changed(base, edited, side).items()}


def main_share(rates: dict[str, float]) -> tuple[str, float]:
    """The attribute with the largest change rate and its share of all the rates: a slider's purity
    (0 when nothing changes)."""
    main = max(rates, key=rates.get)
    total = sum(rates.values())
    return main, rates[main] / total if total else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concepts", nargs="+", default=["a shape", "a circle"])
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--rotation", default="independent", choices=ROTATIONS)
    parser.add_argument("--iterations", type=int, default=SliderSpaceConfig.iterations)
    parser.add_argument("--lr", type=float, default=SliderSpaceConfig.lr)
    parser.add_argument("--seeds", type=int, default=32, help="fresh evaluation seeds per slider and α")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, encoder = load_diffusers_model(SHAPES_MODEL_DIR), load_shapes_encoder()
    sampling = {"steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE}
    seeds = list(range(1000, 1000 + args.seeds))
    report = {"settings": vars(args), "concepts": {}}
    for concept in args.concepts:
        started = time.perf_counter()
        forwards = model.forward_count
        images = generate_concept_images(model, concept, args.images, seed=0, **sampling)
        directions, explained = principal_directions(encoder.embed(images.images.float()), args.k, args.rotation)
        name = concept.replace(" ", "_")
        train_sliderspace(model, encoder, images, directions, explained, concept,
                          SliderSpaceConfig(iterations=args.iterations, lr=args.lr), name=name, progress=False)
        cost = {"images": args.images, "unet_forwards": model.forward_count - forwards,
                "seconds": round(time.perf_counter() - started, 1)}
        base = measure_batch(generate(model, concept, scales={}, seeds=seeds, **sampling).numpy())
        sliders = []
        for j in range(args.k):
            rates = {}
            for alpha in (-1.0, 1.0):
                edited = measure_batch(generate(model, concept, scales={f"{name}_{j}": alpha}, seeds=seeds,
                                                **sampling).numpy())
                rates[f"{alpha:+g}"] = change_rates(base, edited)
            main_attribute, purity = main_share({a: (rates["-1"][a] + rates["+1"][a]) / 2 for a in ATTRIBUTES})
            sliders.append({"direction": j, "explained_variance": round(float(explained[j]), 4),
                            "change_rates": rates, "main": main_attribute, "purity": round(purity, 3)})
        for j in range(args.k):
            model.sliders.remove(f"{name}_{j}")
        prompted = {}
        for prompt in PROMPTED.get(concept, ()):
            rates = change_rates(base, measure_batch(generate(model, prompt, scales={}, seeds=seeds, **sampling).numpy()))
            main_attribute, purity = main_share(rates)
            prompted[prompt] = {"change_rates": rates, "main": main_attribute, "purity": round(purity, 3)}
        report["concepts"][concept] = {"cost": cost, "sliders": sliders, "prompted": prompted}
        print(json.dumps({concept: report["concepts"][concept]}, indent=1), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"sliderspace_purity_{args.rotation}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    lines = [f"# SliderSpace on the shapes world ({args.seeds} fresh seeds per slider and α, K = {args.k}, "
             f"{args.images} images, {args.rotation} directions, {args.iterations} steps per slider, lr {args.lr})", "",
             "Share of images whose attribute changes against α = 0 (mean of α −1 and +1); purity = the main "
             "attribute's share of the sum. 'prompt' rows: the same seeds prompted with one attribute named instead "
             "(the floor of what naming an attribute leaves alone).", "",
             "| concept | slider | explained variance | size | colour | shape | position | main | purity |",
             "|---|---|---|---|---|---|---|---|---|"]
    for concept, result in report["concepts"].items():
        for s in result["sliders"]:
            mean = {a: (s["change_rates"]["-1"][a] + s["change_rates"]["+1"][a]) / 2 for a in ATTRIBUTES}
            lines.append(f"| {concept} | {s['direction']} | {s['explained_variance']:.3f} | "
                         + " | ".join(f"{mean[a]:.2f}" for a in ATTRIBUTES) + f" | {s['main']} | {s['purity']:.2f} |")
        for prompt, p in result["prompted"].items():
            lines.append(f"| {concept} | prompt '{prompt}' | – | "
                         + " | ".join(f"{p['change_rates'][a]:.2f}" for a in ATTRIBUTES) + f" | {p['main']} | "
                         f"{p['purity']:.2f} |")
    lines += ["", "Cost: " + "; ".join(f"{c}: {r['cost']['images']} images, {r['cost']['unet_forwards']} UNet "
                                       f"forwards, {r['cost']['seconds']} s" for c, r in report["concepts"].items())]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
