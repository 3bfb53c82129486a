#!/usr/bin/env python
"""Train the shapes model (text encoder + UNet, jointly, from scratch) on CPU and write models/shapes-v1.

    python scripts/train_shapes_model.py --steps 3000            # fixed length: fully deterministic
    python scripts/train_shapes_model.py --minutes 45 --resume   # continue after an interruption
    python scripts/train_shapes_model.py --minutes 15 --init-from models/shapes-v1 ...   # fine-tune

What shipped (models/shapes-v1/sliders_model.json records every phase's settings):
  1. from scratch, 42 min on 1 thread (defaults, --late-max-weight 5 --late-from 0.6): size and colour
     learned, circle vs square left at chance (shape .67);
  2. --init-from phase 1, 15 min on 2 threads, --lr 3e-4 --noisy-fraction 0.7 --noisy-min-t 150
     --noisy-max-t 750 --max-weight 5 --late-max-weight 5: the mid-noise band where circle and square
     part ways (shape .997, size .85: medium triangles grew to large);
  3. --init-from phase 2, 18 min on 2 threads, --lr 2e-4 --seed 1 --noisy-fraction 0.6
     --noisy-min-t 150 --max-weight 5 --late-max-weight 5.

One run from scratch in 30 min on 2 threads (not shipped, measured at 25 steps / CFG 3 on 288 full
prompts: size .972, colour 1.0, shape .872; squares are the weak level at .73):
  --minutes 30 --threads 2 --late-from 0.5 --late-max-weight 5 --late-noisy-band 150 1000

Data comes on the fly from ``sliders_core.shapes.make_dataset`` (one deterministic batch per step,
uniform sizes/colours/shapes, so the size marginal is balanced when the size word is dropped).
Lessons of shared/SHAPES.md applied: more weight on noisy timesteps (half of every batch from
t >= 250, and a loss weight 1/alpha_bar(t) capped at 25, i.e. the v-prediction loss, for the
eps-predicting model: that is where layout and colour are decided), caption word dropout 0.2 and 10 % empty
captions (for CFG), a warm-up + cosine learning-rate schedule, EMA weights are what ships, and the
text reaches every resnet through the time embedding (see ``sliders_core.shapes.model``).

With ``--minutes`` the schedule runs on wall-clock progress (max(step/steps, elapsed/budget)), so
the run always finishes its cosine decay inside the budget whatever the machine's load; with
``--steps`` alone it is step based and bit-for-bit repeatable on one machine.
Checkpoints (model, EMA, optimiser, step, elapsed time) are written atomically every
``--checkpoint-minutes`` to ``--work-dir``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sliders_core.shapes import COLORS, SHAPES, SIZES, attribute_accuracy, make_dataset  # noqa: E402
from sliders_core.shapes.model import (  # noqa: E402
    DEFAULT_GUIDANCE,
    MAX_TOKENS,
    SHAPES_MODEL_DIR,
    build_pipeline,
    parameter_count,
    sample_images,
    save_shapes_pipeline,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=None, help="wall-clock training budget")
    p.add_argument("--steps", type=int, default=None, help="step budget (default: unlimited if --minutes)")
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--min-lr-ratio", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--drop-prob", type=float, default=0.2, help="per attribute word")
    p.add_argument("--empty-prob", type=float, default=0.1, help="empty caption, for CFG")
    p.add_argument("--noisy-fraction", type=float, default=0.5, help="share of each batch with t >= --noisy-min-t")
    p.add_argument("--noisy-min-t", type=int, default=250)
    p.add_argument("--noisy-max-t", type=int, default=1000, help="upper end (exclusive) of that band")
    p.add_argument("--max-weight", type=float, default=25.0,
                   help="cap of the 1/alpha_bar(t) loss weight (1: plain eps-MSE)")
    p.add_argument("--late-max-weight", type=float, default=5.0, help="the cap from --late-from on")
    p.add_argument("--late-from", type=float, default=0.6, help="training progress (0..1) of the cap change")
    p.add_argument("--late-noisy-band", type=int, nargs=2, metavar=("MIN_T", "MAX_T"), default=None,
                   help="from --late-from on, draw the noisy share of each batch from this band instead")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=SHAPES_MODEL_DIR)
    p.add_argument("--work-dir", type=Path, default=Path(__file__).resolve().parents[1] / "out" / "shapes-train")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start from a shapes model folder's weights (fine-tuning) instead of random ones")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--eval-minutes", type=float, default=10.0, help="quick accuracy check (0: never)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--fp16", action="store_true", help="ship fp16 weights (half the size)")
    args = p.parse_args(argv)
    if args.minutes is None and args.steps is None:
        p.error("give --minutes and/or --steps")
    return args


class Captions:
    """Caption -> token ids, cached (a few hundred distinct captions)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        for c in set(captions) - self.cache.keys():
            self.cache[c] = torch.tensor(self.tokenizer(c, padding="max_length", max_length=MAX_TOKENS,
                                                        truncation=True).input_ids)
        return torch.stack([self.cache[c] for c in captions])


def lr_factor(progress: float, step: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


@torch.no_grad()
def quick_eval(pipe, seed: int, steps: int = 25) -> dict[str, float]:
    """Every full prompt (36) once, 25 DDPM steps, CFG at the default: a coarse progress signal."""
    prompts = [f"a {s} {c} {h}" for s in SIZES for c in COLORS for h in SHAPES]
    images = sample_images(pipe, prompts, seeds=[seed + i for i in range(len(prompts))], steps=steps,
                           guidance=DEFAULT_GUIDANCE)
    specs = [dict(zip(("size", "color", "shape"), p.split()[1:])) for p in prompts]
    return attribute_accuracy(images.numpy(), specs)


def save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    pipe = build_pipeline(args.seed)
    unet, text_encoder, scheduler = pipe.unet, pipe.text_encoder, pipe.scheduler
    base_training = None
    if args.init_from is not None:
        base_training = load_weights_into(pipe, args.init_from)
        print(f"initialised from {args.init_from}", flush=True)
    modules = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
    ema = copy.deepcopy(modules).requires_grad_(False)
    optimizer = torch.optim.AdamW(modules.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    tokens = Captions(pipe.tokenizer)
    alphas_cumprod = scheduler.alphas_cumprod.float()
    budget_s = args.minutes * 60 if args.minutes else math.inf
    ckpt_path = args.work_dir / "checkpoint.pt"

    step, elapsed = 0, 0.0
    if args.resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        modules.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed"]
        torch.set_rng_state(state["torch_rng"])
        print(f"resumed from {ckpt_path} at step {step}, {elapsed / 60:.1f} min", flush=True)

    counts = parameter_count(pipe)
    print(f"parameters: unet {counts['unet']:,}, text encoder {counts['text_encoder']:,}; batch {args.batch}, "
          f"lr {args.lr}, budget {args.minutes} min / {args.steps} steps, threads {torch.get_num_threads()}",
          flush=True)

    t_start = time.time() - elapsed
    last_ckpt = last_eval = time.time()
    running = None
    modules.train()
    while True:
        elapsed = time.time() - t_start
        progress = max(step / args.steps if args.steps else 0.0, elapsed / budget_s)
        if progress >= 1.0:
            break
        images, captions, _ = make_dataset(args.batch, seed=args.seed * 1_000_003 + step,
                                           drop_prob=args.drop_prob, empty_prob=args.empty_prob)
        x0 = torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1
        gen = torch.Generator().manual_seed(args.seed * 7919 + step)
        noise = torch.randn(x0.shape, generator=gen)
        noisy = torch.rand(args.batch, generator=gen) < args.noisy_fraction
        late = progress >= args.late_from
        band = args.late_noisy_band if late and args.late_noisy_band else (args.noisy_min_t, args.noisy_max_t)
        t = torch.where(noisy, torch.randint(band[0], band[1], (args.batch,), generator=gen),
                        torch.randint(0, 1000, (args.batch,), generator=gen))
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise

        for group in optimizer.param_groups:
            group["lr"] = args.lr * lr_factor(progress, step, args.warmup, args.min_lr_ratio)
        context = text_encoder(tokens(captions))[0]
        pred = unet(x_t, t, encoder_hidden_states=context).sample
        # eps-MSE weights an image's x0 error by SNR(t), ~0 at high noise: exactly where size, colour and
        # shape are decided and only the text can tell them (lower down they can be read off x_t). The
        # first run (plain eps-MSE) learned size and shape but left colour at chance after 22 min.
        # Weight 1/alpha_bar(t) = the v-prediction loss (x0 weight SNR + 1), capped, normalised per batch.
        per_image = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        # Late in training the cap drops (--late-max-weight): the colour/size/layout conditioning is
        # learned by then, and shape (decided at mid noise, readable from edges) needs the lower and
        # middle timesteps back: with the cap at 25 all the way, shape stayed at chance.
        cap = args.late_max_weight if late else args.max_weight
        weight = (1 / a.view(-1)).clamp(max=cap) if cap > 1 else torch.ones_like(per_image)
        loss = (weight * per_image).sum() / weight.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        optimizer.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), modules.parameters()):
                e.lerp_(p, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()

        if step % args.log_every == 0:
            el = time.time() - t_start
            print(f"step {step:5d}  {el / 60:5.1f} min  loss {running:.4f}  lr {optimizer.param_groups[0]['lr']:.2e}  "
                  f"{step * args.batch / max(el, 1e-9):.0f} img/s  progress {progress:.2f}", flush=True)
        now = time.time()
        if now - last_ckpt > args.checkpoint_minutes * 60:
            save_checkpoint(ckpt_path, {"model": modules.state_dict(), "ema": ema.state_dict(),
                                        "optimizer": optimizer.state_dict(), "step": step,
                                        "elapsed": now - t_start, "torch_rng": torch.get_rng_state(),
                                        "args": vars(args)})
            last_ckpt = now
        if args.eval_minutes and now - last_eval > args.eval_minutes * 60:
            t_eval = time.time()
            acc = _eval_ema(pipe, modules, ema, args.seed)
            print("  quick eval (EMA, 36 prompts, 25 steps): " + ", ".join(f"{k} {v:.2f}" for k, v in acc.items())
                  + f"  [{time.time() - t_eval:.0f} s, not counted]", flush=True)
            t_start += time.time() - t_eval  # evaluation time does not eat the training budget
            last_eval = time.time()

    elapsed = time.time() - t_start
    print(f"trained {step} steps ({step * args.batch:,} images) in {elapsed / 60:.1f} min", flush=True)
    save_checkpoint(ckpt_path, {"model": modules.state_dict(), "ema": ema.state_dict(),
                                "optimizer": optimizer.state_dict(), "step": step, "elapsed": elapsed,
                                "torch_rng": torch.get_rng_state(), "args": vars(args)})
    modules.load_state_dict(ema.state_dict())
    modules.eval()
    acc = quick_eval(pipe, args.seed)
    print("final quick eval (EMA): " + ", ".join(f"{k} {v:.2f}" for k, v in acc.items()), flush=True)
    meta = {"training": {**{k: v for k, v in vars(args).items() if k not in ("out", "work_dir", "resume")},
                         "steps_budget": args.steps, "steps": step, "images": step * args.batch,
                         "minutes": round(elapsed / 60, 1), "threads": torch.get_num_threads()}}
    if args.init_from is not None:
        meta["training"]["init_from"] = str(args.init_from)
        meta["base_training"] = base_training
    folder = save_shapes_pipeline(args.out, pipe, fp16=args.fp16, metadata=meta)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(f"wrote {folder} ({size / 1e6:.2f} MB)", flush=True)


def load_weights_into(pipe, folder: Path):
    """Copy a saved shapes model's UNet and text-encoder weights into ``pipe`` (same architecture).
    Returns that model's recorded training settings (chained into the new metadata)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = Path(folder)
    pipe.unet.load_state_dict(UNet2DConditionModel.from_pretrained(folder, subfolder="unet").state_dict())
    pipe.text_encoder.load_state_dict(CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").state_dict())
    info = json.loads((folder / "sliders_model.json").read_text()) if (folder / "sliders_model.json").is_file() else {}
    return {k: v for k, v in info.items() if k in ("training", "base_training")} or None


def _eval_ema(pipe, modules, ema, seed):
    backup = copy.deepcopy(modules.state_dict())
    modules.load_state_dict(ema.state_dict())
    modules.eval()
    try:
        return quick_eval(pipe, seed)
    finally:
        modules.load_state_dict(backup)
        modules.train()


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
