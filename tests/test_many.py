"""Many sliders across processes (torchrun, gloo on the CPU): job-parallel libraries and data-parallel training."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sliders_core.cli import main as cli_main
from sliders_core.errors import SliderError
from sliders_core.formats import read_state_dict
from sliders_core.many import load_jobs

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(trajectory_steps=6, trajectory_reuse=2, seed=0)


def write_jobs(folder: Path, iterations=6, save_every=0, names=("size", "colour", "size-2")) -> Path:
    """Three text sliders (two prompt sets, seeds differ) and one pair slider, on the shapes model."""
    cli_main(["make-pairs", "--concept", "position", "--count", "2", "--out", str(folder / "pairs")])
    sets = {"size": "shapes_size.yaml", "colour": "shapes_colour.yaml", "size-2": "shapes_size.yaml"}
    sliders = [{"name": n, "prompts": str(ROOT / "prompt_sets" / sets[n]), "seed": i} for i, n in enumerate(names)]
    sliders.append({"name": "position", "pairs": "pairs", "lr": 2e-3})
    defaults = {"iterations": iterations, "save_every": save_every}
    jobs = {"model": "shapes", "output": "library", "defaults": defaults,
            "sliders": [{**s, **(FAST if "prompts" in s else {})} for s in sliders]}
    path = folder / "jobs.yaml"
    path.write_text(json.dumps(jobs))  # JSON is YAML
    return path


def torchrun(*args, timeout=300, **popen):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)


def tensors(path):
    return read_state_dict(path)[0]


def events(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "train-many.jsonl").read_text().splitlines()]


def test_two_ranks_train_four_sliders_that_equal_those_trained_one_by_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for folder in (one, two):
        folder.mkdir()
        write_jobs(folder)
    torch_threads = torch.get_num_threads()
    try:
        assert cli_main(["train-many", str(one / "jobs.yaml"), "--threads", "1"]) == 0  # one process, in order
    finally:
        torch.set_num_threads(torch_threads)
    proc = torchrun("--nproc-per-node=2", "-m", "sliders_core", "train-many", str(two / "jobs.yaml"),
                    "--threads", "1")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    ranks = {e["slider"]: e["rank"] for e in events(two / "library") if e["event"] == "finished"}
    assert ranks == {"size": 0, "colour": 1, "size-2": 0, "position": 1}
    for name in ranks:
        a, b = tensors(one / "library" / f"{name}.safetensors"), tensors(two / "library" / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert not any((two / "library" / ".partial").iterdir())  # checkpoints go once a slider is finished
    # a finished library is never retrained
    assert cli_main(["train-many", str(two / "jobs.yaml"), "--threads", "1"]) == 0
    assert [e["event"] for e in events(two / "library")[-4:]] == ["skipped"] * 4


def test_a_killed_rank_is_restarted_and_its_slider_resumes_from_its_checkpoint(tmp_path):
    jobs = write_jobs(tmp_path, iterations=60, save_every=4, names=("size", "colour", "size-2"))
    output = tmp_path / "library"
    proc = torchrun("--nproc-per-node=2", "--max-restarts=2", "-m", "sliders_core", "train-many", str(jobs),
                    "--threads", "1")
    checkpoint = output / ".partial" / "colour.safetensors"  # rank 1's first slider
    deadline = time.time() + 240
    while not checkpoint.is_file():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    victim = json.loads((output / ".ranks" / "1.json").read_text())["pid"]
    os.kill(victim, signal.SIGKILL)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:]
    log = events(output)
    colour = [e for e in log if e["slider"] == "colour"]
    assert colour[0]["event"] == "started"
    resumed = [e for e in colour if e["event"] == "resumed"]
    assert resumed and resumed[0]["step"] >= 4 and resumed[0]["restart"] >= 1
    finished = [e["slider"] for e in log if e["event"] == "finished"]
    assert sorted(finished) == ["colour", "position", "size", "size-2"]  # none lost, none trained twice
    assert all(read_state_dict(output / f"{n}.safetensors")[1]["sliders.steps"] == "60" for n in finished)


@pytest.mark.parametrize("signs", ["plus", "separate"])  # separate: each step leaves one end's LoRA unused
def test_data_parallel_training_over_two_ranks_equals_one_process_with_the_whole_batch(tmp_path, signs):
    # a two-ended slider's ends take every other step: 8 give each end the 4 Adam steps of the one-ended run
    # (Adam's first, sign-like steps lift float noise the most)
    iterations = "8" if signs == "separate" else "4"
    common = ["--model", "shapes", "--prompts", str(ROOT / "prompt_sets" / "shapes_size.yaml"), "--iterations", iterations,
              "--batch-size", "2", "--trajectory-steps", "6", "--trajectory-reuse", "2", "--name", "ddp",
              "--signs", signs]
    assert cli_main(["train", *common, "--out-dir", str(tmp_path / "one")]) == 0
    proc = torchrun("--nproc-per-node=2", "-m", "sliders_core", "train", *common, "--out-dir", str(tmp_path / "two"))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    a, b = tensors(tmp_path / "one" / "ddp.safetensors"), tensors(tmp_path / "two" / "ddp.safetensors")
    assert a.keys() == b.keys()
    moved = max(float(a[k].abs().max()) for k in a if "lora_up" in k)
    assert moved > 1e-4  # the slider trained
    if signs == "separate":
        assert any(k.startswith("negative_end.") for k in a)
        assert max(float(a[k].abs().max()) for k in a if k.startswith("negative_end.") and "lora_up" in k) > 1e-4
    # equal up to float summation order (the batch's gradient summed in one process vs averaged over two),
    # which Adam's normalised steps can lift to ~0.5 % of the weights; a wrong split or a missing average
    # differs by the size of the update itself
    assert all(torch.allclose(a[k], b[k], atol=1e-2 * moved, rtol=1e-4) for k in a)
    assert out.count('"slider"') == 1  # one rank reports, one file


def test_bad_job_files_say_what_is_wrong(tmp_path):
    path = tmp_path / "jobs.yaml"
    cases = {
        "needs 'model'": {"sliders": [{"name": "a", "prompts": "p.yaml"}]},
        "exactly one of": {"model": "shapes", "output": "o", "sliders": [{"name": "a"}]},
        "unknown option": {"model": "shapes", "output": "o", "sliders": [{"name": "a", "prompts": "p", "ranks": 2}]},
        "in 'defaults'": {"model": "shapes", "output": "o", "defaults": {"itertions": 5},
                          "sliders": [{"name": "a", "prompts": "p"}]},
        "'a_0' appears twice": {"model": "shapes", "output": "o", "sliders": [{"name": "a_0", "prompts": "p"},
                                                                           {"name": "a", "sliderspace": "a shape"}]},
        "appears twice": {"model": "shapes", "output": "o", "sliders": [{"name": "a", "prompts": "p"},
                                                                          {"name": "a", "prompts": "p"}]},
        "name": {"model": "shapes", "output": "o", "sliders": [{"name": "../up", "prompts": "p"}]},
    }
    cases["no prompt set at"] = {"model": "shapes", "output": "o", "sliders": [{"name": "a", "prompts": "missing.yaml"}]}
    (tmp_path / "p").write_text("")
    for message, data in cases.items():
        path.write_text(json.dumps(data))
        with pytest.raises(SliderError, match=message):
            load_jobs(path)


def test_sliderspace_directions_split_over_two_ranks_equal_one_discover_run(tmp_path):
    settings = dict(k=2, images=6, iterations=3, batch_size=2)
    assert cli_main(["discover", "--concept", "a shape", "--k", "2", "--images", "6", "--iterations", "3",
                     "--batch-size", "2", "--out-dir", str(tmp_path / "discover")]) == 0
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(json.dumps({"model": "shapes", "output": "library",
                                "defaults": {"iterations": 99, "eta": 2.0},  # text-only keys are not SliderSpace's
                                "sliders": [{"name": "shape", "sliderspace": "a shape", **settings}]}))
    proc = torchrun("--nproc-per-node=2", "-m", "sliders_core", "train-many", str(jobs), "--threads", "1")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    ranks = {e["slider"]: e["rank"] for e in events(tmp_path / "library") if e["event"] == "finished"}
    assert ranks == {"shape_0": 0, "shape_1": 1}
    for j in range(2):
        a = read_state_dict(tmp_path / "discover" / f"a_shape_{j}.safetensors")
        b = read_state_dict(tmp_path / "library" / f"shape_{j}.safetensors")
        assert b[1]["sliders.kind"] == "sliderspace" and b[1]["sliders.direction"] == str(j)
        assert b[1]["sliders.steps"] == "3"
        assert a[0].keys() == b[0].keys() and all(torch.allclose(a[0][k], b[0][k], atol=1e-6) for k in a[0])
