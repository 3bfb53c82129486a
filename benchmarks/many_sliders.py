"""Sampling with many sliders at once: 1, 10 and 50, on both backends, side by side in one run.

    python benchmarks/many_sliders.py [--counts 1,10,50] [--images 4] [--steps 25] [--json out.json]
    COMFYUI_DIR=/path/to/ComfyUI python benchmarks/many_sliders.py     # adds the ComfyUI rows

Sliders: random rank-4 LoRAs on the official `noxattn` layers of the shapes model (a trained slider's
size of weights; the timing does not depend on what they learned), each at α 1/√N so the mix stays
in range.

- Core (diffusers backend): `inference.generate` folds the sliders into the weights
  (`PeftSliderHost.merging`); the same call with folding off runs one peft LoRA branch per slider in
  every forward, as sampling did before. The fold is timed on its own and taken out of the sampling
  time, and the images are compared (max |Δ| of 0..1 pixels).
- ComfyUI (when COMFYUI_DIR is set): Slider Mixer's MODEL sampled by the stock KSampler (euler, 4
  images); ComfyUI folds the patches into the weights when it loads the model, timed on its own as
  "patch". The outputs are compared, one model call at the same input, with the same sliders as live
  weight wrappers (ComfySliderHost, the Delayed-LoRA Sampler's path).

Times are the minimum of `--repeats` runs, 1 thread.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

PROMPT = "a circle"


def best_of(repeats: int, run) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return min(times), result


def random_weights(host, modules, name: str, seed: int):
    """A rank-4 slider with random weights on `modules` of `host`, exported as SliderWeights."""
    host.add(name, modules=modules, rank=4, alpha=1.0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in host.parameters(name):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.03)
    return host.export(name)


def core_rows(counts, images, steps, repeats) -> tuple[list[dict], list]:
    from sliders_core.cli import load_model
    from sliders_core.inference import generate
    from sliders_core.training import slider_modules

    denoiser = load_model("shapes")
    modules = slider_modules(denoiser, "noxattn")
    exported = [random_weights(denoiser.sliders, modules, f"s{i}", seed=i) for i in range(max(counts))]
    seeds = list(range(images))
    host = denoiser.sliders
    fold = host.merging
    base = generate(denoiser, PROMPT, scales={}, seeds=seeds, steps=steps, guidance=3.0)
    rows = []
    for n in counts:
        scales = {f"s{i}": 1 / math.sqrt(n) for i in range(n)}
        kwargs = dict(scales=scales, seeds=seeds, steps=steps, guidance=3.0)

        def fold_only(scales=scales):
            with host.merging():
                host.set_scales(scales)

        fold_s, _ = best_of(repeats, fold_only)
        merged_s, merged = best_of(repeats, lambda kwargs=kwargs: generate(denoiser, PROMPT, **kwargs))
        host.merging = contextlib.nullcontext  # every slider live: one LoRA branch each, per forward
        live_s, live = best_of(repeats, lambda kwargs=kwargs: generate(denoiser, PROMPT, **kwargs))
        host.merging = fold
        rows.append(dict(backend="core", sliders=n, sample_s=merged_s - fold_s, live_s=live_s, patch_s=fold_s,
                         max_diff=float((merged - live).abs().max()), effect=float((merged - base).abs().max())))
        print_row(rows[-1])
    return rows, exported


def comfy_rows(counts, images, steps, repeats, exported) -> list[dict]:
    import comfy_support

    comfy_support.import_comfy()
    from backend_speed import load_pack

    load_pack()
    import comfy.model_management
    from concept_sliders_pack.nodes import NODE_CLASS_MAPPINGS
    from concept_sliders_pack.nodes.comfy_backend import ComfyDenoiser, ksample
    from concept_sliders_pack.nodes.common import SliderFile

    with torch.inference_mode():
        model, clip, _ = NODE_CLASS_MAPPINGS["ConceptSlidersLoadShapesModel"]().load("shapes-v1", True)
        positive = [[clip.encode_from_tokens(clip.tokenize(PROMPT)), {}]]
        negative = [[clip.encode_from_tokens(clip.tokenize("")), {}]]
    files = []
    for i, weights in enumerate(exported):
        weights.metadata = {"sliders.family": "shapes"}
        files.append(SliderFile.from_weights(weights, f"s{i}"))
    latent = {"samples": torch.zeros(images, 3, 32, 32)}
    gen = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(1, 3, 32, 32, generator=gen), torch.tensor([2.0])
    rows = []
    for n in counts:
        alphas = [1 / math.sqrt(n)] * n
        with torch.inference_mode():
            mixed, _ = NODE_CLASS_MAPPINGS["ConceptSlidersMixer"]().apply(
                model, "", sliders=files[:n], alphas=", ".join(map(str, alphas)))

        def patch(mixed=mixed):
            comfy.model_management.unload_all_models()
            comfy.model_management.load_models_gpu([mixed])

        def sample(mixed=mixed):
            with torch.inference_mode():
                return ksample(mixed, 0, steps, 3.0, "euler", "normal", positive, negative, latent)["samples"]

        patch_s, _ = best_of(repeats, patch)
        sample_s, _ = best_of(repeats, sample)
        # the same sliders as live weight wrappers, one model call against the patched MODEL's
        live = ComfyDenoiser(model, clip)
        for i in range(n):
            live.sliders.add(f"s{i}", files[i].resolve(model))
        with torch.inference_mode():
            cond = live.encode([PROMPT])
            live.sliders.set_scales({f"s{i}": a for i, a in enumerate(alphas)})
            out_live = live.predict(x, sigma, cond)
            live.sliders.set_scales({})
            out_base = live.predict(x, sigma, cond)
            patched = ComfyDenoiser(mixed, clip)  # loads the Mixer's MODEL in the live one's place
            out_patched = patched.predict(x, sigma, patched.encode([PROMPT]))
        rows.append(dict(backend="comfyui", sliders=n, sample_s=sample_s, patch_s=patch_s,
                         max_diff=float((out_live - out_patched).abs().max()),
                         effect=float((out_patched - out_base).abs().max())))
        print_row(rows[-1])
    return rows


def print_row(row: dict) -> None:
    live = f", live {row['live_s']:.2f} s" if "live_s" in row else ""
    print(f"{row['backend']:8s} {row['sliders']:3d} sliders: sampling {row['sample_s']:.2f} s{live}, "
          f"patch/fold {row['patch_s']:.3f} s, max |Δ| {row['max_diff']:.1e} (the sliders' change {row['effect']:.2f})",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="1,10,50")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import logging

    logging.disable(logging.WARNING)
    counts = [int(c) for c in args.counts.split(",")]
    rows, exported = core_rows(counts, args.images, args.steps, args.repeats)
    import comfy_support

    if comfy_support.comfyui_dir() is None:
        print("ComfyUI rows skipped: set COMFYUI_DIR to a ComfyUI checkout")
    else:
        rows += comfy_rows(counts, args.images, args.steps, args.repeats, exported)
    print(f"\n{args.images} images x {args.steps} steps, shapes model, {args.threads} thread(s), best of {args.repeats}")
    print("| backend | sliders | sampling s | vs 1 slider | live (one branch per slider) s | patch / fold s "
          "| max abs diff to live | the sliders' change |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        one = next(r for r in rows if r["backend"] == row["backend"] and r["sliders"] == counts[0])
        row["ratio_to_first"] = row["sample_s"] / one["sample_s"]
        live = f"{row['live_s']:.2f}" if "live_s" in row else "–"
        print(f"| {row['backend']} | {row['sliders']} | {row['sample_s']:.2f} | {row['ratio_to_first']:.2f}x | {live} | "
              f"{row['patch_s']:.3f} | {row['max_diff']:.1e} | {row['effect']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(dict(images=args.images, steps=args.steps, threads=args.threads,
                                             repeats=args.repeats, rows=rows), indent=1))


if __name__ == "__main__":
    main()
