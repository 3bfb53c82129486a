"""Command line: `python -m sliders_core {demo,train,generate,sweep,info} ...`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from . import distributed
from .config import (
    CONTRASTS,
    LAYER_PRESETS,
    REDUCTIONS,
    TRAINED_SIGNS,
    TRAJECTORY_PROMPTS,
    PairTrainConfig,
    TrainConfig,
    layer_presets_help,
    parse_numbers,
)
from .errors import SliderError, TrainingDivergedError
from .formats import describe, load_slider, read_state_dict, safe_output_path
from .inference import SliderSpec, attach_slider_file, grid_image, sweep
from .inversion import METHODS as INVERSION_METHODS
from .inversion import InversionConfig
from .sliderspace import ROTATIONS, SliderSpaceConfig

log = logging.getLogger(__name__)
EMBEDDED_MODELS = ("shapes", "tiny-sd1", "tiny-sdxl", "tiny-flux", "tiny-sd3")
DEFAULT_MODEL = "shapes"  # the project's own trained model, shipped in models/shapes-v1
# The demo: a size slider on the shapes model, colours held fixed (η on their mean push).
DEMO_PROMPTS = {
    "target": "a circle", "positive": "a large {p} circle", "unconditional": "a small {p} circle",
    "guidance_scale": 1.0, "preservation": ["red", "green", "blue", "yellow"],
}


def load_model(spec: str, config: str | None = None, device: str = "cpu"):
    from .backends.diffusers_backend import DiffusersDenoiser, load_diffusers_model
    from .tiny import tiny_flux_pipeline, tiny_sd1_pipeline, tiny_sd3_pipeline, tiny_sdxl_pipeline

    if spec == "shapes":
        from .shapes.model import SHAPES_MODEL_DIR

        if not (SHAPES_MODEL_DIR / "model_index.json").is_file():
            raise SliderError(f"the shipped shapes model is missing from {SHAPES_MODEL_DIR}; "
                              "restore it from git or retrain it with scripts/train_shapes_model.py")
        return load_diffusers_model(SHAPES_MODEL_DIR, device=device)
    if spec == "tiny-sd1":
        return DiffusersDenoiser(tiny_sd1_pipeline().to(device))
    if spec == "tiny-sdxl":
        return DiffusersDenoiser(tiny_sdxl_pipeline().to(device))
    if spec in ("tiny-flux", "tiny-sd3"):
        from .backends.flow_backend import FlowDenoiser

        return FlowDenoiser((tiny_flux_pipeline if spec == "tiny-flux" else tiny_sd3_pipeline)().to(device))
    return load_diffusers_model(spec, config=config, device=device)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"diffusers folder, single-file checkpoint, or one of {EMBEDDED_MODELS} (default {DEFAULT_MODEL})")
    p.add_argument("--config", help="local diffusers folder with the configs for a single-file checkpoint")
    p.add_argument("--device", default="cpu")


def _render_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True)
    p.add_argument("--seeds", default="0", help="comma-separated seeds (one grid row each)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's, else 30)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance (default: the model's, else 7.5)")
    p.add_argument("--resolution", type=int)
    p.add_argument("--start", type=float, default=0.0,
                   help="delayed LoRA: fraction of the steps run on the base model before the sliders switch on")


def _training_args(p: argparse.ArgumentParser, defaults, one_slider: bool = True) -> None:
    """The options the trainers share (defaults from their config dataclass); `one_slider`: --resume
    takes a file and --sweep renders it."""
    p.add_argument("--rank", type=int, default=defaults.rank)
    p.add_argument("--alpha", type=float, default=defaults.alpha, help="LoRA alpha (scale = alpha/rank)")
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--iterations", type=int, default=defaults.iterations)
    p.add_argument("--layers", choices=list(LAYER_PRESETS), default=defaults.layers, metavar="PRESET",
                   help=f"which layers carry the slider (default {defaults.layers}): {layer_presets_help()}")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--gradient-checkpointing", action="store_true", help="less memory, slower")
    if one_slider:
        p.add_argument("--resume", help="a slider file saved by an earlier run to continue from")
        p.add_argument("--sweep", help="after training, render an α sweep for this prompt")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sliders_core", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the main job: train a size slider on the embedded shapes model, render a sweep")
    demo.add_argument("--out-dir", default="out/demo")
    demo.add_argument("--iterations", type=int, default=300)

    train = sub.add_parser("train", help="train a text slider from a prompt-set YAML file")
    _model_args(train)
    train.add_argument("--prompts", required=True, help="prompt-set YAML (reference fields + preservation)")
    train.add_argument("--out-dir", default="out/sliders")
    train.add_argument("--name", required=True, help="slider file name (no path separators)")
    defaults = TrainConfig()
    _training_args(train, defaults)
    train.add_argument("--eta", type=float, help="η; default: the prompt set's guidance_scale")
    train.add_argument("--negative-eta", type=float,
                       help="η of the −1 steps (with --signs both / separate); default: --eta")
    train.add_argument("--resolution", type=int)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--trajectory-steps", type=int, default=defaults.trajectory_steps)
    train.add_argument("--trajectory-reuse", type=int, default=defaults.trajectory_reuse)
    train.add_argument("--signs", choices=TRAINED_SIGNS, default=defaults.signs,
                       help="'both': train α = −1 as well as +1; 'separate': the same on a two-ended slider, one "
                            "LoRA per end in one file, each end half the iterations (README → Disentanglement)")
    train.add_argument("--contrast", choices=CONTRASTS, default=defaults.contrast,
                       help="'ends': each sign pushes toward its own end against the neutral prompt (with --signs plus, "
                            "the positive end alone)")
    train.add_argument("--project-preservation", action="store_true", default=defaults.project_preservation,
                       help="remove from the push its component along every preservation attribute's own "
                            "direction (README → Disentanglement)")
    train.add_argument("--trajectory-prompts", choices=TRAJECTORY_PROMPTS, default=defaults.trajectory_prompts,
                       help="'preservation': draw x_t under c_t ⊕ p for every preservation attribute p")
    train.add_argument("--trajectory-slider", action="store_true", default=defaults.trajectory_slider,
                       help="draw x_t with the slider on (the reference's loop)")
    train.add_argument("--anchor", action="append", default=list(defaults.anchors), dest="anchors",
                       help="a prompt whose prediction the slider must not change (repeatable)")
    train.add_argument("--anchor-weight", type=float, default=defaults.anchor_weight)
    train.add_argument("--preservation-reduce", choices=REDUCTIONS, default=defaults.preservation_reduce,
                       help="'sum': η acts once per preservation attribute (eq. 8 as printed; older files)")
    train.add_argument("--level-range", type=float, nargs=2, default=list(defaults.level_range),
                       metavar=("LOW", "HIGH"), help="part of the trajectory x_t is drawn from (0 = pure noise)")

    tp = sub.add_parser("train-pairs", help="train a visual slider from image pairs (A = less, B = more)")
    _model_args(tp)
    tp.add_argument("--pairs", required=True, help="folder: A/ and B/ with matching file names (or one level per "
                    "strength, or the official signed-scale folders; see README)")
    tp.add_argument("--prompt", default="", help="text condition for every pair (default: the empty prompt); "
                    "pairs with captions (<name>.txt beside A) train on their captions instead")
    tp.add_argument("--out-dir", default="out/sliders")
    tp.add_argument("--name", required=True, help="slider file name (no path separators)")
    pair_defaults = PairTrainConfig()
    _training_args(tp, pair_defaults)
    tp.add_argument("--resolution", type=int, help="training size; default: the model's native size")
    tp.add_argument("--batch-size", type=int, default=pair_defaults.batch_size, help="pairs per step")

    ds = sub.add_parser("discover", help="SliderSpace: find a model's sliders for one concept prompt, no labels")
    _model_args(ds)
    ds.add_argument("--concept", required=True, help="the concept prompt to explore, e.g. 'a shape'")
    ds.add_argument("--variation", action="append", default=[], help="a prompt variation (repeatable); "
                    "default: the concept itself")
    ds.add_argument("--images", type=int, default=48, help="images of the concept to embed")
    ds.add_argument("--k", type=int, default=4, help="directions (sliders) to find")
    ds.add_argument("--embedder", default="shapes", help="image embedder: 'shapes' (the shapes world's encoder, "
                    "shipped) or a local transformers CLIP folder (e.g. clip-vit-large-patch14, as the reference)")
    ds.add_argument("--rotation", default="independent", choices=ROTATIONS,
                    help="directions: 'independent' (the principal subspace rotated to independent axes: one "
                    "attribute each) or 'pca' (the principal axes, as the paper)")
    ds.add_argument("--out-dir", default="out/sliderspace")
    space_defaults = SliderSpaceConfig()
    _training_args(ds, space_defaults, one_slider=False)
    ds.add_argument("--batch-size", type=int, default=space_defaults.batch_size)
    ds.add_argument("--resume", action="store_true", help="continue the sliders already in --out-dir (same "
                    "concept and settings); finished ones are kept")

    mp = sub.add_parser("make-pairs", help="write exact shapes-world image pairs (only the concept differs)")
    mp.add_argument("--concept", required=True, choices=["size", "position"])
    mp.add_argument("--count", type=int, default=6)
    mp.add_argument("--seed", type=int, default=0)
    mp.add_argument("--resolution", type=int, default=32)
    mp.add_argument("--balanced", action="store_true",
                    help="colours and shape types in turn instead of drawn: leaks less, moves less (README)")
    mp.add_argument("--captions", action="store_true",
                    help="also write A/<name>.txt: each pair's caption, all it shows but the concept (README)")
    mp.add_argument("--out", required=True, help="folder to create (A/ and B/ inside)")

    gen = sub.add_parser("generate", help="render with one or several sliders at given strengths")
    _model_args(gen)
    _render_args(gen)
    gen.add_argument("--slider", action="append", default=[], help="FILE[:ALPHA], repeatable; sliders compose")
    gen.add_argument("--out", required=True, help="PNG path")

    sw = sub.add_parser("sweep", help="α-sweep grid of one slider: same seed, one column per α")
    _model_args(sw)
    _render_args(sw)
    sw.add_argument("--slider", required=True, help="slider file")
    sw.add_argument("--alphas", default="-2,-1,0,1,2")
    sw.add_argument("--with", dest="others", action="append", default=[],
                    help="other FILE[:ALPHA] applied in every column")
    sw.add_argument("--out", required=True, help="PNG path")

    inv = sub.add_parser("invert", help="null-text inversion of a photo, for editing it with sliders")
    _model_args(inv)
    inv.add_argument("--image", required=True, help="the photo (PNG/JPEG); resized and centre-cropped to --resolution")
    inv.add_argument("--prompt", default="", help="a caption of the photo (the source prompt)")
    inv.add_argument("--out", required=True, help="inversion file to write (.safetensors)")
    inv.add_argument("--resolution", type=int, help="default: the model's native size")
    inv_defaults = InversionConfig()
    inv.add_argument("--steps", type=int, default=inv_defaults.steps)
    inv.add_argument("--guidance", type=float, help="guidance of the edits (default: the model's, else 7.5)")
    inv.add_argument("--method", choices=INVERSION_METHODS, default=inv_defaults.method,
                     help="null-text (faithful, slower), negative-prompt (fast), ddim (the empty prompt: baseline)")
    inv.add_argument("--inner-iterations", type=int, default=inv_defaults.inner_iterations)
    inv.add_argument("--lr", type=float, default=inv_defaults.lr)

    ed = sub.add_parser("edit", help="sample an inversion back with sliders (α = 0 everywhere: the reconstruction)")
    _model_args(ed)
    ed.add_argument("--inversion", required=True)
    ed.add_argument("--slider", action="append", default=[], help="FILE[:ALPHA], repeatable; sliders compose")
    ed.add_argument("--alphas", help="comma-separated α for the first --slider: one column each (a sweep)")
    ed.add_argument("--start", type=float, default=0.5,
                    help="fraction of the steps sampled without sliders (reference for real images: 0.5)")
    ed.add_argument("--out", required=True, help="PNG path")

    many = sub.add_parser("train-many", help="train every slider of a job file, across processes (torchrun)")
    many.add_argument("jobs", help="job file (YAML): model, output, defaults, sliders (see README)")
    many.add_argument("--processes", type=int, default=1,
                      help="worker processes on this machine (one per GPU); under torchrun the launcher decides")
    many.add_argument("--max-restarts", type=int, default=3, help="times the launcher restarts the workers")
    many.add_argument("--threads", type=int, help="CPU threads per process (default: the cores shared out)")

    info = sub.add_parser("info", help="show a slider file's keys and metadata")
    info.add_argument("file")
    info.add_argument("--model", help="also check it loads on this model")
    return parser


def _ints(text: str, what: str = "seeds") -> list[int]:
    return [int(v) for v in parse_numbers(text, what)]


def _sampling(denoiser, steps: int | None = None, guidance: float | None = None) -> dict:
    defaults = {"steps": 30, "guidance": 7.5, **getattr(denoiser, "sample_defaults", {})}
    return {"steps": steps or defaults["steps"], "guidance": guidance or defaults["guidance"]}


def _write_atomically(path: str | Path, write) -> Path:
    """`write(tmp)` into a hidden file beside `path`, then rename: no half-written file under the name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    tmp.replace(path)
    return path


def _write_png(image, path: str | Path) -> Path:
    return _write_atomically(path, lambda tmp: image.save(tmp, format="PNG"))


def _write_text(text: str, path: Path) -> Path:
    return _write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def cmd_train(args, model=None) -> dict:
    from .prompts import load_prompt_set
    from .text_slider import train_text_slider

    pairs = load_prompt_set(args.prompts) if isinstance(args.prompts, (str, Path)) else args.prompts
    out = safe_output_path(args.out_dir, args.name)
    distributed.init_process_group()  # under torchrun: one slider, data-parallel over the batch
    config = TrainConfig(
        rank=args.rank, alpha=args.alpha, lr=args.lr, iterations=args.iterations, eta=args.eta,
        negative_eta=args.negative_eta,
        resolution=args.resolution, batch_size=args.batch_size, layers=args.layers, seed=args.seed,
        trajectory_steps=args.trajectory_steps, trajectory_reuse=args.trajectory_reuse,
        save_every=args.save_every, gradient_checkpointing=args.gradient_checkpointing, signs=args.signs,
        trajectory_prompts=args.trajectory_prompts, trajectory_slider=args.trajectory_slider,
        anchors=tuple(args.anchors), anchor_weight=args.anchor_weight, level_range=tuple(args.level_range),
        preservation_reduce=args.preservation_reduce, contrast=args.contrast,
        project_preservation=args.project_preservation)
    config.validate()
    denoiser = model or load_model(args.model, args.config, args.device)
    resume = load_slider(args.resume, denoiser.naming, denoiser.family) if args.resume else None
    result = train_text_slider(denoiser, pairs, config, name="trained", resume=resume, checkpoint_path=out)
    summary = {
        "slider": str(out), "family": denoiser.family, "iterations": config.iterations,
        "seconds": round(result.seconds, 2), "loss_first": result.losses[0], "loss_last": result.losses[-1],
        "unet_forwards_per_iteration": round(result.unet_samples_per_iteration, 2),
        "effect": round(result.effect, 3), "warning": result.warning,
    }
    if args.sweep:
        summary["sweep"] = _sweep_trained(denoiser, args.sweep, out, config.resolution)
    return summary


def cmd_train_many(args) -> dict:
    from .many import launch, load_jobs, train_many

    if "TORCHELASTIC_RUN_ID" in os.environ or args.processes <= 1:  # a worker (torchrun) or one process
        return train_many(args.jobs, threads=args.threads)
    spec = load_jobs(args.jobs)  # a bad job file fails here, before any process starts
    launch(args.jobs, args.processes, args.max_restarts, args.threads)
    return {"output": str(spec.output), "processes": args.processes,
            "sliders": sorted(p.stem for p in spec.output.glob("*.safetensors"))}


def cmd_train_pairs(args, model=None) -> dict:
    from .image_pairs import load_pair_folder
    from .pair_slider import train_pair_slider

    out = safe_output_path(args.out_dir, args.name)
    config = PairTrainConfig(rank=args.rank, alpha=args.alpha, lr=args.lr, iterations=args.iterations,
                             layers=args.layers, seed=args.seed, batch_size=args.batch_size,
                             save_every=args.save_every, gradient_checkpointing=args.gradient_checkpointing)
    config.validate()
    denoiser = model or load_model(args.model, args.config, args.device)
    resolution = args.resolution or denoiser.default_resolution
    pairs = load_pair_folder(args.pairs, resolution)
    if pairs.prompts and args.prompt:
        log.warning("the pairs have captions; --prompt %r is not used", args.prompt)
    resume = load_slider(args.resume, denoiser.naming, denoiser.family) if args.resume else None
    result = train_pair_slider(denoiser, pairs, config, prompt=args.prompt, name="trained", resume=resume,
                               checkpoint_path=out)
    summary = {"slider": str(out), "family": denoiser.family, "kind": "pairs", "pairs": len(pairs),
               "captions": pairs.prompts is not None,
               "strengths": sorted(set(pairs.strengths)), "iterations": config.iterations,
               "seconds": round(result.seconds, 2), "loss_first": result.losses[0], "loss_last": result.losses[-1]}
    if args.sweep is not None:
        summary["sweep"] = _sweep_trained(denoiser, args.sweep, out, resolution)
    return summary


def _sweep_trained(denoiser, prompt: str, out: Path, resolution: int | None) -> str:
    """The α = −2 … 2 grid of the slider just trained (adapter "trained"), next to its file."""
    alphas = [-2, -1, 0, 1, 2]
    columns = sweep(denoiser, prompt, "trained", alphas, seeds=[0, 1, 2, 3], resolution=resolution, progress=True,
                    **_sampling(denoiser))
    grid = out.with_name(out.stem + "_sweep.png")
    _write_png(grid_image(columns, [f"alpha={a:g}" for a in alphas]), grid)
    return str(grid)


def cmd_discover(args, model=None) -> dict:
    from .inference import slider_rows
    from .sliderspace import concept_slug, discover_sliders

    config = SliderSpaceConfig(rank=args.rank, alpha=args.alpha, lr=args.lr, iterations=args.iterations,
                               layers=args.layers, seed=args.seed, batch_size=args.batch_size,
                               save_every=args.save_every, gradient_checkpointing=args.gradient_checkpointing)
    config.validate()
    name = concept_slug(args.concept)
    paths = [safe_output_path(args.out_dir, f"{name}_{j}") for j in range(args.k)]  # refuses a folder that escapes
    denoiser = model or load_model(args.model, args.config, args.device)
    embedder = load_embedder(args.embedder, denoiser)
    prior = [load_slider(p, denoiser.naming, denoiser.family) if args.resume and p.is_file() else None for p in paths]
    sampling = _sampling(denoiser)
    found = discover_sliders(denoiser, embedder, args.concept, config, count=args.images, k=args.k,
                             variations=args.variation, rotation=args.rotation, name=name, resume=prior,
                             checkpoint_dir=args.out_dir, **sampling)
    alphas = [-2, -1, 0, 1, 2]  # the preview: one row per slider, one column per α, the same seed
    columns = slider_rows(denoiser, args.concept, found.names, alphas, seed=args.seed, **sampling)
    grid = _write_png(grid_image(columns, [f"alpha={a:g}" for a in alphas]), Path(args.out_dir) / f"{name}_sliders.png")
    return {"concept": args.concept, "images": len(found.images.latents), "k": args.k, "rotation": args.rotation,
            "explained_variance": [round(float(v), 4) for v in found.explained],
            "sliders": [str(p) for p in paths],
            "final_loss": [round(r.final_loss, 4) for r in found.results],
            "train_seconds": round(sum(r.seconds for r in found.results), 1), "preview": str(grid)}


def load_embedder(name: str, denoiser):
    """'shapes' → the shipped shapes encoder (only for the shapes model); otherwise a local CLIP folder."""
    from .shapes.encoder import load_shapes_encoder

    if name == "shapes":
        if denoiser.family != "shapes":
            raise SliderError(f"the shapes encoder sees only the shapes world; for a {denoiser.family} model give "
                              "--embedder <local CLIP folder>")
        return load_shapes_encoder()
    from .backends.clip_vision import TransformersClipEmbedder

    return TransformersClipEmbedder(name, device=getattr(denoiser, "device", "cpu"))


def cmd_make_pairs(args) -> dict:
    from PIL import Image

    from .shapes.data import pair_captions, render_concept_pairs

    if args.count < 1:
        raise SliderError("--count must be ≥ 1")
    a, b = render_concept_pairs(args.concept, args.count, args.seed, args.resolution, args.balanced)
    root = Path(args.out)
    for side, images in (("A", a), ("B", b)):
        for i, image in enumerate(images):
            _write_png(Image.fromarray((image * 255).round().astype("uint8")), root / side / f"{i:03d}.png")
    if args.captions:
        for i, caption in enumerate(pair_captions(args.concept, args.count, args.seed, args.balanced)):
            _write_text(caption + "\n", root / "A" / f"{i:03d}.txt")
    return {"pairs": str(root), "concept": args.concept, "count": args.count, "balanced": args.balanced,
            "captions": args.captions}


def cmd_demo(args) -> dict:
    from .prompts import pair_from_dict

    print(f"Main job on the embedded '{DEFAULT_MODEL}' model (trained here, shipped in the repo, no downloads): "
          "a size slider for 'a circle', colours held fixed, then an α sweep (columns α = -2..2, rows = seeds).",
          file=sys.stderr)
    # `train`'s own defaults, with the demo's recipe on top: η 1 (DEMO_PROMPTS) and both signs leak least
    # (README → Disentanglement)
    ns = build_parser().parse_args(["train", "--prompts", "-", "--name", "size"])
    ns.__dict__.update(prompts=[pair_from_dict(DEMO_PROMPTS)], out_dir=args.out_dir, model=DEFAULT_MODEL, lr=1e-3,
                       iterations=args.iterations, layers="noxattn", sweep=DEMO_PROMPTS["target"], signs="both")
    return cmd_train(ns)


def cmd_generate(args) -> dict:
    denoiser = load_model(args.model, args.config, args.device)
    scales = {}
    for text in args.slider:
        spec = SliderSpec.parse(text)
        scales[attach_slider_file(denoiser, spec.path)] = spec.alpha
    from .inference import generate

    images = generate(denoiser, args.prompt, scales=scales, seeds=_ints(args.seeds), resolution=args.resolution,
                      start=args.start, progress=True, **_sampling(denoiser, args.steps, args.guidance))
    path = _write_png(grid_image([images], [", ".join(f"{k}={v:g}" for k, v in scales.items()) or "base"]), args.out)
    return {"image": str(path), "sliders": scales}


def cmd_sweep(args) -> dict:
    denoiser = load_model(args.model, args.config, args.device)
    main = attach_slider_file(denoiser, args.slider)
    others = {}
    for text in args.others:
        spec = SliderSpec.parse(text)
        others[attach_slider_file(denoiser, spec.path)] = spec.alpha
    alphas = parse_numbers(args.alphas, "--alphas")
    columns = sweep(denoiser, args.prompt, main, alphas, seeds=_ints(args.seeds), others=others,
                    resolution=args.resolution, start=args.start, progress=True,
                    **_sampling(denoiser, args.steps, args.guidance))
    path = _write_png(grid_image(columns, [f"alpha={a:g}" for a in alphas]), args.out)
    return {"grid": str(path), "alphas": alphas}


def cmd_invert(args) -> dict:
    from .image_pairs import read_image, square_image
    from .inversion import invert, psnr, sample_inversion, save_inversion

    if Path(args.out).suffix != ".safetensors":
        raise SliderError(f"--out must end in .safetensors, got {args.out}")
    denoiser = load_model(args.model, args.config, args.device)
    config = InversionConfig(steps=args.steps, guidance=args.guidance or _sampling(denoiser)["guidance"],
                             method=args.method, inner_iterations=args.inner_iterations, lr=args.lr)
    image = square_image(read_image(Path(args.image)), args.resolution or denoiser.default_resolution)[None]
    inversion = invert(denoiser, image, args.prompt, config, progress=True)
    reconstruction = denoiser.decode(sample_inversion(denoiser, inversion))
    path = save_inversion(inversion, args.out)
    preview = _write_png(grid_image([image, reconstruction], ["photo", "reconstruction"]),
                         path.with_name(path.stem + "_reconstruction.png"))
    return {"inversion": str(path), "method": config.method, "steps": config.steps, "guidance": config.guidance,
            "psnr_db": round(psnr(reconstruction, image), 2), "reconstruction": str(preview), **inversion.report}


def cmd_edit(args) -> dict:
    from .inversion import edit, load_inversion

    inversion = load_inversion(args.inversion)
    denoiser = load_model(args.model, args.config, args.device)
    inversion.check_fits(denoiser)
    scales = {}
    for text in args.slider:
        spec = SliderSpec.parse(text)
        scales[attach_slider_file(denoiser, spec.path)] = spec.alpha
    if args.alphas is not None:
        if not scales:
            raise SliderError("--alphas sweeps the first --slider: give one")
        first = next(iter(scales))
        alphas = parse_numbers(args.alphas, "--alphas")
        columns = [edit(denoiser, inversion, {**scales, first: a}, args.start) for a in alphas]
        labels = [f"alpha={a:g}" for a in alphas]
    else:
        columns = [edit(denoiser, inversion, scales, args.start)]
        labels = [", ".join(f"{k}={v:g}" for k, v in scales.items()) or "reconstruction"]
    path = _write_png(grid_image(columns, labels), args.out)
    return {"image": str(path), "sliders": scales, "start": args.start, "steps": inversion.steps}


def cmd_info(args) -> dict:
    tensors, metadata = read_state_dict(args.file)
    summary = {"kind": metadata.get("sliders.kind", "unknown (not made by this project)"), "keys": len(tensors),
               "example_keys": sorted(tensors)[:4], "metadata": metadata}
    if args.model:
        denoiser = load_model(args.model)
        summary["loads_on_model"] = describe(load_slider(args.file, denoiser.naming, denoiser.family))
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    command = {"demo": cmd_demo, "train": cmd_train, "train-pairs": cmd_train_pairs, "make-pairs": cmd_make_pairs,
               "discover": cmd_discover, "generate": cmd_generate, "sweep": cmd_sweep, "invert": cmd_invert, "edit": cmd_edit,
               "train-many": cmd_train_many, "info": cmd_info}
    started = time.perf_counter()
    try:
        summary = command[args.command](args)
    except (SliderError, TrainingDivergedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    if distributed.is_main():
        print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0
