"""Our text-slider loop against the real official one, side by side in one process.

    pip install pydantic   # the official trainer's config classes need it
    python benchmarks/official_loop.py --official /path/to/sliders-checkout [--model shapes] [--resolution 32]

The official trainer is imported from the checkout (`trainscripts/textsliders/train_lora.py`, its own
`train()`, `LoRANetwork`, DDIM partial denoising, three frozen calls, gc every step); nothing of it
is copied here. Only what cannot run here is patched: model loading (`model_util.load_models`
returns this model's tokenizer, text encoder, a fresh copy of its UNet and a DDIM scheduler with
its own noise schedule; `train_util`'s latent channels and VAE factor follow the model), xformers
(absent on CPU: a no-op), device "cpu" and float32 (its config's precision fields).

Both loops train the same slider (the same prompts, η, rank 4, alpha 1, lr, the official `noxattn`
preset, batch 1) and are timed in alternating rounds. A round's time per iteration is measured
between the first and the last optimiser step (a global optimiser-step hook), so start-up is left
out. Our rounds span whole trajectory refreshes (n·reuse + 1 steps). A forward hook on the UNet
counts single-image UNet forwards per iteration. Then, on the shapes model, both train for the same
wall time and the eval prompt's mean shape area is measured at α −1, 0, +1 with our sampler (the
official `.pt` file goes through `sliders_core.formats` like any user's file).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from official_harness import import_official, set_network_type  # noqa: E402

from sliders_core.cli import load_model  # noqa: E402
from sliders_core.config import TrainConfig  # noqa: E402
from sliders_core.formats import load_slider  # noqa: E402
from sliders_core.inference import generate  # noqa: E402
from sliders_core.prompts import PromptPair  # noqa: E402
from sliders_core.text_slider import train_text_slider  # noqa: E402

PROMPTS = dict(target="a circle", positive="a large circle", negative="a small circle")
EVAL_PROMPT = "a circle"


class StepClock:
    """Times every optimiser step and counts UNet samples in between (the same probe for both loops).

    Both wall time and this process's CPU time: on one thread CPU time leaves out the time the process
    was descheduled, so the two together tell descheduling (CPU < wall) from a machine that is itself
    slower for a while (CPU ≈ wall)."""

    def __init__(self):
        self.steps: list[tuple[float, float, int]] = []
        self.samples = 0
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(self._on_step)

    def _on_step(self, *_):
        self.steps.append((time.perf_counter(), time.process_time(), self.samples))

    def count(self, unet: torch.nn.Module):
        def hook(_module, args, kwargs):
            sample = args[0] if args else kwargs["sample"]
            self.samples += sample.shape[0]
        return unet.register_forward_pre_hook(hook, with_kwargs=True)

    def measure(self, run) -> tuple[float, float, float]:
        """(wall seconds, CPU seconds, UNet samples) per iteration of `run()`, between its first and last step."""
        self.steps.clear()
        run()
        (w0, c0, s0), (w1, c1, s1) = self.steps[0], self.steps[-1]
        n = len(self.steps) - 1
        return (w1 - w0) / n, (c1 - c0) / n, (s1 - s0) / n


class OfficialTrainer:
    def __init__(self, checkout: str, denoiser, resolution: int, eta: float, lr: float, clock: StepClock):
        from diffusers import DDIMScheduler

        self.mods = import_official(checkout, trainer=True)
        self.denoiser, self.clock = denoiser, clock
        pipe = denoiser.pipe
        train_util = self.mods["train_util"]
        train_util.UNET_IN_CHANNELS = denoiser.unet.config.in_channels
        train_util.VAE_SCALE_FACTOR = denoiser.latent_factor
        # before any hook is registered on it, and in the memory layout a plain diffusers load gives
        template = copy.deepcopy(denoiser.unet).to(memory_format=torch.contiguous_format)

        def load_models(*_args, **_kwargs):
            unet = copy.deepcopy(template)  # a fresh UNet per run: LoRANetwork patches its modules
            unet.enable_xformers_memory_efficient_attention = lambda *a, **k: None  # no xformers on CPU
            clock.count(unet)
            return pipe.tokenizer, pipe.text_encoder, unet, DDIMScheduler.from_config(pipe.scheduler.config)

        self.mods["model_util"].load_models = load_models
        self.prompt = self.mods["prompt_util"].PromptSettings(
            target=PROMPTS["target"], positive=PROMPTS["positive"], unconditional=PROMPTS["negative"],
            neutral=PROMPTS["target"], action="enhance", guidance_scale=eta, resolution=resolution, batch_size=1)
        self.lr = lr
        self.out = Path(tempfile.mkdtemp(prefix="official-sliders-"))

    def config(self, iterations: int):
        return self.mods["config_util"].RootConfig(
            prompts_file="(given directly)", pretrained_model={"name_or_path": "(patched loader)"},
            network={"type": "c3lier", "rank": 4, "alpha": 1.0, "training_method": "noxattn"},
            train={"precision": "float32", "noise_scheduler": "ddim", "iterations": iterations, "lr": self.lr,
                   "optimizer": "AdamW", "lr_scheduler": "constant", "max_denoising_steps": 50},
            save={"name": "official", "path": str(self.out), "per_steps": 10**9, "precision": "float32"},
            logging={"use_wandb": False, "verbose": False}, other={"use_xformers": False})

    def train(self, iterations: int) -> Path:
        set_network_type(self.mods["lora"], "c3lier")  # what train() does itself, made repeatable
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            self.mods["train_lora"].train(self.config(iterations), [self.prompt], "cpu")  # it prints every module
        return self.out / "official_last.pt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", help="a checkout of rohitgandikota/sliders (skipped when not given)")
    parser.add_argument("--model", default="shapes", help="shapes | tiny-sd1 | a diffusers folder")
    parser.add_argument("--resolution", type=int, default=None, help="default: the model's native size")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ours-refreshes", type=int, default=2, help="trajectory refreshes per round of ours")
    parser.add_argument("--official-iterations", type=int, default=20, help="iterations per official round")
    parser.add_argument("--eta", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--budget", type=float, default=45.0, help="seconds of training for the efficacy rows (0: skip)")
    parser.add_argument("--seeds", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()
    if not args.official:
        print("skipped: pass --official DIR (a checkout of rohitgandikota/sliders) to compare with the official loop")
        return
    torch.set_num_threads(args.threads)
    import logging
    logging.disable(logging.WARNING)

    denoiser = load_model(args.model)
    resolution = args.resolution or denoiser.default_resolution
    clock = StepClock()
    official = OfficialTrainer(args.official, denoiser, resolution, args.eta, args.lr, clock)
    clock.count(denoiser.unet)
    pair = PromptPair(target=PROMPTS["target"], positive=PROMPTS["positive"], negative=PROMPTS["negative"], eta=args.eta)
    ours_config = TrainConfig(rank=4, alpha=1.0, lr=args.lr, layers="noxattn", resolution=resolution, seed=0)
    ours_iterations = args.ours_refreshes * ours_config.trajectory_reuse + 1

    def train_ours(iterations: int, name: str):
        config = TrainConfig(**{**ours_config.__dict__, "iterations": iterations})
        result = train_text_slider(denoiser, [pair], config, name=name, progress=False)
        return result

    def ours_round():
        train_ours(ours_iterations, "timing")
        denoiser.sliders.remove("timing")

    rows = {"ours": [], "official": []}
    for r in range(args.rounds):  # interleaved: both loops see the same machine state
        for name, run in (("official", lambda: official.train(args.official_iterations + 1)), ("ours", ours_round)):
            seconds, cpu_seconds, samples = row = clock.measure(run)
            rows[name].append(row)
            print(f"round {r + 1} {name:8s}: {seconds * 1000:7.1f} ms/iter (CPU {cpu_seconds * 1000:7.1f}), "
                  f"{samples:5.1f} UNet samples/iter", flush=True)

    summary = {"model": args.model, "resolution": resolution, "threads": args.threads, "rounds": args.rounds,
               "official_iterations_per_round": args.official_iterations + 1,
               "ours_iterations_per_round": ours_iterations}
    clocks = (("", 0), ("cpu_", 1))  # key prefix, index in a measured row (wall, CPU, samples)
    for name, values in rows.items():
        summary[name] = {"unet_samples_per_iter": statistics.median(v[2] for v in values)}
        for prefix, i in clocks:
            times = [v[i] for v in values]
            summary[name].update({f"{prefix}min_ms": min(times) * 1000,
                                  f"{prefix}median_ms": statistics.median(times) * 1000})
    for prefix, i in clocks:
        for stat in ("min", "median"):
            summary[f"{prefix}speedup_{stat}"] = (summary["official"][f"{prefix}{stat}_ms"]
                                                  / summary["ours"][f"{prefix}{stat}_ms"])
        # each round's two loops ran back to back, so their ratio is the least exposed to the machine's drift
        summary[f"{prefix}speedup_per_round"] = [o[i] / u[i] for o, u in zip(rows["official"], rows["ours"])]
    print(f"\n{args.model} @ {resolution} px, {args.threads} thread(s), {args.rounds} rounds")
    print("| loop | wall ms / iteration (min / median) | CPU ms / iteration (min / median) | UNet samples / iteration |")
    print("|---|---|---|---|")
    for name in ("official", "ours"):
        s = summary[name]
        print(f"| {name} | {s['min_ms']:.0f} / {s['median_ms']:.0f} | {s['cpu_min_ms']:.0f} / {s['cpu_median_ms']:.0f} "
              f"| {s['unet_samples_per_iter']:.1f} |")
    print(f"speed-up, wall: {summary['speedup_min']:.1f}x (min), {summary['speedup_median']:.1f}x (median); per round "
          + ", ".join(f"{r:.1f}x" for r in summary["speedup_per_round"]))
    print(f"speed-up, CPU:  {summary['cpu_speedup_min']:.1f}x (min), {summary['cpu_speedup_median']:.1f}x (median); "
          "per round " + ", ".join(f"{r:.1f}x" for r in summary["cpu_speedup_per_round"]))

    if args.budget > 0 and denoiser.family == "shapes":
        from sliders_core.shapes.metrics import measure_batch
        from sliders_core.shapes.model import DEFAULT_GUIDANCE, DEFAULT_STEPS

        render = dict(seeds=list(range(1000, 1000 + args.seeds)), steps=DEFAULT_STEPS, guidance=DEFAULT_GUIDANCE,
                      resolution=resolution)

        def areas(slider: str) -> dict[float, float]:
            return {a: float(np.mean([m.area_fraction for m in measure_batch(
                generate(denoiser, EVAL_PROMPT, scales={slider: a} if a else {}, **render).numpy())]))
                for a in (-1.0, 0.0, 1.0)}

        n_ours = max(1, round(args.budget / (summary["ours"]["median_ms"] / 1000)))
        n_official = max(1, round(args.budget / (summary["official"]["median_ms"] / 1000)))
        started = time.perf_counter()
        train_ours(n_ours, "ours_equal_time")
        ours_seconds = time.perf_counter() - started
        started = time.perf_counter()
        path = official.train(n_official)
        official_seconds = time.perf_counter() - started
        denoiser.sliders.add("official_equal_time", load_slider(path, denoiser.naming, denoiser.family))
        efficacy = {}
        for name, iterations, seconds in (("official", n_official, official_seconds),
                                          ("ours", n_ours, ours_seconds)):
            a = areas(f"{name}_equal_time")
            efficacy[name] = {"iterations": iterations, "seconds": seconds, "area": a, "delta": a[1.0] - a[-1.0]}
        summary["equal_time"] = {"budget_s": args.budget, "seeds": args.seeds, **efficacy}
        print(f"\nequal wall time ≈ {args.budget:.0f} s of iterations, {args.seeds} seeds, eval prompt {EVAL_PROMPT!r}")
        print("| loop | iterations | wall s (incl. start-up) | area α −1 | α 0 | α +1 | Δarea (+1 − −1) |")
        print("|---|---|---|---|---|---|---|")
        for name, e in efficacy.items():
            a = e["area"]
            print(f"| {name} | {e['iterations']} | {e['seconds']:.0f} | {a[-1.0]:.3f} | {a[0.0]:.3f} | {a[1.0]:.3f} "
                  f"| {e['delta']:+.3f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
