"""Wall time of `train-many` for the same four sliders with 1 and 2 processes (torchrun), one run each.

    python benchmarks/train_many_scaling.py [--iterations 60] [--json out.json]

Four text sliders on the shapes model (the size and colour prompt sets, two seeds each). Rows: one
process using every core, one process on one thread, and two processes on one thread each (what
train-many gives each of 2 processes on a 2-core machine). Every run starts from an empty output
folder and includes loading the model in each process. The files of the 2-process run are compared
with those of the 1-thread run: the same seeds give the same sliders.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sliders_core.formats import read_state_dict  # noqa: E402


def job_file(folder: Path, iterations: int) -> Path:
    sliders = [{"name": f"{concept}-{seed}", "prompts": str(ROOT / "prompt_sets" / f"shapes_{concept}.yaml"),
                "seed": seed} for seed in (0, 1) for concept in ("size", "colour")]
    path = folder / "jobs.yaml"
    path.write_text(json.dumps({"model": "shapes", "output": "library", "defaults": {"iterations": iterations},
                                "sliders": sliders}))
    return path


def run(processes: int, threads: int | None, iterations: int) -> tuple[float, Path]:
    folder = Path(tempfile.mkdtemp(prefix="train-many-"))
    command = [sys.executable, "-m", "sliders_core", "train-many", str(job_file(folder, iterations)),
               "--processes", str(processes)]
    if threads:
        command += ["--threads", str(threads)]
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - start, folder / "library"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    rows = {}
    for label, processes, threads in (("1 process, all cores", 1, cores), ("1 process, 1 thread", 1, 1),
                                      ("2 processes, 1 thread each", 2, 1)):
        seconds, library = run(processes, threads, args.iterations)
        rows[label] = {"seconds": round(seconds, 1), "library": str(library)}
        print(f"{label:28s}: {seconds:6.1f} s", flush=True)
    one, two = Path(rows["1 process, 1 thread"]["library"]), Path(rows["2 processes, 1 thread each"]["library"])
    same = all(all(torch.equal(a, b) for a, b in zip(read_state_dict(f)[0].values(),
                                                      read_state_dict(two / f.name)[0].values()))
               for f in sorted(one.glob("*.safetensors")))
    ratio_threads = rows["1 process, all cores"]["seconds"] / rows["2 processes, 1 thread each"]["seconds"]
    ratio_single = rows["1 process, 1 thread"]["seconds"] / rows["2 processes, 1 thread each"]["seconds"]
    print(f"\n4 sliders x {args.iterations} iterations, shapes model, {cores} cores")
    print(f"speed-up of 2 processes: {ratio_threads:.2f}x over 1 process on all cores, {ratio_single:.2f}x over "
          f"1 process on 1 thread; files equal to the 1-thread run: {same}")
    if args.json:
        args.json.write_text(json.dumps({"iterations": args.iterations, "cores": cores, "rows": rows,
                                         "speedup_vs_all_cores": ratio_threads,
                                         "speedup_vs_one_thread": ratio_single, "same_files": same}, indent=1))


if __name__ == "__main__":
    main()
