"""Cost of one text-slider training iteration: our loop vs a reference-structured loop.

Both run side by side in one process on the same tiny SD1-shaped model, the same prompts and the
same number of iterations. Reported: single-image UNet forwards per iteration (no backward) and the
wall-time ratio. The reference structure (MISSION §1): per iteration draw k ~ U[1, 49] on a 50-step
DDIM grid, denoise k steps from fresh noise with CFG (batch 2, LoRA on), then three separate
CFG-shaped frozen calls (positive, neutral, unconditional; their unconditional halves discarded),
then the CFG-shaped LoRA prediction.

    python benchmarks/forward_budget.py [--iterations 40]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sliders_core.backends.diffusers_backend import DiffusersDenoiser  # noqa: E402
from sliders_core.config import TrainConfig  # noqa: E402
from sliders_core.denoiser import Cond  # noqa: E402
from sliders_core.prompts import PromptPair  # noqa: E402
from sliders_core.text_slider import slider_modules, train_text_slider  # noqa: E402
from sliders_core.tiny import tiny_sd1_pipeline  # noqa: E402

PAIR = PromptPair(target="a person", positive="a person, old", negative="a person, young", eta=2.0)
PRESERVED = PromptPair(target="a person", positive="a person, old", negative="a person, young", eta=2.0,
                       preservation=("male", "female", "child"))


def reference_loop(denoiser: DiffusersDenoiser, pair: PromptPair, iterations: int, resolution: int, seed: int, *,
                   name: str = "ref", lr: float = 2e-4, seconds: float | None = None, keep: bool = False):
    """Returns (UNet forwards / iteration, seconds / iteration, iterations run). With `seconds`, stops
    at that wall-time budget; with `keep`, the trained slider stays attached under `name`."""
    host = denoiser.sliders
    torch.manual_seed(seed)
    host.add(name, modules=slider_modules(denoiser, "noxattn"), rank=4, alpha=1.0, trainable=True)
    optimizer = torch.optim.AdamW(host.parameters(name), lr=lr)
    c_t, c_pos, c_neg = (denoiser.encode([p]) for p in (pair.target, pair.positive, pair.negative))
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    start, before = time.perf_counter(), denoiser.forward_count

    def cfg_call(x, t, cond, guidance):
        out_u, out_c = denoiser.predict(torch.cat([x, x]), t.expand(2), Cond.cat([c_neg, cond])).chunk(2)
        return out_u + guidance * (out_c - out_u)

    done = 0
    while done < iterations and (seconds is None or time.perf_counter() - start < seconds):
        done += 1
        scheduler = denoiser.new_scheduler(50)
        k = rng.randint(1, 49)
        x = denoiser.initial_noise(1, resolution, gen) * scheduler.init_noise_sigma
        host.set_scales({name: 1.0})
        with torch.no_grad():
            for t in scheduler.timesteps[:k]:
                x = scheduler.step(cfg_call(x, t, c_t, 3.0), t, x).prev_sample
            t = scheduler.timesteps[k]
            with host.disabled():
                positive = cfg_call(x, t, c_pos, 1.0)
                neutral = cfg_call(x, t, c_t, 1.0)
                unconditional = cfg_call(x, t, c_neg, 1.0)
        prediction = cfg_call(x, t, c_t, 1.0)
        loss = F.mse_loss(prediction.float(), (neutral + pair.eta * (positive - unconditional)).float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    host.set_scales({})
    if not keep:
        host.remove(name)
    return (denoiser.forward_count - before) / done, (time.perf_counter() - start) / done, done


def ours(denoiser: DiffusersDenoiser, pair: PromptPair, iterations: int, resolution: int, seed: int):
    config = TrainConfig(iterations=iterations, resolution=resolution, seed=seed)
    result = train_text_slider(denoiser, [pair], config, name="ours", progress=False)
    denoiser.sliders.remove("ours")
    return result.unet_samples_per_iteration, result.seconds / iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps timings stable on a busy box)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    denoiser = DiffusersDenoiser(tiny_sd1_pipeline())
    ours(denoiser, PAIR, 3, args.resolution, 99)  # warm-up: first calls of each batch shape are slow on CPU
    reference_loop(denoiser, PAIR, 3, args.resolution, 99)

    rows = [
        ("reference-structured loop", *reference_loop(denoiser, PAIR, args.iterations, args.resolution, 0)[:2]),
        ("ours (defaults: 30-step trajectory reused 20×)", *ours(denoiser, PAIR, args.iterations, args.resolution, 0)),
        ("ours + 3 preservation prompts (summed)", *ours(denoiser, PRESERVED, args.iterations, args.resolution, 0)),
    ]
    ref_time = rows[0][2]
    print(f"tiny SD1-shaped UNet, {args.resolution}² px, {args.iterations} iterations each, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| loop | UNet forwards / iteration | wall / iteration | speed-up vs reference |")
    print("|---|---|---|---|")
    for name, forwards, seconds in rows:
        print(f"| {name} | {forwards:.1f} | {seconds * 1000:.1f} ms | {ref_time / seconds:.1f}× |")


if __name__ == "__main__":
    main()
