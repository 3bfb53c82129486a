"""A library of sliders from one job file, trained across processes and devices that torchrun
(torch.distributed elastic) starts: each rank trains its share of the sliders on its own device.

Job file (YAML; paths relative to it):

    model: shapes              # the base model of every slider: a model folder, or shapes / tiny-sd1
    output: library            # where the finished sliders land, <name>.safetensors
    defaults: {iterations: 300, save_every: 50}   # options for every slider (the trainers' config fields)
    sliders:
      - {name: size, prompts: size.yaml, eta: 1.0, signs: both}   # a text slider from a prompt set
      - {name: position, pairs: pairs/position, lr: 2e-3}          # an image-pair slider from a pairs folder

Slider i goes to rank i mod world size. A finished slider (its file has all its steps) is never trained
again; an unfinished one continues from its last checkpoint (`<output>/.partial/<name>.safetensors`,
written every `save_every` steps). So when the launcher restarts a worker group after a rank died,
every rank picks up where its sliders stood. Files are written atomically. Each event is a line of
`<output>/train-many.jsonl`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import yaml

from .config import PairTrainConfig, TrainConfig
from .distributed import local_rank, world
from .errors import SliderError
from .formats import load_slider, read_state_dict, safe_output_path, save_slider

KINDS = {"prompts": ("text", TrainConfig), "pairs": ("pairs", PairTrainConfig)}
ADAPTER = "in_training"  # the adapter name while a slider trains (job names need not be identifiers)


@dataclass
class SliderJob:
    name: str
    kind: str  # "text" | "pairs"
    source: Path  # the prompt set or the pairs folder
    options: dict = field(default_factory=dict)  # config fields
    prompt: str = ""  # pairs: the text condition

    def config(self):
        cls = TrainConfig if self.kind == "text" else PairTrainConfig
        config = cls(**self.options)
        config.validate()
        return config


@dataclass
class JobFile:
    model: str
    output: Path
    jobs: list[SliderJob]


def load_jobs(path: str | Path) -> JobFile:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SliderError(f"cannot read the job file {path}: {exc}") from exc
    if not isinstance(data, dict) or not data.get("sliders"):
        raise SliderError(f"{path}: a job file needs 'model', 'output' and a list 'sliders'")
    base = path.parent
    defaults = data.get("defaults") or {}
    jobs, names = [], set()
    for entry in data["sliders"]:
        entry = dict(entry)
        name = str(entry.pop("name", ""))
        safe_output_path(base, name)  # a plain file name, never a path
        if name in names:
            raise SliderError(f"{path}: slider {name!r} appears twice")
        names.add(name)
        sources = [k for k in KINDS if k in entry]
        if len(sources) != 1:
            raise SliderError(f"{path}: slider {name!r} needs exactly one of 'prompts' (a prompt set) or 'pairs' "
                              "(a pairs folder)")
        kind, cls = KINDS[sources[0]]
        source = base / str(entry.pop(sources[0]))
        prompt = str(entry.pop("prompt", "")) if kind == "pairs" else ""
        options = {**defaults, **entry}
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - valid)
        if unknown:
            raise SliderError(f"{path}: slider {name!r} has unknown option(s) {unknown}; valid: {sorted(valid)}")
        job = SliderJob(name, kind, source, options, prompt)
        job.config()  # bad values fail now, on every rank, before any training
        jobs.append(job)
    if "model" not in data or "output" not in data:
        raise SliderError(f"{path}: a job file needs 'model' and 'output'")
    return JobFile(str(data["model"]), base / str(data["output"]), jobs)


def finished(path: Path, iterations: int) -> bool:
    if not path.is_file():
        return False
    _, metadata = read_state_dict(path)
    return int(metadata.get("sliders.steps", 0)) >= iterations


def log_event(output: Path, **event) -> None:
    """One JSON line, appended in a single write (safe from several processes on a local disk)."""
    line = json.dumps({"time": round(time.time(), 3), **event}) + "\n"
    with open(output / "train-many.jsonl", "a") as f:
        f.write(line)


def train_many(job_file: str | Path, *, threads: int | None = None, device: str | None = None) -> dict:
    """This rank's share of the job file (all of it in a single process)."""
    from .cli import load_model

    spec = load_jobs(job_file)
    rank, size = world()
    if device is None:
        device = f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local))
    partial = spec.output / ".partial"
    for folder in (spec.output, partial, spec.output / ".ranks"):
        folder.mkdir(parents=True, exist_ok=True)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    (spec.output / ".ranks" / f"{rank}.json").write_text(json.dumps({"pid": os.getpid(), "restart": restart}))
    mine = spec.jobs[rank::size]
    denoiser = load_model(spec.model, None, device) if mine else None
    done = []
    for job in mine:
        config = job.config()
        final, checkpoint = spec.output / f"{job.name}.safetensors", partial / f"{job.name}.safetensors"
        if finished(final, config.iterations):
            log_event(spec.output, rank=rank, slider=job.name, event="skipped", reason="finished")
            done.append(job.name)
            continue
        resume = None
        for earlier in (checkpoint, final):  # a checkpoint, or a finished file asked for more steps
            if earlier.is_file():
                resume = load_slider(earlier, denoiser.naming, denoiser.family)
                break
        steps = int(resume.metadata.get("sliders.steps", 0)) if resume is not None else 0
        log_event(spec.output, rank=rank, slider=job.name, event="resumed" if resume else "started", step=steps,
                  restart=restart)
        result = train_job(denoiser, job, config, resume, checkpoint)
        save_slider(result.weights, final)  # atomic
        checkpoint.unlink(missing_ok=True)
        denoiser.sliders.remove(ADAPTER)
        log_event(spec.output, rank=rank, slider=job.name, event="finished", steps=config.iterations,
                  seconds=round(result.seconds, 2))
        done.append(job.name)
    return {"rank": rank, "world_size": size, "sliders": done, "output": str(spec.output)}


def train_job(denoiser, job: SliderJob, config, resume, checkpoint: Path):
    if job.kind == "text":
        from .prompts import load_prompt_set
        from .text_slider import train_text_slider

        return train_text_slider(denoiser, load_prompt_set(job.source), config, name=ADAPTER, resume=resume,
                                 checkpoint_path=checkpoint, progress=False)
    from .image_pairs import load_pair_folder
    from .pair_slider import train_pair_slider

    resolution = denoiser.default_resolution
    return train_pair_slider(denoiser, load_pair_folder(job.source, resolution), config, prompt=job.prompt,
                             name=ADAPTER, resume=resume, checkpoint_path=checkpoint, progress=False)


def launch(job_file: str | Path, processes: int, max_restarts: int = 3, threads: int | None = None) -> int:
    """`processes` workers on this machine under torch.distributed.run (torchrun): it restarts the
    worker group up to `max_restarts` times when a rank dies."""
    from torch.distributed import run

    args = ["--standalone", f"--nproc-per-node={processes}", f"--max-restarts={max_restarts}",
            "--module", "sliders_core", "train-many", str(job_file)]
    if threads:
        args += ["--threads", str(threads)]
    try:
        run.main(args)
    except Exception as exc:  # ChildFailedError once the restarts are used up
        raise SliderError(f"train-many failed after {max_restarts} restarts: {exc}") from exc
    return 0
