"""A library of sliders from one job file, trained across processes and devices that torchrun
(torch.distributed elastic) starts: each rank trains its share of the sliders on its own device.

Job file (YAML; paths relative to it):

    model: shapes              # the base model of every slider: a model folder, or shapes / tiny-sd1
    output: library            # where the finished sliders land, <name>.safetensors
    defaults: {iterations: 300, save_every: 50}   # options for every slider (the trainers' config fields)
    sliders:
      - {name: size, prompts: size.yaml, eta: 1.0, signs: both}   # a text slider from a prompt set
      - {name: position, pairs: pairs/position, lr: 2e-3}          # an image-pair slider from a pairs folder
      - {name: shape, sliderspace: a shape, k: 4, images: 48}      # SliderSpace: one job per direction,
                                                                   # shape_0 … shape_3

Slider i goes to rank i mod world size. A finished slider (its file has all its steps) is never trained
again; an unfinished one continues from its last checkpoint (`<output>/.partial/<name>.safetensors`,
written every `save_every` steps). So when the launcher restarts a worker group after a rank died,
every rank picks up where its sliders stood. Files are written atomically. Each event is a line of
`<output>/train-many.jsonl`. A SliderSpace entry's concept images and directions are computed once
(by whichever rank needs them first; the same seed gives the same file) and kept in `.partial`.
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
from .formats import load_slider, read_state_dict, safe_output_path, save_slider, write_safetensors
from .sliderspace import SliderSpaceConfig

KINDS = {"prompts": ("text", TrainConfig), "pairs": ("pairs", PairTrainConfig),
         "sliderspace": ("sliderspace", SliderSpaceConfig)}
# a SliderSpace entry's own keys (the rest are SliderSpaceConfig fields); it becomes one job per direction
DISCOVERY = {"k": 4, "images": 48, "rotation": "independent", "embedder": "shapes", "variations": [],
             "steps": None, "guidance": None}
ADAPTER = "in_training"  # the adapter name while a slider trains (job names need not be identifiers)


@dataclass
class SliderJob:
    name: str
    kind: str  # "text" | "pairs"
    source: Path  # the prompt set or the pairs folder
    options: dict = field(default_factory=dict)  # config fields
    prompt: str = ""  # pairs: the text condition; sliderspace: the concept
    discovery: dict = field(default_factory=dict)  # sliderspace: DISCOVERY keys, the entry's name and direction

    def config(self):
        cls = next(c for kind, c in KINDS.values() if kind == self.kind)
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
    if "model" not in data or "output" not in data:
        raise SliderError(f"{path}: a job file needs 'model' and 'output'")
    base = path.parent
    defaults = data.get("defaults") or {}
    known = {f.name for _, cls in KINDS.values() for f in fields(cls)}
    if set(defaults) - known:
        raise SliderError(f"{path}: unknown option(s) {sorted(set(defaults) - known)} in 'defaults'; valid: "
                          f"{sorted(known)}")
    jobs, names = [], set()
    for entry in data["sliders"]:
        if not isinstance(entry, dict):
            raise SliderError(f"{path}: each entry of 'sliders' is a mapping such as {{name: age, prompts: age.yaml}}, "
                              f"got {entry!r}")
        entry = dict(entry)
        name = str(entry.pop("name", ""))
        safe_output_path(base, name)  # a plain file name, never a path
        sources = [k for k in KINDS if k in entry]
        if len(sources) != 1:
            raise SliderError(f"{path}: slider {name!r} needs exactly one of 'prompts' (a prompt set), 'pairs' "
                              "(a pairs folder) or 'sliderspace' (a concept prompt)")
        kind, cls = KINDS[sources[0]]
        source = entry.pop(sources[0])
        prompt, discovery = str(entry.pop("prompt", "")) if kind == "pairs" else "", {}
        if kind == "sliderspace":
            prompt, discovery = str(source), {key: entry.pop(key, value) for key, value in DISCOVERY.items()}
            if discovery["embedder"] != "shapes":
                discovery["embedder"] = str(base / discovery["embedder"])
        valid = {f.name for f in fields(cls)}
        options = {k: v for k, v in defaults.items() if k in valid}  # defaults apply where they fit
        options.update(entry)
        unknown = sorted(set(options) - valid)
        if unknown:
            raise SliderError(f"{path}: slider {name!r} has unknown option(s) {unknown}; valid: {sorted(valid)}")
        if kind != "sliderspace":
            where = base / str(source)
            if not (where.is_file() if kind == "text" else where.is_dir()):
                raise SliderError(f"{path}: slider {name!r}: no {'prompt set' if kind == 'text' else 'pairs folder'} "
                                  f"at {where}")
            expanded = [SliderJob(name, kind, where, options, prompt)]
        else:  # one job per direction: `<name>_<j>`
            expanded = [SliderJob(f"{name}_{j}", kind, base, options, prompt, {**discovery, "group": name,
                                                                               "direction": j})
                        for j in range(int(discovery["k"]))]
        for job in expanded:
            if job.name in names:
                raise SliderError(f"{path}: slider {job.name!r} appears twice")
            names.add(job.name)
            job.config()  # bad values fail now, on every rank, before any training
        jobs += expanded
    model = base / str(data["model"])  # a folder beside the job file, else a name load_model knows (shapes, …)
    return JobFile(str(model) if model.exists() else str(data["model"]), base / str(data["output"]), jobs)


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
        final, checkpoint = spec.output / f"{job.name}.safetensors", checkpoint_path(partial, job)
        if finished(final, config.iterations):
            checkpoint.unlink(missing_ok=True)  # left if a rank died between the final write and the cleanup
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
        if checkpoint.parent != partial and not any(checkpoint.parent.iterdir()):
            checkpoint.parent.rmdir()
        for attached in denoiser.sliders.names():
            denoiser.sliders.remove(attached)
        log_event(spec.output, rank=rank, slider=job.name, event="finished", steps=config.iterations,
                  seconds=round(result.seconds, 2))
        done.append(job.name)
    return {"rank": rank, "world_size": size, "sliders": done, "output": str(spec.output)}


def checkpoint_path(partial: Path, job: SliderJob) -> Path:
    if job.kind == "sliderspace":  # train_sliderspace names its checkpoints after the adapter, in a folder
        return partial / job.name / f"{ADAPTER}_{job.discovery['direction']}.safetensors"
    return partial / f"{job.name}.safetensors"


def train_job(denoiser, job: SliderJob, config, resume, checkpoint: Path):
    if job.kind == "sliderspace":
        return train_direction(denoiser, job, config, resume, checkpoint)
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


def train_direction(denoiser, job: SliderJob, config: SliderSpaceConfig, resume, checkpoint: Path):
    """Direction j of a SliderSpace entry: its concept images and directions are computed once per entry
    and kept beside the checkpoints (any rank may compute them: the same seed gives the same file)."""
    from .cli import _sampling, load_embedder
    from .sliderspace import (
        ConceptImages,
        embed_images,
        generate_concept_images,
        principal_directions,
        train_sliderspace,
    )

    d, j = job.discovery, job.discovery["direction"]
    embedder = load_embedder(d["embedder"], denoiser)
    cache = checkpoint.parent.parent / f"{d['group']}.directions.safetensors"
    if cache.is_file():
        saved, metadata = read_state_dict(cache, "SliderSpace directions")
        images = ConceptImages(saved["latents"], saved["images"].float() / 255, json.loads(metadata["prompts"]),
                               json.loads(metadata["seeds"]))
        directions, explained = saved["directions"], saved["explained"]
    else:
        sampling = _sampling(denoiser, d["steps"], d["guidance"])
        images = generate_concept_images(denoiser, job.prompt, int(d["images"]), variations=d["variations"],
                                         seed=config.seed, **sampling)
        directions, explained = principal_directions(embed_images(embedder, images.images), int(d["k"]),
                                                     d["rotation"], seed=config.seed)
        write_safetensors({"latents": images.latents, "images": (images.images * 255).round().to(torch.uint8),
                           "directions": directions, "explained": explained},
                          {"prompts": json.dumps(images.prompts), "seeds": json.dumps(images.seeds)},
                          cache)  # atomic: a rank computing it at the same time writes the same bytes
    checkpoint.parent.mkdir(exist_ok=True)
    results = train_sliderspace(denoiser, embedder, images, directions, explained, job.prompt, config,
                                name=ADAPTER, resume=[None] * j + [resume], checkpoint_dir=checkpoint.parent,
                                progress=False, only=[j])
    return results[0]


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
