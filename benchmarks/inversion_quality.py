"""Real-image editing on the shapes world: inversion fidelity, cost, and slider edits of inverted photos.

"Photos" are shapes rendered exactly by sliders_core.shapes.data (never model samples), captioned with
their own attributes. For each inversion method (ddim = empty-prompt unconditional, negative-prompt,
null-text) it reports reconstruction PSNR over the photos, wall time and model calls per photo; then it
trains the size slider (the `size` row of slider_quality.py) and edits null-text inversions of circles
at α = −2 … 2 from several switch-on points, measuring area, colour, shape and centroid of every edit
against the photo it came from.

    python benchmarks/inversion_quality.py [--photos 24] [--steps 25] [--out benchmarks/results]
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
from sliders_core.config import TrainConfig  # noqa: E402
from sliders_core.inversion import InversionConfig, edit, invert, sample_inversion  # noqa: E402
from sliders_core.prompts import PromptPair  # noqa: E402
from sliders_core.shapes.data import COLORS, SHAPES, SIZES, ShapeSpec, caption, render_batch  # noqa: E402
from sliders_core.shapes.metrics import measure_batch  # noqa: E402
from sliders_core.shapes.model import SHAPES_MODEL_DIR  # noqa: E402
from sliders_core.text_slider import train_text_slider  # noqa: E402

METHODS = ("ddim", "negative-prompt", "null-text")
ALPHAS = (-2.0, -1.0, 0.0, 1.0, 2.0)
STARTS = (0.0, 0.2, 0.5)
SIZE_SLIDER = PromptPair(target="a circle", positive="a large {p} circle", negative="a small {p} circle",
                         eta=2.0 / len(COLORS), preservation=COLORS)


def photos(n: int, seed: int, shapes=SHAPES, sizes=SIZES) -> tuple[list[ShapeSpec], torch.Tensor]:
    rng = np.random.default_rng(seed)
    specs = [ShapeSpec(str(rng.choice(sizes)), str(rng.choice(COLORS)), str(rng.choice(shapes)),
                       float(rng.uniform(0.42, 0.58)), float(rng.uniform(0.42, 0.58))) for _ in range(n)]
    return specs, torch.from_numpy(render_batch(specs, 32)).float()


def psnr_each(images: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    mse = (images.float() - reference.float()).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return (10 * torch.log10(1.0 / mse)).numpy()


def invert_each(denoiser, specs, images, config: InversionConfig):
    """One inversion per photo (each under its own caption); returns them and the cost per photo."""
    inversions, seconds, forwards, backward = [], 0.0, 0, 0
    for spec, image in zip(specs, images):
        inversion = invert(denoiser, image[None], caption(spec), config)
        inversions.append(inversion)
        seconds += inversion.report["seconds"]
        forwards += inversion.report["forwards"]
        backward += inversion.report.get("backward_passes", 0)
    n = len(specs)
    return inversions, {"seconds_per_photo": seconds / n, "forwards_per_photo": forwards / n,
                        "backward_per_photo": backward / n}


def fidelity(denoiser, specs, images, steps: int, guidance: float) -> dict:
    rows = {}
    for method in METHODS:
        config = InversionConfig(steps=steps, guidance=guidance, method=method)
        inversions, cost = invert_each(denoiser, specs, images, config)
        reconstructions = torch.cat([denoiser.decode(sample_inversion(denoiser, inv)) for inv in inversions])
        scores = psnr_each(reconstructions, images)
        rows[method] = {"psnr_mean": float(scores.mean()), "psnr_std": float(scores.std(ddof=1)),
                        "psnr_min": float(scores.min()), "above_30db": float((scores >= 30).mean()), **cost}
        print(f"g={guidance:g} {method:16s} PSNR {scores.mean():.1f} ± {scores.std(ddof=1):.1f} dB "
              f"(min {scores.min():.1f}), {cost['seconds_per_photo']:.2f} s/photo, "
              f"{cost['forwards_per_photo']:.0f} forwards, {cost['backward_per_photo']:.0f} backward", flush=True)
    return rows


def measure(images: torch.Tensor) -> dict[str, np.ndarray]:
    ms = measure_batch(images.numpy())
    return {"area": np.array([m.area_fraction for m in ms]), "color": np.array([m.color for m in ms]),
            "shape": np.array([m.shape for m in ms]),
            "centroid": np.array([[m.cx, m.cy] for m in ms]) * images.shape[1]}


def edits(denoiser, specs, images, steps: int, guidance: float, iterations: int, lr: float) -> dict:
    started = time.perf_counter()
    train_text_slider(denoiser, [SIZE_SLIDER], TrainConfig(iterations=iterations, lr=lr, seed=0), name="size",
                      progress=False)
    train_seconds = time.perf_counter() - started
    inversions, _ = invert_each(denoiser, specs, images, InversionConfig(steps=steps, guidance=guidance))
    photo = measure(images)
    rows = {}
    for start in STARTS:
        rows[start] = {}
        for alpha in ALPHAS:
            out = torch.cat([edit(denoiser, inv, {"size": alpha}, start) for inv in inversions])
            m = measure(out)
            rows[start][alpha] = {
                "area": float(np.nanmean(m["area"])),
                "colour_kept": float(np.mean(m["color"] == photo["color"])),
                "shape_kept": float(np.mean(m["shape"] == photo["shape"])),
                "centroid_shift_px": float(np.nanmean(np.linalg.norm(m["centroid"] - photo["centroid"], axis=1))),
                "pixel_l1_to_photo": float((out - images).abs().mean()),
            }
            r = rows[start][alpha]
            print(f"start {start:.1f} α {alpha:+.0f}: area {r['area']:.3f}, colour {r['colour_kept']:.0%}, "
                  f"shape {r['shape_kept']:.0%}, centroid shift {r['centroid_shift_px']:.2f} px", flush=True)
    return {"photo_area": float(photo["area"].mean()), "train_seconds": train_seconds, "rows": rows}


def write_report(path: Path, args, fid: dict, ed: dict) -> None:
    lines = [f"# Inversion quality on shapes-v1 ({args.photos} photos, {args.steps} steps)", "",
             "Reconstruction PSNR (mean ± sd, min; share ≥ 30 dB) and cost per photo:", "",
             "| guidance | method | PSNR dB | min | ≥ 30 dB | s/photo | forwards | backward |",
             "|---|---|---|---|---|---|---|---|"]
    for guidance, rows in fid.items():
        for method, r in rows.items():
            lines.append(f"| {guidance} | {method} | {r['psnr_mean']:.1f} ± {r['psnr_std']:.1f} | {r['psnr_min']:.1f} "
                         f"| {r['above_30db']:.0%} | {r['seconds_per_photo']:.2f} | {r['forwards_per_photo']:.0f} "
                         f"| {r['backward_per_photo']:.0f} |")
    lines += ["", f"Size-slider edits of null-text inversions of {args.edit_photos} circles (photo area "
              f"{ed['photo_area']:.3f}), guidance {args.guidance}:", "",
              "| start | α | area | colour kept | shape kept | centroid shift px | L1 to photo |", "|---|---|---|---|---|---|---|"]
    for start, rows in ed["rows"].items():
        for alpha, r in rows.items():
            lines.append(f"| {start} | {alpha:+g} | {r['area']:.3f} | {r['colour_kept']:.0%} | {r['shape_kept']:.0%} "
                         f"| {r['centroid_shift_px']:.2f} | {r['pixel_l1_to_photo']:.3f} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=24)
    parser.add_argument("--edit-photos", type=int, default=16)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5, help="guidance of the edits")
    parser.add_argument("--iterations", type=int, default=300, help="size slider training (slider_quality's)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    denoiser = load_diffusers_model(SHAPES_MODEL_DIR)
    specs, images = photos(args.photos, seed=1)
    fid = {str(g): fidelity(denoiser, specs, images, args.steps, g) for g in (3.0, 7.5)}
    circle_specs, circles = photos(args.edit_photos, seed=2, shapes=("circle",), sizes=("medium",))
    ed = edits(denoiser, circle_specs, circles, args.steps, args.guidance, args.iterations, args.lr)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "inversion_quality.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "fidelity": fid, "edits": ed}, indent=1) + "\n")
    write_report(args.out / "inversion_quality.md", args, fid, ed)
    print(f"wrote {args.out / 'inversion_quality.md'}")


if __name__ == "__main__":
    main()
