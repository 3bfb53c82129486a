"""Is the colour leak of the size slider already in its training targets? (issue 13, item 1)

On frozen trajectories of "a circle" (the training sampler: 30 steps, CFG 3, the same states the
trainer draws x_t from) the image each training target predicts, x̂0 = (x_t − √(1−ᾱ)·ε)/√ᾱ, is
measured at several steps and compared with the trajectory's own final image: the share of seeds
whose x̂0 shows the final colour, and its mean area. Targets: the neutral prediction ε(x_t, c_t),
prompting "a small / large circle", and the slider targets at α = ±1 for eq. 8's pair contrast
(η 2 on the mean push over the four colours, the old recipe, and η 1, the new one) and the 'ends'
contrast (η 1).

    python benchmarks/target_colour.py [--seeds 96]      # about a minute on 2 CPU threads
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from decision_steps import interval  # noqa: E402
from disentanglement import CONCEPTS  # noqa: E402

from sliders_core.backends.diffusers_backend import load_diffusers_model  # noqa: E402
from sliders_core.shapes.metrics import measure_batch  # noqa: E402
from sliders_core.shapes.model import SHAPES_MODEL_DIR  # noqa: E402
from sliders_core.text_slider import encode_pair, frozen_target  # noqa: E402

STEPS = (1, 3, 6, 10, 15, 22)  # of the 30 trajectory steps; the trainer draws k from 1..29


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_diffusers_model(SHAPES_MODEL_DIR)
    assert model.pipe.scheduler.config.get("prediction_type", "epsilon") == "epsilon"
    size = CONCEPTS["size"].pair
    pair = encode_pair(model, size)
    pair_eta1 = encode_pair(model, dataclasses.replace(size, eta=1.0))
    ends = encode_pair(model, dataclasses.replace(size, eta=1.0), contrast="ends")
    noise = torch.cat([model.initial_noise(1, 32, torch.Generator().manual_seed(s))
                       for s in range(4000, 4000 + args.seeds)])
    with torch.no_grad():
        trajectory = model.sample(model.encode([size.target]), model.encode([""]), guidance=3.0, steps=30,
                                  noise=noise, record=True)
        final = measure_batch(model.decode(trajectory.final).numpy())
        rng = np.random.default_rng(0)
        rows = []
        for k in STEPS:
            x_t, level = trajectory.states[k], trajectory.levels[k]
            level = level.expand(len(x_t)) if level.dim() == 0 or len(level) != len(x_t) else level
            a = model._alpha_bar(level)
            eps = {"neutral ε(x_t, a circle)": trajectory.cond_outputs[k].float()}
            for text in ("a small circle", "a large circle"):
                eps[f"prompting '{text}'"] = model.predict(x_t, level, model.encode([text]).repeat_each(len(x_t))).float()
            for label, item in (("pair η 2", pair), ("pair η 1", pair_eta1), ("ends η 1", ends)):
                for scale in (-1.0, 1.0):
                    eps[f"{label}, α {scale:+g}"] = frozen_target(model, item, x_t, level, scale=scale)
            for label, e in eps.items():
                x0 = ((x_t.float() - (1 - a).sqrt() * e) / a.sqrt()).clamp(-1, 1)
                seen = measure_batch(model.decode(x0).numpy())
                rows.append({"step": k, "target": label,
                             "colour = final": interval(np.array([s.color == f.color for s, f in zip(seen, final)],
                                                                 float), rng),
                             "area": interval(np.array([s.area_fraction for s in seen]), rng)})
                print(k, label, rows[-1]["colour = final"][0], rows[-1]["area"][0], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "target_colour.json").write_text(json.dumps({"seeds": args.seeds, "rows": rows}, indent=1) + "\n")
    labels = list(dict.fromkeys(r["target"] for r in rows))
    lines = [f"# Colour in the size slider's training targets ({args.seeds} frozen trajectories of \"a circle\")", "",
             "Share of seeds whose predicted clean image x̂0 at trajectory step k (of 30) shows the colour of the "
             "trajectory's final image, with its bootstrap 95 % interval; mean area in brackets below.", "",
             "| target | " + " | ".join(f"step {k}" for k in STEPS) + " |", "|---|" + "---|" * len(STEPS)]
    for label in labels:
        cells = [r for r in rows if r["target"] == label]
        lines.append(f"| {label} | " + " | ".join(
            f"{r['colour = final'][0]:.0%} [{r['colour = final'][1]:.0%}, {r['colour = final'][2]:.0%}] "
            f"(area {r['area'][0]:.3f})" for r in cells) + " |")
    (args.out / "target_colour.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
