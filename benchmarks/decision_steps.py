"""When does the shapes model decide each attribute? A slider switched on at a later step tells.

The shipped size and colour sliders (models/sliders) are switched on after a fraction of the 25
sampling steps (delayed LoRA, the same noise as α = 0). For each switch-on point the share of
images whose size class, colour or shape changes, or whose centroid moves > 3 px, against α = 0,
with bootstrap 95 % intervals over the seeds. An attribute the slider can no longer change from a
given step on was decided before it; a leak that vanishes earlier than the target's change is a
leak a later switch-on can avoid (issue 13, item 1).

    python benchmarks/decision_steps.py [--seeds 96] [--prompt "a circle"]    # about 22 min on 2 CPU threads
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from sliderspace_purity import ATTRIBUTES, changed  # noqa: E402

from sliders_core.backends.diffusers_backend import load_diffusers_model  # noqa: E402
from sliders_core.inference import attach_slider_file, generate  # noqa: E402
from sliders_core.plots import line_plot  # noqa: E402
from sliders_core.shapes.metrics import measure_batch  # noqa: E402
from sliders_core.shapes.model import DEFAULT_GUIDANCE, DEFAULT_STEPS, SHAPES_MODEL_DIR  # noqa: E402

SLIDERS = {"size": ROOT / "models" / "sliders" / "shapes_size.safetensors",
           "colour": ROOT / "models" / "sliders" / "shapes_colour.safetensors"}
STARTS = (0.0, 0.04, 0.08, 0.12, 0.16, 0.2, 0.3, 0.4, 0.6)  # 0, 1, 2, 3, 4, 5, 8, 10, 15 of 25 steps
BOOTSTRAP = 2000


def interval(flags: np.ndarray, rng: np.random.Generator) -> tuple[float, float, float]:
    """Mean and bootstrap 95 % interval over the seeds."""
    means = flags[rng.integers(len(flags), size=(BOOTSTRAP, len(flags)))].mean(axis=1)
    return float(flags.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def write_json_atomic(path: Path, data) -> None:
    """A benchmark's results, whole or not at all: a long run that is stopped keeps its last full write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(data, indent=1) + "\n")
    temporary.replace(path)


def write_json(args, rows) -> None:
    write_json_atomic(args.out / "decision_steps.json", {"settings": {**vars(args), "out": str(args.out)}, "rows": rows})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=96)
    parser.add_argument("--prompt", default="a circle")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_diffusers_model(SHAPES_MODEL_DIR)
    render = {"seeds": list(range(2000, 2000 + args.seeds)), "steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE}
    for name, path in SLIDERS.items():
        attach_slider_file(model, path, name)
    base = measure_batch(generate(model, args.prompt, scales={}, **render).numpy())
    rng = np.random.default_rng(0)
    rows = []
    for name in SLIDERS:
        for alpha in (-1.0, 1.0):
            for start in STARTS:
                edited = measure_batch(generate(model, args.prompt, scales={name: alpha}, start=start,
                                                **render).numpy())
                rates = {a: interval(f, rng) for a, f in changed(base, edited).items()}
                rows.append({"slider": name, "alpha": alpha, "start": start,
                             "start_step": round(start * DEFAULT_STEPS), "rates": rates})
                print(name, alpha, start, {a: round(r[0], 2) for a, r in rates.items()}, flush=True)
                write_json(args, rows)  # after every row: a long run that is stopped keeps what it measured

    lines = [f"# When the shapes model decides each attribute ({args.seeds} seeds, prompt \"{args.prompt}\", "
             f"{DEFAULT_STEPS} steps, CFG {DEFAULT_GUIDANCE})", "",
             "The shipped slider switched on at the given step (delayed LoRA); share of images whose attribute "
             "changes against α = 0, with its bootstrap 95 % interval.", "",
             "| slider | α | on from step | " + " | ".join(ATTRIBUTES) + " |", "|---|---|---|" + "---|" * len(ATTRIBUTES)]
    for r in rows:
        cells = " | ".join(f"{m:.2f} [{lo:.2f}, {hi:.2f}]" for m, lo, hi in (r["rates"][a] for a in ATTRIBUTES))
        lines.append(f"| {r['slider']} | {r['alpha']:+g} | {r['start_step']} | {cells} |")
    (args.out / "decision_steps.md").write_text("\n".join(lines) + "\n")
    series = {f"{r0['slider']} α{r0['alpha']:+g}: {a}": ([r["start_step"] for r in rows if (r["slider"], r["alpha"])
                                                           == (r0["slider"], r0["alpha"])],
                                                          [r["rates"][a][0] for r in rows if (r["slider"], r["alpha"])
                                                           == (r0["slider"], r0["alpha"])])
              for r0 in rows[::len(STARTS)] for a in ("size", "colour")}
    line_plot(series, "share changed vs the step the slider switches on", "switch-on step",
              "share of images changed", width=900).save(args.out / "decision_steps.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
