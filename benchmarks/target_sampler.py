"""Is a slider's leak in its eq. 8 target, or in the LoRA that fits it? (issue 13, item 1)

A perfectly fitted slider would make the model predict, under the evaluation prompt c, the eq. 8
target ε(x, c) + α·η·mean_p[ε(x, c+ ⊕ p) − ε(x, c- ⊕ p)] at every state it meets. This script samples
with exactly that: the conditional branch of CFG replaced by the frozen model's composed target, on
the same seeds, noise and sampler as `disentanglement.py` (so α = 0 reproduces its base images bit
for bit, and its prompting rows are the same). The rows measure the targets themselves, with no LoRA
in the way: what a slider trained to convergence on them could at best deliver.

    python benchmarks/target_sampler.py [--seeds 96] [--only colour shape]   # about a minute per row
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from decision_steps import write_json_atomic  # noqa: E402
from disentanglement import ALPHAS, CONCEPTS, FREE, cell, measure, rates  # noqa: E402

from sliders_core.backends.diffusers_backend import load_diffusers_model  # noqa: E402
from sliders_core.inference import generate  # noqa: E402
from sliders_core.shapes.model import DEFAULT_GUIDANCE, DEFAULT_STEPS, SHAPES_MODEL_DIR  # noqa: E402
from sliders_core.text_slider import encode_pair, frozen_target  # noqa: E402

# target variants: label → (PromptPair overrides, encode_pair contrast[, project_preservation])
TARGETS = {
    "eq. 8, η 2": ({}, "pair"),
    "eq. 8, η 2, projected": ({}, "pair", True),
    "ends, η 1, projected": ({"eta": 1.0}, "ends", True),
    "ends, η 2, projected": ({"eta": 2.0}, "ends", True),
    "eq. 8, η 1": ({"eta": 1.0}, "pair"),
    "eq. 8, η 4": ({"eta": 4.0}, "pair"),
    "no preservation, η 2": ({"preservation": ()}, "pair"),
    "ends, η 1": ({"eta": 1.0}, "ends"),
    "ends, η 2": ({"eta": 2.0}, "ends"),
}


@torch.no_grad()
def composed_sample(model, item, alpha: float, prompt: str, seeds) -> torch.Tensor:
    """`generate`'s sampler with the conditional prediction replaced by the eq. 8 target at α."""
    noise = torch.cat([model.initial_noise(1, model.default_resolution, torch.Generator().manual_seed(s))
                       for s in seeds])
    generator = torch.Generator().manual_seed(seeds[0])
    scheduler = model.new_scheduler(DEFAULT_STEPS, noise)
    cond, uncond = model.encode([prompt]), model.encode([""])
    x = noise.float() * getattr(scheduler, "init_noise_sigma", 1.0)
    batch = len(x)
    for t in scheduler.timesteps:
        level = t.expand(batch)
        both = model.predict(torch.cat([x, x]), torch.cat([level, level]),
                             type(cond).cat([uncond.for_batch(batch), cond.for_batch(batch)]))
        out_u, out_c = both.float().chunk(2)
        if alpha:
            direction = 1.0 if alpha > 0 else -1.0
            # the target is linear in α for the pair contrast; 'ends' has one target per sign
            out_c = out_c + abs(alpha) * (frozen_target(model, item, x, level, out_c, scale=direction) - out_c)
        out = out_u + DEFAULT_GUIDANCE * (out_c - out_u)
        x = scheduler.step(out.to(x.dtype), t, x, generator=generator).prev_sample
    return model.decode(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=96)
    parser.add_argument("--only", nargs="*", default=list(CONCEPTS))
    parser.add_argument("--targets", nargs="*", default=list(TARGETS))
    parser.add_argument("--alphas", nargs="*", type=float, default=list(ALPHAS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_diffusers_model(SHAPES_MODEL_DIR)
    seeds = list(range(3000, 3000 + args.seeds))
    rng = np.random.default_rng(0)
    results, lines = {}, [f"# The eq. 8 targets sampled directly ({args.seeds} seeds, {DEFAULT_STEPS} steps, "
                          f"CFG {DEFAULT_GUIDANCE}): what a perfectly fitted slider would do", ""]
    for concept_name in args.only:
        concept = CONCEPTS[concept_name]
        base_images = generate(model, concept.eval_prompt, scales={}, seeds=seeds, steps=DEFAULT_STEPS,
                               guidance=DEFAULT_GUIDANCE)
        gap = (composed_sample(model, None, 0.0, concept.eval_prompt, seeds) - base_images).abs().max()
        assert gap < 1e-5, f"α = 0 must reproduce the base images (max difference {gap:.2e})"
        base = measure(base_images, [concept.caption])
        free = [f for f in FREE if f != concept.attribute]
        lines += [f"## {concept_name} (evaluated on \"{concept.eval_prompt}\")", "",
                  "| target | α | own changed | at the end | " + " | ".join(f"{f} kept" for f in free)
                  + " | area |", "|" + "---|" * (5 + len(free))]
        for label in args.targets:
            overrides, contrast, *projected = TARGETS[label]
            pair = dataclasses.replace(concept.pair, **overrides)
            item = encode_pair(model, pair, contrast=contrast, project=bool(projected))
            for alpha in args.alphas:
                if contrast == "ends" and abs(alpha) != 1:
                    continue  # 'ends' is not linear in α: only its trained points
                edited = measure(composed_sample(model, item, alpha, concept.eval_prompt, seeds), [concept.caption])
                row = rates(concept, base, edited, rng, positive=alpha > 0)
                results[f"{concept_name}:{label}:{alpha:+g}"] = row
                lines.append(f"| {label} | {alpha:+g} | {cell(row['own changed'])} | {cell(row['at the end'])} | "
                             + " | ".join(cell(row[f"{f} kept"]) for f in free)
                             + f" | {row['area'][0]:.3f} |")
                print(lines[-1], flush=True)
        lines.append("")
    write_json_atomic(args.out / "target_sampler.json", {"seeds": args.seeds, "rows": results})
    (args.out / "target_sampler.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
