"""Example workflows, and the pack inside a real, running ComfyUI server.

Two tiers in this file:

* Pure (always run, no ComfyUI): every UI-format workflow in ``workflows/`` is internally consistent
  (links ↔ inputs/outputs), agrees with its API-format twin (node types, links, widget values in the
  frontend's order), and is exactly what ``workflows/make_ui_workflows.py`` generates from the API file
  and the node-schema snapshot ``tests/comfy_object_info.json``.

* Live (needs ``COMFYUI_DIR`` and ComfyUI's dependencies in this interpreter; skipped otherwise):
  a module-scoped fixture writes a tiny random-weight checkpoint that ComfyUI's CheckpointLoaderSimple
  detects as SD1.5 (UNet with model_channels 320 / context 768 but one level, one res block, one
  transformer block; a full-size CLIP-L key set whose transformer layers are zero, i.e. identity;
  a TAESD VAE), starts ``main.py --cpu`` on 127.0.0.1 with ``--base-directory`` in a temp folder
  whose ``custom_nodes/`` holds a symlink to this repository, and talks to it over HTTP only
  (/object_info, /prompt, /history, /queue, /interrupt). The server's stdout/stderr go to a file
  that the tests grep. The server is stopped at the end.

Run:  COMFYUI_DIR=/path/to/ComfyUI OMP_NUM_THREADS=1 /path/to/comfy-venv/bin/python -m pytest tests/test_comfy_live.py -q
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from workflow_support import WORKFLOWS, load_generator

REPO = Path(__file__).resolve().parents[1]
# ComfyUI serves a pack's example workflows from the first of these folders that exists
TEMPLATE_FOLDERS = ("example_workflows", "example", "examples", "workflow", "workflows")
PACK_NODE_IDS = ("ConceptSlidersLoadShapesModel", "ConceptSlidersTrainText", "ConceptSlidersTrainPairs", "ConceptSlidersLoadImagePairs",
                 "ConceptSlidersLoad", "ConceptSlidersApply", "ConceptSlidersStack",
                 "ConceptSlidersDelayedSampler", "ConceptSlidersSweep", "ConceptSlidersNullTextInvert",
                 "ConceptSlidersInversionSampler", "ConceptSlidersSaveInversion", "ConceptSlidersLoadInversion")
DEFAULT_CKPT = "v1-5-pruned-emaonly.safetensors"


gen = load_generator()
API_WORKFLOWS = gen.api_workflows(WORKFLOWS)
WORKFLOW_NAMES = sorted(API_WORKFLOWS)
# the workflows on the pack's embedded shapes model run as shipped, with no checkpoint; the others need SD1.5
SHAPES_WORKFLOWS = [n for n in WORKFLOW_NAMES if n.startswith("Shapes")]
# Flux and SD3.5: ComfyUI's loaders recognise those families by their full sizes, so no tiny checkpoint stands
# in for them; their workflows are checked as files and opened in the web UI here, and run node by node
# in-process with tiny models in place of the loaders in test_comfy_nodes.py
FLOW_WORKFLOWS = [n for n in WORKFLOW_NAMES if n.startswith(("Flux", "SD3.5"))]
FLOW_MODEL_FILES = {"unet_name": "flux1-dev.safetensors", "vae_name": "ae.safetensors",
                    "ckpt_name": "sd3.5_medium.safetensors"}
SD_WORKFLOWS = [n for n in WORKFLOW_NAMES if n not in SHAPES_WORKFLOWS + FLOW_WORKFLOWS]
SD_COMPOSE, SD_DELAYED, SD_EDIT = ("SD1.5 - compose three sliders", "SD1.5 - delayed slider vs plain",
                                   "SD1.5 - edit a photo with a slider")


# =================================================================================================
# Pure tier: workflow files
# =================================================================================================

def test_every_api_workflow_has_a_ui_twin():
    assert WORKFLOW_NAMES, "no workflows/api/*.json found"
    ui_files = {p.stem for p in WORKFLOWS.glob("*.json")}
    assert ui_files == set(WORKFLOW_NAMES), f"UI files {sorted(ui_files)} vs API files {WORKFLOW_NAMES}"


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_ui_workflow_is_consistent_with_its_api_file(name):
    snapshot = gen.load_snapshot()
    api = API_WORKFLOWS[name]
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))
    errors = gen.check_ui(ui, api, snapshot)
    assert not errors, "\n".join(errors)
    regenerated = gen.dumps(gen.api_to_ui(api, snapshot, name))
    assert (WORKFLOWS / f"{name}.json").read_text(encoding="utf-8") == regenerated, (
        f"workflows/{name}.json is out of date: run python workflows/make_ui_workflows.py")


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_workflow_uses_core_and_pack_nodes_with_valid_values(name):
    snapshot = gen.load_snapshot()
    api = API_WORKFLOWS[name]
    for node_id, node in api.items():
        class_type = node["class_type"]
        module = snapshot[class_type]["python_module"]
        ours = class_type.startswith("ConceptSliders") and module == "custom_nodes"
        core = module == "nodes" or module.startswith("comfy_extras.")
        assert ours or core, f"node {node_id}: {class_type} ({module}) is neither core nor ours"
        for name_, value in node["inputs"].items():  # widget values pass ComfyUI's validation
            spec = next(s for s in snapshot[class_type]["inputs"] if s["name"] == name_)
            if gen.is_link(value):
                continue
            if spec["type"] == "COMBO" and spec.get("options"):
                assert value in spec["options"], f"node {node_id}.{name_}: {value!r} is not an option"
            if spec["type"] in ("INT", "FLOAT"):
                assert spec.get("min", value) <= value <= spec.get("max", value), (node_id, name_, value)
    ckpts = [n["inputs"]["ckpt_name"] for n in api.values() if n["class_type"] == "CheckpointLoaderSimple"]
    if name in SHAPES_WORKFLOWS:  # out of the box: the embedded model and sliders shipped with the pack
        assert not ckpts, ckpts
        assert any(n["class_type"] == "ConceptSlidersLoadShapesModel" for n in api.values())
        for node in api.values():
            if node["class_type"] == "ConceptSlidersLoad":
                shipped = node["inputs"]["slider_name"].removeprefix("concept-sliders-pack/")
                assert (REPO / "models" / "sliders" / shipped).is_file(), node["inputs"]["slider_name"]
    elif name in FLOW_WORKFLOWS:
        files = {k: v for n in api.values() for k, v in n["inputs"].items() if k in FLOW_MODEL_FILES}
        assert files and all(v == FLOW_MODEL_FILES[k] for k, v in files.items()), files
        trainers = [n for n in api.values() if n["class_type"] == "ConceptSlidersTrainText"]
        assert trainers and all(n["inputs"]["layers"].startswith("dit-") for n in trainers)
    else:
        assert ckpts and all(c == DEFAULT_CKPT for c in ckpts), ckpts


def test_check_ui_catches_broken_links_and_widget_drift():
    snapshot = gen.load_snapshot()
    name = "SD1.5 - train a text slider and sweep it"
    api = API_WORKFLOWS[name]
    ui = gen.api_to_ui(api, snapshot, name)
    assert gen.check_ui(ui, api, snapshot) == []
    broken = copy.deepcopy(ui)
    broken["links"][0][4] += 1  # wrong target slot
    assert any("does not point back" in e for e in gen.check_ui(broken, api, snapshot))
    drift = copy.deepcopy(api)
    node_id = next(i for i, n in drift.items() if n["class_type"] == "EmptyLatentImage")
    drift[node_id]["inputs"]["width"] = 768
    assert any("widgets_values" in e for e in gen.check_ui(ui, drift, snapshot))


# =================================================================================================
# Live tier: a real ComfyUI server
# =================================================================================================

def _comfyui_dir() -> Path | None:
    value = os.environ.get("COMFYUI_DIR", "").strip()
    return Path(value).expanduser().resolve() if value else None


_COMFY_DIR = _comfyui_dir()
live = pytest.mark.skipif(
    _COMFY_DIR is None,
    reason="live ComfyUI tier: COMFYUI_DIR is not set (point it at a ComfyUI checkout whose requirements are "
           "installed in this interpreter)")

CKPT_VERSION = "tiny-sd15-v1"  # bump when the checkpoint recipe below changes (invalidates the cache)
CKPT_NAME = "tiny-sd15.safetensors"
START_TIMEOUT = 150.0
RUN_TIMEOUT = 120.0
LOG_NOT_LOADED = "lora key not loaded"

# One level, one res block, one transformer block: SD1.5-detectable (model_channels 320, context 768,
# conv proj_in, no adm) and about 24 M parameters.
TINY_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [1], "transformer_depth": [1], "channel_mult": [1], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "transformer_depth_output": [1, 1],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
TOKEN_ROWS = 16384  # random token embeddings for the common vocabulary, zeros (sparse) above


def _write_sparse_safetensors(path: Path, tensors: dict, metadata: dict) -> None:
    """safetensors writer that leaves all-zero 1 MiB runs as file holes (the zero CLIP layers cost no disk)."""
    import numpy as np

    names = {np.dtype("float16"): "F16", np.dtype("float32"): "F32"}
    header, blobs, offset = {"__metadata__": metadata}, [], 0
    for name in sorted(tensors):
        array = tensors[name].detach().cpu().contiguous().numpy()
        data = array.tobytes()
        header[name] = {"dtype": names[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    chunk = 1 << 20
    zeros = bytes(chunk)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for data in blobs:
            for i in range(0, len(data), chunk):
                part = data[i:i + chunk]
                if part == zeros[:len(part)]:
                    f.seek(len(part), os.SEEK_CUR)
                else:
                    f.write(part)
        f.truncate(f.tell())
        f.flush()
        os.fsync(f.fileno())


def _build_tiny_sd15_checkpoint(path: Path) -> None:
    """A checkpoint in the original SD layout (model.diffusion_model., cond_stage_model.transformer.,
    first_stage_model.) that CheckpointLoaderSimple loads as SD15 with no missing CLIP/VAE keys."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import comfy_support

    comfy_support.import_comfy()
    import comfy.clip_model
    import comfy.ops
    import comfy.supported_models
    import comfy.taesd.taesd

    tensors = {}
    model = comfy.supported_models.SD15(dict(TINY_UNET_CONFIG, dtype=torch.float32)).get_model({})
    comfy_support.init_weights_(model.diffusion_model, seed=0)
    for key, value in model.diffusion_model.state_dict().items():
        tensors[f"model.diffusion_model.{key}"] = value.half()
    del model

    config_path = Path(comfy.clip_model.__file__).with_name("sd1_clip_config.json")
    config = json.loads(config_path.read_text())
    with torch.device("meta"):  # shapes only
        clip = comfy.clip_model.CLIPTextModel(config, torch.float16, "meta", comfy.ops.manual_cast)
    gen_ = torch.Generator().manual_seed(1)
    for key, value in clip.state_dict().items():
        if key.endswith("token_embedding.weight"):
            t = torch.zeros(value.shape)
            t[:TOKEN_ROWS] = torch.randn(TOKEN_ROWS, value.shape[1], generator=gen_)
            t[-2:] = torch.randn(2, value.shape[1], generator=gen_)  # start / end tokens
        elif key.endswith("position_embedding.weight"):
            t = torch.randn(value.shape, generator=gen_) * 0.1
        elif key.startswith("text_model.final_layer_norm."):
            t = torch.ones(value.shape) if key.endswith("weight") else torch.zeros(value.shape)
        elif key == "text_projection.weight":
            t = torch.eye(value.shape[0])
        else:  # zero attention/MLP/norm weights: every layer is the identity (residual only)
            t = torch.zeros(value.shape)
        tensors[f"cond_stage_model.transformer.{key}"] = t.half()

    taesd = comfy.taesd.taesd.TAESD()  # VAE(sd) picks TAESD from "taesd_decoder.1.weight"
    comfy_support.init_weights_(taesd, seed=2)
    for key, value in taesd.state_dict().items():
        tensors[f"first_stage_model.{key}"] = value.half()
    tensors["first_stage_model.vae_scale"] = torch.tensor(0.18215).half()  # as VAELoader sets for SD1 TAESD
    tensors["first_stage_model.vae_shift"] = torch.tensor(0.0).half()
    _write_sparse_safetensors(path, tensors, {"format": "pt", "note": "random weights, for tests only"})


def _cached_checkpoint() -> Path:
    cache = Path(tempfile.gettempdir()) / "concept-sliders-live-cache"
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{CKPT_VERSION}.safetensors"
    if not path.is_file():
        tmp = cache / f".{CKPT_VERSION}.{os.getpid()}.tmp"
        try:
            _build_tiny_sd15_checkpoint(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A ComfyUI process on 127.0.0.1 and a few HTTP helpers (stdlib only)."""

    def __init__(self, base: Path, port: int, process: subprocess.Popen, log_path: Path):
        self.base, self.port, self.process, self.log_path = base, port, process, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.loras = base / "models" / "loras"
        self.sliders = self.loras / "sliders"
        self.output = base / "output"

    # -- HTTP --------------------------------------------------------------------------------------
    def request(self, path: str, payload=None, timeout: float = 30.0):
        data = None if payload is None else json.dumps(payload).encode("utf-8")
        req = urllib.request.Request(self.url + path, data=data, method="GET" if data is None else "POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                body = response.read()
                status = response.status
        except urllib.error.HTTPError as exc:
            body, status = exc.read(), exc.code
        try:
            return status, json.loads(body.decode("utf-8")) if body else None
        except ValueError:
            return status, body.decode("utf-8", "replace")

    def get(self, path: str, timeout: float = 30.0):
        status, body = self.request(path, timeout=timeout)
        assert status == 200, f"GET {path} -> {status}: {body}"
        return body

    def alive(self) -> bool:
        if self.process.poll() is not None:
            return False
        try:
            status, body = self.request("/object_info", timeout=30)
        except OSError:
            return False
        return status == 200 and "KSampler" in body and "ConceptSlidersLoad" in body

    def queue(self, prompt: dict):
        """POST /prompt → (HTTP status, JSON answer)."""
        return self.request("/prompt", {"prompt": prompt, "client_id": "concept-sliders-live-tests"})

    def submit(self, prompt: dict) -> str:
        status, body = self.queue(prompt)
        assert status == 200, f"/prompt refused the graph ({status}): {json.dumps(body, indent=1)[:3000]}"
        assert not body.get("node_errors"), body["node_errors"]
        return body["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return self.get(f"/history/{prompt_id}").get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = RUN_TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.history(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                return entry
            assert self.process.poll() is None, f"ComfyUI exited ({self.process.returncode}):\n{self.log_tail()}"
            time.sleep(0.2)
        self.request("/interrupt", {})
        raise AssertionError(f"prompt {prompt_id} did not finish within {timeout:.0f}s\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = RUN_TIMEOUT) -> dict:
        return self.wait(self.submit(prompt), timeout)

    # -- log ---------------------------------------------------------------------------------------
    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]

    # -- lifecycle ---------------------------------------------------------------------------------
    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # ComfyUI's own Ctrl-C path
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)


def messages(entry: dict, kind: str) -> list[dict]:
    return [m[1] for m in entry["status"]["messages"] if m[0] == kind]


def assert_success(entry: dict) -> None:
    errors = messages(entry, "execution_error")
    assert entry["status"]["status_str"] == "success" and not errors, json.dumps(errors, indent=1)[:4000]


def execution_error(entry: dict) -> dict:
    assert entry["status"]["status_str"] == "error", entry["status"]
    errors = messages(entry, "execution_error")
    assert len(errors) == 1, entry["status"]
    return errors[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if _COMFY_DIR is None:
        pytest.skip("COMFYUI_DIR is not set")
    if not (_COMFY_DIR / "main.py").is_file() or not (_COMFY_DIR / "comfy" / "model_patcher.py").is_file():
        pytest.skip(f"COMFYUI_DIR={_COMFY_DIR} is not a ComfyUI checkout (no main.py / comfy/)")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import comfy_support

    try:
        comfy_support.import_comfy()  # ComfyUI's dependencies must import in this interpreter
        import aiohttp  # noqa: F401  (the server itself)
    except (comfy_support.ComfyUnavailable, ImportError) as exc:
        pytest.skip(f"live ComfyUI tier: {exc}")

    ckpt = _cached_checkpoint()
    base = tmp_path_factory.mktemp("comfy_live")
    for sub in ("models/checkpoints", "models/loras/sliders", "output", "input", "user", "temp", "custom_nodes"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "models" / "checkpoints" / CKPT_NAME).symlink_to(ckpt)
    (base / "custom_nodes" / "comfyui-concept-sliders").symlink_to(REPO, target_is_directory=True)
    _write_pairs(base / "input" / PAIRS_FOLDER)
    _write_photo(base / "input" / PHOTO)

    port = _free_port()
    log_path = base / "server.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(_COMFY_DIR / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(base), "--disable-auto-launch", "--disable-api-nodes"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, cwd=str(_COMFY_DIR), env=env, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT)
    srv = ComfyServer(base, port, process, log_path)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited during start-up ({process.returncode}):\n{srv.log_tail()}")
            try:
                status, _ = srv.request("/object_info/KSampler", timeout=5)
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"ComfyUI did not answer /object_info within {START_TIMEOUT:.0f}s:\n{srv.log_tail()}")
            time.sleep(0.5)
        yield srv
    finally:
        srv.stop()


PAIRS_FOLDER = "slider_pairs"  # the folder the pair workflow loads from input/
PHOTO = "photo.png"  # the photo the inversion workflow loads from input/


def _write_photo(path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.random.default_rng(1).integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(path)


def _write_pairs(folder: Path, n: int = 2) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        a = rng.integers(0, 120, (48, 48, 3), dtype=np.uint8)
        for side, image in (("A", a), ("B", a + 120)):
            (folder / side).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / side / f"{i:02d}.png")


def shrink(api: dict, tag: str) -> dict:
    """A workflow made fast: the test checkpoint, 64 px, 3 sampling steps, 2 training iterations."""
    prompt = copy.deepcopy(api)
    for node_id, node in prompt.items():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = CKPT_NAME
        elif kind in ("ConceptSlidersTrainText", "ConceptSlidersTrainPairs"):
            inputs.update(iterations=2, resolution=64, save_every=0, slider_name=f"live_{tag}_{node_id}")
        elif kind == "ConceptSlidersLoadImagePairs":
            inputs.update(folder=PAIRS_FOLDER, resolution=64)
        elif kind == "EmptyLatentImage":
            inputs.update(width=64, height=64, batch_size=1)
        elif kind == "LoadImage":
            inputs["image"] = PHOTO
        elif kind == "ImageScale":
            inputs.update(width=64, height=64)
        elif kind == "ConceptSlidersNullTextInvert":
            inputs["inner_iterations"] = 2
        elif kind == "ConceptSlidersSaveInversion":
            inputs["name"] = f"live_{tag}_{node_id}"
        elif kind == "SaveImage":
            inputs["filename_prefix"] = f"live/{tag}/{node_id}"
        if "steps" in inputs and not gen.is_link(inputs["steps"]):
            inputs["steps"] = 3
        if "start_step" in inputs and not gen.is_link(inputs["start_step"]):
            inputs["start_step"] = min(inputs["start_step"], 1)
    return prompt


def train_prompt(name: str, *, iterations: int = 3, lr: float = 0.05, save_every: int = 0) -> dict:
    """Checkpoint → Train Text Slider → loss plot saved; lr is large so that 3 steps make a visible slider."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT_NAME}},
        "2": {"class_type": "ConceptSlidersTrainText", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "target": "a photo of a person",
            "positive": "a photo of a person, old", "negative": "a photo of a person, young",
            "preservation": "male\nfemale", "action": "enhance", "eta": 2.0, "rank": 4, "alpha": 1.0,
            "layers": "noxattn", "iterations": iterations, "lr": lr, "resolution": 64, "seed": 0,
            "slider_name": name, "save_every": save_every, "resume_from": "none"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 1], "filename_prefix": f"live/loss_{name}"}},
    }


def sampling_nodes(model_ref, prefix: str, first_id: int = 100, steps: int = 3, clip_ref=("1", 1)) -> dict:
    """CLIPTextEncode ×2 + EmptyLatentImage + KSampler(model_ref) + VAEDecode + SaveImage, ids from first_id."""
    i, clip_ref = first_id, list(clip_ref)
    return {
        str(i): {"class_type": "CLIPTextEncode", "inputs": {"clip": clip_ref, "text": "a photo of a person"}},
        str(i + 1): {"class_type": "CLIPTextEncode", "inputs": {"clip": clip_ref, "text": "blurry"}},
        str(i + 2): {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        str(i + 3): {"class_type": "KSampler", "inputs": {
            "model": model_ref, "seed": 0, "steps": steps, "cfg": 7.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": [str(i), 0], "negative": [str(i + 1), 0],
            "latent_image": [str(i + 2), 0], "denoise": 1.0}},
        str(i + 4): {"class_type": "VAEDecode", "inputs": {"samples": [str(i + 3), 0], "vae": ["1", 2]}},
        str(i + 5): {"class_type": "SaveImage", "inputs": {"images": [str(i + 4), 0], "filename_prefix": prefix}},
    }


def saved_images(srv: ComfyServer, entry: dict, node_id: str) -> list[Path]:
    images = entry["outputs"].get(node_id, {}).get("images", [])
    assert images, f"node {node_id} saved no image: {entry['outputs']}"
    paths = []
    for image in images:
        assert image["type"] == "output"
        path = srv.output / image["subfolder"] / image["filename"]
        assert path.is_file() and path.stat().st_size > 0, path
        paths.append(path)
    return paths


def pixels(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def base_slider(server) -> Path:
    """One slider trained by the Train node (in loras/sliders), copied to every slider file the example
    workflows load, so that they run as shipped."""
    entry = server.run(train_prompt("live_base"))
    assert_success(entry)
    saved_images(server, entry, "3")
    path = server.sliders / "live_base.safetensors"
    assert path.is_file(), sorted(p.name for p in server.sliders.iterdir())
    for api in API_WORKFLOWS.values():
        for node in api.values():
            if node["class_type"] == "ConceptSlidersLoad" and not node["inputs"]["slider_name"].startswith(
                    "concept-sliders-pack/"):  # the shapes workflows load sliders shipped with the pack
                target = server.loras / node["inputs"]["slider_name"]
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, target)
    return path


# ---------------------------------------------------------------------------------------------
# a. schemas
# ---------------------------------------------------------------------------------------------

@live
def test_object_info_lists_the_pack_with_tooltips_and_categories(server):
    info = server.get("/object_info")
    missing = [n for n in PACK_NODE_IDS if n not in info]
    assert not missing, f"not registered: {missing}\n{server.log_tail()}"
    for node_id in PACK_NODE_IDS:
        node = info[node_id]
        assert node["category"].split("/")[0] == "sliders", (node_id, node["category"])
        assert node.get("description"), node_id
        for section in ("required", "optional"):
            for name, spec in (node["input"].get(section) or {}).items():
                options = spec[1] if len(spec) > 1 else {}
                assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert len(node.get("output_tooltips") or []) == len(node["output"]), node_id
    # the snapshot the UI workflows are generated from still matches this ComfyUI and this pack
    snapshot = gen.load_snapshot()
    live_schemas = gen.normalise_object_info(info, snapshot)
    if live_schemas != snapshot:
        fresh = server.base / "comfy_object_info.json"
        fresh.write_text(json.dumps(live_schemas, indent=1, ensure_ascii=False, sort_keys=True) + "\n")
        changed = sorted(t for t in snapshot if live_schemas[t] != snapshot[t])
        pytest.fail(f"tests/comfy_object_info.json is stale for {changed}; live version written to {fresh}. "
                    "Refresh it with: python workflows/make_ui_workflows.py --object-info <URL>/object_info")


@live
def test_ui_workflows_are_listed_as_templates(server):
    templates = server.get("/workflow_templates")
    listed = set(templates.get("comfyui-concept-sliders", []))
    assert set(WORKFLOW_NAMES) <= listed, templates


_SHADOW = next((f for f in TEMPLATE_FOLDERS if (REPO / f).is_dir()), None)


@live
@pytest.mark.xfail(_SHADOW is not None and _SHADOW != WORKFLOWS.name, strict=True,
                   reason=f"ComfyUI mounts every template folder of a pack at /api/workflow_templates/<pack>; "
                          f"the first, {_SHADOW}/, shadows {WORKFLOWS.name}/ so the frontend cannot fetch the "
                          "workflows (rename the folder to example_workflows/)")
def test_ui_workflows_are_served_as_templates(server):
    for name in WORKFLOW_NAMES:
        body = server.get(f"/api/workflow_templates/comfyui-concept-sliders/{urllib.parse.quote(name)}.json")
        assert body["version"] == gen.UI_VERSION and body["nodes"], name


# ---------------------------------------------------------------------------------------------
# b. example workflows
# ---------------------------------------------------------------------------------------------

@live
def test_tiny_checkpoint_loads_cleanly(server, base_slider):
    log = server.log_since(0)
    for bad in ("clip missing", "Missing VAE keys", "no CLIP/text encoder weights", "not a checkpoint file"):
        assert bad not in log, f"{bad!r} in the server log:\n{server.log_tail()}"


@live
@pytest.mark.parametrize("name", SD_WORKFLOWS)
def test_example_workflow_runs(server, base_slider, name):
    prompt = shrink(API_WORKFLOWS[name], name)
    started = time.monotonic()
    entry = server.run(prompt)
    assert_success(entry)
    saves = [i for i, n in prompt.items() if n["class_type"] == "SaveImage"]
    assert saves
    images = {i: saved_images(server, entry, i) for i in saves}
    for node_id, paths in images.items():
        upstream = prompt[prompt[node_id]["inputs"]["images"][0]]["class_type"]
        if upstream == "VAEDecode":
            assert pixels(paths[0]).shape == (64, 64, 3), (node_id, pixels(paths[0]).shape)
    for node_id, node in prompt.items():
        if node["class_type"] in ("ConceptSlidersTrainText", "ConceptSlidersTrainPairs"):
            assert (server.sliders / f"{node['inputs']['slider_name']}.safetensors").is_file()
        if node["class_type"] == "ConceptSlidersSweep":
            grid_node = next(i for i in saves if prompt[i]["inputs"]["images"][0] == node_id)
            h, w, _ = pixels(images[grid_node][0]).shape
            n_alphas = len([a for a in node["inputs"]["alphas"].split(",") if a.strip()])
            assert w >= n_alphas * 64 and h >= 64, (w, h)
    if name == SD_COMPOSE:  # chained Apply ×3 and Slider Stack build the same model
        chain = pixels(images["16"][0])
        stack = pixels(images["17"][0])
        assert (chain == stack).all(), f"max |chain - stack| = {abs(chain - stack).max()}"
    if name == SD_DELAYED:  # switching the slider on later must change the picture
        assert (pixels(images["11"][0]) != pixels(images["12"][0])).any()
    print(f"{name}: {time.monotonic() - started:.1f}s")


def shapes_measures(paths: list[Path]) -> dict[str, np.ndarray]:
    """Area fraction and colour name of 32×32 shapes-model images."""
    from sliders_core.shapes.metrics import measure_batch

    measured = measure_batch(np.stack([pixels(p) for p in paths]).astype(np.float32) / 255)
    return {"area": np.array([m.area_fraction for m in measured]), "colour": np.array([m.color for m in measured])}


def sweep_cells(path: Path, columns: int, rows: int, label: int = 16) -> list[list[np.ndarray]]:
    """A Slider Sweep grid → per column (α) the cells of its rows, each scaled back to 32×32."""
    grid = pixels(path)
    cell = (grid.shape[0] - label) // rows
    assert grid.shape[1] == cell * columns, (grid.shape, columns, rows)
    return [[grid[label + r * cell: label + (r + 1) * cell, c * cell:(c + 1) * cell][::cell // 32, ::cell // 32]
             for r in range(rows)] for c in range(columns)]


@live
@pytest.mark.parametrize("name", SHAPES_WORKFLOWS)
def test_shapes_workflow_runs_as_shipped_and_moves_its_concept(server, name, tmp_path):
    """No checkpoint, no change to the shipped settings: the workflow runs, and what it shows is measured."""
    from sliders_core.shapes.metrics import measure_batch

    prompt = copy.deepcopy(API_WORKFLOWS[name])
    tag = "".join(ch if ch.isalnum() else "_" for ch in name)
    for node_id, node in prompt.items():
        if node["class_type"] == "SaveImage":
            node["inputs"]["filename_prefix"] = f"live/{tag}/{node_id}"
        if node["class_type"] == "ConceptSlidersTrainText":
            node["inputs"]["slider_name"] = f"live_{tag}_{node_id}"
    started = time.monotonic()
    entry = server.run(prompt, timeout=600)
    took = time.monotonic() - started
    assert_success(entry)
    saves = {i: saved_images(server, entry, i) for i, n in prompt.items() if n["class_type"] == "SaveImage"}
    by_title = {prompt[i].get("_meta", {}).get("title", i): paths for i, paths in saves.items()}
    if "train" in name:
        sweep_id = next(i for i, n in prompt.items() if n["class_type"] == "ConceptSlidersSweep")
        alphas = [float(a) for a in prompt[sweep_id]["inputs"]["alphas"].split(",")]
        grid_path = next(paths[0] for i, paths in saves.items() if prompt[i]["inputs"]["images"][0] == sweep_id)
        cells = sweep_cells(grid_path, len(alphas), rows=4)
        areas = [float(np.mean([m.area_fraction for m in measure_batch(np.stack(c).astype(np.float32) / 255)]))
                 for c in cells]
        print(f"{name}: mean area per α {dict(zip(alphas, np.round(areas, 3).tolist()))}")
        middle = [a for alpha, a in zip(alphas, areas) if abs(alpha) < 1]  # the overshoot at ±1.5 aside
        assert all(x < y for x, y in zip(middle, middle[1:])), f"area does not grow with α: {areas}"
        assert areas[-1] > 1.5 * areas[alphas.index(0.0)], areas
        report = entry["outputs"][next(i for i, n in prompt.items() if n["class_type"] == "PreviewAny")]
        assert "delivers" in json.dumps(report) and "WARNING" not in json.dumps(report), report
    elif "compose" in name:
        base = shapes_measures(by_title["Base model"])
        both = shapes_measures(by_title["Both sliders, same seeds"])
        print(f"{name}: area {base['area'].mean():.3f} → {both['area'].mean():.3f}, "
              f"colours {base['colour'].tolist()} → {both['colour'].tolist()}")
        assert (base["colour"] == "blue").all(), base["colour"]  # the prompt is "a blue circle"
        assert both["area"].mean() > 1.5 * base["area"].mean()  # the size slider at +1 ...
        assert (both["colour"] == "red").all(), both["colour"]  # ... and the colour slider at +1.5, together
        mixed = pixels(by_title["Slider Mixer, same seeds"][0])  # one Mixer node builds the same model
        chained = pixels(by_title["Both sliders, same seeds"][0])
        assert (mixed == chained).all(), f"max |mixer - chained| = {abs(mixed.astype(int) - chained).max()}"
    elif "delayed" in name:
        delayed = shapes_measures(by_title["Delayed: the base model's layout kept"])
        plain = shapes_measures(by_title["Plain: the slider from the first step"])
        base_prompt = {k: v for k, v in prompt.items() if k in ("1", "3", "4", "5")}
        base_prompt.update({"20": {"class_type": "KSampler", "inputs": {**prompt["8"]["inputs"], "model": ["1", 0]}},
                            "21": {"class_type": "VAEDecode", "inputs": {"samples": ["20", 0], "vae": ["1", 2]}},
                            "22": {"class_type": "SaveImage", "inputs": {"images": ["21", 0],
                                                                         "filename_prefix": f"live/{tag}/base"}}})
        base_entry = server.run(base_prompt)
        assert_success(base_entry)
        base = shapes_measures(saved_images(server, base_entry, "22"))
        print(f"{name}: area base {base['area'].mean():.3f}, delayed {delayed['area'].mean():.3f}, "
              f"plain {plain['area'].mean():.3f}; colours {base['colour'].tolist()}, {delayed['colour'].tolist()}, "
              f"{plain['colour'].tolist()}")
        assert (base["colour"] == "blue").all(), base["colour"]
        assert (delayed["colour"] == "red").all() and (plain["colour"] == "red").all()  # both make the edit
        # the delayed switch-on keeps the base model's sizes better than the slider from step 0
        assert abs(delayed["area"] - base["area"]).mean() < abs(plain["area"] - base["area"]).mean()
    elif "edit" in name:
        picture = shapes_measures(by_title["The picture"])
        edits = shapes_measures(by_title["Both edits"])  # α = −1, then +1
        report = json.dumps(entry["outputs"][next(i for i, n in prompt.items() if n["class_type"] == "PreviewAny")])
        psnr = float(report.split("PSNR ")[1].split(" dB")[0])
        print(f"{name}: reconstruction {psnr:.1f} dB; area {picture['area'][0]:.3f} → {edits['area'].tolist()}, "
              f"colours {picture['colour'].tolist()} → {edits['colour'].tolist()}")
        assert psnr > 30, report
        assert edits["area"][0] < picture["area"][0] < edits["area"][1], (picture["area"], edits["area"])
        assert (edits["colour"] == picture["colour"][0]).all()  # only the size moves
    elif "discover" in name:
        discover_id = next(i for i, n in prompt.items() if n["class_type"] == "ConceptSlidersDiscover")
        k = prompt[discover_id]["inputs"]["k"]
        preview = next(paths[0] for i, paths in saves.items() if prompt[i]["inputs"]["images"][0] == discover_id)
        assert pixels(preview).shape[0] == 16 + k * 64  # one row per discovered slider
        report = json.dumps(entry["outputs"][next(i for i, n in prompt.items() if n["class_type"] == "PreviewAny")])
        assert f"{k} sliders for" in report, report
        sweep_id = next(i for i, n in prompt.items() if n["class_type"] == "ConceptSlidersSweep")
        alphas = [float(a) for a in prompt[sweep_id]["inputs"]["alphas"].split(",")]
        grid_path = next(paths[0] for i, paths in saves.items() if prompt[i]["inputs"]["images"][0] == sweep_id)
        cells = [np.stack(c).astype(np.float32) / 255 for c in sweep_cells(grid_path, len(alphas), rows=4)]
        base = cells[alphas.index(0.0)]
        change = {a: float(np.abs(c - base).mean()) for a, c in zip(alphas, cells)}
        print(f"{name}: mean pixel change per α {change}")
        assert change[1.0] > 0.01 and change[-1.0] > 0.01, change  # both signs move the picture ...
        opposite = float(np.abs(cells[alphas.index(2.0)] - cells[alphas.index(-2.0)]).mean())
        assert opposite > max(change[2.0], change[-2.0]), (opposite, change)  # ... and in opposite directions
        for j in range(k):  # every discovered slider is a normal slider file in sliders/<concept>/
            assert (server.base / "models" / "loras" / "sliders" / "a_shape" / f"a_shape_{j}.safetensors").is_file()
    else:
        pytest.fail(f"no measured check for the shapes workflow {name!r}")
    print(f"{name}: {took:.1f} s wall in the server")


@live
def test_pair_workflow_trains_on_the_folders_captions_when_wired(server, base_slider):
    """Load Image Pairs' captions output linked into Train Pair Slider's prompt (what the README tells
    users to do): each pair trains on its caption, recorded in the file."""
    from safetensors import safe_open

    folder = server.base / "input" / "captioned_pairs"
    _write_pairs(folder, n=2)
    captions = ["a photo of a man", "a photo of a woman"]
    for i, caption in enumerate(captions):
        (folder / "A" / f"{i:02d}.txt").write_text(caption + "\n")
    prompt = shrink(API_WORKFLOWS["SD1.5 - train a slider from image pairs"], "captions")
    loader = next(k for k, n in prompt.items() if n["class_type"] == "ConceptSlidersLoadImagePairs")
    trainer = next(k for k, n in prompt.items() if n["class_type"] == "ConceptSlidersTrainPairs")
    prompt[loader]["inputs"]["folder"] = "captioned_pairs"
    prompt[trainer]["inputs"]["prompt"] = [loader, 3]
    assert_success(server.run(prompt))
    path = server.sliders / f"{prompt[trainer]['inputs']['slider_name']}.safetensors"
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["sliders.captions"]) == captions


@live
def test_delayed_sampler_equals_plain_and_base_at_the_ends(server, base_slider):
    """start_step 0 = the slider applied throughout (Apply Slider + KSampler); start_step = steps = base model."""
    steps = 3
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT_NAME}},
              "2": {"class_type": "ConceptSlidersLoad", "inputs": {"slider_name": "sliders/live_base.safetensors"}},
              "3": {"class_type": "ConceptSlidersApply", "inputs": {"model": ["1", 0], "slider": ["2", 0],
                                                                    "alpha": 2.0}}}
    prompt.update(sampling_nodes(["1", 0], "live/ends_base", first_id=10, steps=steps))
    prompt.update(sampling_nodes(["3", 0], "live/ends_plain", first_id=20, steps=steps))
    for first_id, start in ((30, 0), (40, steps)):
        prompt.update(sampling_nodes(["1", 0], f"live/ends_delayed{start}", first_id=first_id, steps=steps))
        sampler = prompt[str(first_id + 3)]["inputs"]
        prompt[str(first_id + 3)] = {"class_type": "ConceptSlidersDelayedSampler", "inputs": dict(
            sampler, slider=["2", 0], alpha=2.0, start_step=start, alpha_schedule="")}
    for node in prompt.values():
        if node["class_type"] in ("KSampler", "ConceptSlidersDelayedSampler"):
            node["inputs"]["sampler_name"] = "euler_ancestral"  # same seed → same noise in every branch
    entry = server.run(prompt)
    assert_success(entry)
    base, plain, delayed0, delayed_all = (pixels(saved_images(server, entry, i)[0]) for i in ("15", "25", "35", "45"))
    effect = abs(plain - base).max()
    assert effect > 10, f"the slider barely changes the image (max diff {effect})"
    # weight wrappers vs static patches: the same weights up to float rounding
    assert abs(delayed0 - plain).max() <= 2, abs(delayed0 - plain).max()
    assert abs(delayed_all - base).max() <= 2, abs(delayed_all - base).max()


@live
def test_load_slider_rereads_a_file_that_changed(server, base_slider):
    """ComfyUI caches node outputs by their inputs: a slider retrained under the same name must not stay stale."""
    path = server.sliders / "live_retrained.safetensors"
    shutil.copyfile(base_slider, path)
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT_NAME}},
              "2": {"class_type": "ConceptSlidersLoad", "inputs": {"slider_name": "sliders/live_retrained.safetensors"}},
              "3": {"class_type": "ConceptSlidersApply", "inputs": {"model": ["1", 0], "slider": ["2", 0],
                                                                    "alpha": 2.0}}}
    prompt.update(sampling_nodes(["3", 0], "live/retrained", first_id=10))
    first = server.run(prompt)
    assert_success(first)
    before = pixels(saved_images(server, first, "15")[0])
    # "retrain": the same slider negated (up → −up) under the same name
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = {k: (-v if k.endswith("lora_up.weight") else v) for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata=metadata)
    second = server.run(prompt)
    assert_success(second)
    cached = {n for m in messages(second, "execution_cached") for n in m["nodes"]}
    assert "2" not in cached, f"Load Slider served its cached output after the file changed (cached: {sorted(cached)})"
    after = pixels(saved_images(server, second, "15")[0])
    assert (after != before).any()


# ---------------------------------------------------------------------------------------------
# c. a trained slider in the stock LoraLoader
# ---------------------------------------------------------------------------------------------

@live
def test_trained_slider_loads_in_stock_loraloader(server, base_slider):
    lora_name = "sliders/live_base.safetensors"
    listed = server.get("/object_info/LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"][0]
    assert lora_name in listed, listed
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT_NAME}},
              "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora_name,
                                                           "strength_model": 1.0, "strength_clip": 1.0}},
              "3": {"class_type": "ConceptSlidersLoad", "inputs": {"slider_name": lora_name}},
              "4": {"class_type": "ConceptSlidersApply", "inputs": {"model": ["1", 0], "slider": ["3", 0],
                                                                    "alpha": 1.0}}}
    prompt.update(sampling_nodes(["2", 0], "live/lora_stock", first_id=10, clip_ref=("2", 1)))
    prompt.update(sampling_nodes(["4", 0], "live/lora_ours", first_id=20))
    prompt.update(sampling_nodes(["1", 0], "live/lora_base", first_id=30))
    offset = server.log_size()
    entry = server.run(prompt)
    assert_success(entry)
    time.sleep(0.3)  # let the log catch up
    log = server.log_since(offset)
    assert LOG_NOT_LOADED not in log, log
    assert "ERROR lora" not in log, log
    stock, ours, base = (pixels(saved_images(server, entry, i)[0]) for i in ("15", "25", "35"))
    assert (stock == ours).all(), f"LoraLoader vs Apply Slider α=1: max diff {abs(stock - ours).max()}"
    assert (stock != base).any(), "the slider changed nothing"


# ---------------------------------------------------------------------------------------------
# d. bad input: clear errors, the server keeps running
# ---------------------------------------------------------------------------------------------

@live
def test_bad_slider_name_is_refused(server):
    prompt = train_prompt("../evil", iterations=1)
    error = execution_error(server.run(prompt))
    assert error["node_type"] == "ConceptSlidersTrainText"
    assert "../evil" in error["exception_message"] and "plain file name" in error["exception_message"], error
    assert not list(server.base.rglob("evil*")), list(server.base.rglob("evil*"))
    assert server.alive()


@live
def test_start_step_beyond_steps_is_refused(server, base_slider):
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT_NAME}},
              "2": {"class_type": "ConceptSlidersLoad", "inputs": {"slider_name": "sliders/live_base.safetensors"}}}
    prompt.update(sampling_nodes(["1", 0], "live/bad_start", first_id=10))
    prompt["13"] = {"class_type": "ConceptSlidersDelayedSampler", "inputs": {
        "model": ["1", 0], "slider": ["2", 0], "alpha": 1.0, "start_step": 40, "seed": 0, "steps": 3, "cfg": 7.0,
        "sampler_name": "euler", "scheduler": "normal", "positive": ["10", 0], "negative": ["11", 0],
        "latent_image": ["12", 0], "denoise": 1.0, "alpha_schedule": ""}}
    error = execution_error(server.run(prompt))
    assert error["node_type"] == "ConceptSlidersDelayedSampler"
    assert "start_step 40" in error["exception_message"] and "3" in error["exception_message"], error
    assert server.alive()


@live
@pytest.mark.parametrize("alpha,kind", [(50.0, "value_bigger_than_max"), (-25.0, "value_smaller_than_min")])
def test_alpha_outside_the_widget_range_fails_validation(server, base_slider, alpha, kind):
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT_NAME}},
              "2": {"class_type": "ConceptSlidersLoad", "inputs": {"slider_name": "sliders/live_base.safetensors"}},
              "3": {"class_type": "ConceptSlidersApply", "inputs": {"model": ["1", 0], "slider": ["2", 0],
                                                                    "alpha": alpha}}}
    prompt.update(sampling_nodes(["3", 0], "live/bad_alpha", first_id=10))
    status, body = server.queue(prompt)
    assert status == 400, (status, body)
    errors = body["node_errors"]["3"]["errors"]
    assert errors[0]["type"] == kind and errors[0]["extra_info"]["input_name"] == "alpha", errors
    assert "20" in errors[0]["message"], errors  # names the limit
    assert server.alive()


@live
def test_corrupt_slider_file_gives_a_clear_error(server):
    (server.sliders / "corrupt.safetensors").write_bytes(os.urandom(64) + b"not a safetensors file" * 50)
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT_NAME}},
              "2": {"class_type": "ConceptSlidersLoad", "inputs": {"slider_name": "sliders/corrupt.safetensors"}},
              "3": {"class_type": "ConceptSlidersApply", "inputs": {"model": ["1", 0], "slider": ["2", 0],
                                                                    "alpha": 1.0}}}
    prompt.update(sampling_nodes(["3", 0], "live/corrupt", first_id=10))
    error = execution_error(server.run(prompt))
    assert error["node_type"] == "ConceptSlidersLoad"
    message = error["exception_message"]
    assert "corrupt.safetensors" in message and "corrupt" in message.replace("corrupt.safetensors", ""), message
    assert server.alive()


# ---------------------------------------------------------------------------------------------
# e. cancel
# ---------------------------------------------------------------------------------------------

@live
def test_interrupt_stops_training_and_leaves_no_file(server):
    name = "live_cancel"
    target = server.sliders / f"{name}.safetensors"
    prompt_id = server.submit(train_prompt(name, iterations=100000, lr=2e-4, save_every=1))
    deadline = time.monotonic() + 90
    while not target.exists():  # save_every=1: the first checkpoint shows the loop is running
        assert time.monotonic() < deadline, f"training did not start:\n{server.log_tail()}"
        entry = server.history(prompt_id)
        assert entry is None, f"training ended before it was interrupted: {entry and entry['status']}"
        time.sleep(0.1)
    sent = time.monotonic()
    status, _ = server.request("/interrupt", {})
    assert status == 200
    entry = server.wait(prompt_id, timeout=30)
    took = time.monotonic() - sent
    assert messages(entry, "execution_interrupted"), entry["status"]
    assert not messages(entry, "execution_error"), entry["status"]
    assert took < 15, f"the interrupt took {took:.1f}s"
    leftovers = [p.name for p in server.sliders.iterdir() if name in p.name]
    assert not leftovers, leftovers
    assert server.get("/queue") == {"queue_running": [], "queue_pending": []}
    assert server.alive()


@live
def test_interrupt_acts_during_the_frozen_trajectory(server):
    """Cancel before step 1, while the frozen model samples the first trajectory (30 steps × 2 forwards
    at a large size): it acts within about one model call and leaves no file."""
    name = "live_cancel_trajectory"
    target = server.sliders / f"{name}.safetensors"
    prompt = train_prompt(name, iterations=5, lr=2e-4, save_every=1)
    prompt["2"]["inputs"].update(resolution=256, preview_every=0)
    prompt_id = server.submit(prompt)
    deadline = time.monotonic() + 60
    while not server.get("/queue")["queue_running"]:
        assert time.monotonic() < deadline, "the prompt never started"
        time.sleep(0.1)
    time.sleep(4.0)  # the model is loaded and the trajectory is being sampled
    assert not target.exists(), "step 1 finished already: the trajectory phase is too short to test"
    assert server.history(prompt_id) is None
    sent = time.monotonic()
    status, _ = server.request("/interrupt", {})
    assert status == 200
    entry = server.wait(prompt_id, timeout=60)
    took = time.monotonic() - sent
    print(f"cancel during the trajectory phase acted after {took:.2f} s")
    assert messages(entry, "execution_interrupted"), entry["status"]
    assert took < 5, f"the interrupt took {took:.1f}s"
    assert not [p.name for p in server.sliders.iterdir() if name in p.name]
    assert server.alive()


@live
def test_inversion_workflow_alpha_zero_is_the_reconstruction(server, base_slider):
    """Through the running graph: the Inversion Sampler at α = 0 reproduces Null-Text Invert's reconstruction
    pixel for pixel, the file Save Inversion wrote loads back through Load Inversion, and α moves the image."""
    prompt = shrink(API_WORKFLOWS[SD_EDIT], "alpha0")
    prompt["30"] = {"class_type": "ConceptSlidersInversionSampler", "inputs": {
        "model": ["1", 0], "inversion": ["4", 0], "alpha": 0.0, "start_at": 0.5, "slider": ["7", 0]}}
    prompt["31"] = {"class_type": "VAEDecode", "inputs": {"samples": ["30", 0], "vae": ["1", 2]}}
    prompt["32"] = {"class_type": "SaveImage", "inputs": {"images": ["31", 0], "filename_prefix": "live/alpha0"}}
    entry = server.run(prompt)
    assert_success(entry)
    reconstruction = pixels(saved_images(server, entry, "5")[0])
    assert (pixels(saved_images(server, entry, "32")[0]) == reconstruction).all()
    saved = server.output / "inversions" / "live_alpha0_6.safetensors"
    assert saved.is_file()
    reload = {
        "1": prompt["1"], "7": prompt["7"],
        "2": {"class_type": "ConceptSlidersLoadInversion", "inputs": {"name": saved.name}},
        "3": {"class_type": "ConceptSlidersInversionSampler", "inputs": {
            "model": ["1", 0], "inversion": ["2", 0], "alpha": 0.0, "start_at": 0.5, "slider": ["7", 0]}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 2]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "live/reloaded"}},
    }
    entry = server.run(reload)
    assert_success(entry)
    assert (pixels(saved_images(server, entry, "5")[0]) == reconstruction).all()
    entry = server.run(shrink(API_WORKFLOWS[SD_EDIT], "alpha"))
    assert_success(entry)
    assert any((pixels(p) != reconstruction).any() for p in saved_images(server, entry, "23"))


# ---------------------------------------------------------------------------------------------
# f. the web UI (headless Chromium driven by Playwright; Debian's chromium, never a downloaded browser)
# ---------------------------------------------------------------------------------------------
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
# every node's box on the canvas (title bar included), the types the frontend does not know, overlaps
_UI_CHECK = """() => {
  const nodes = window.app.graph._nodes;
  const missing = nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type);
  const boxes = nodes.map(n => { const b = n.getBounding(); return [n.title, b[0], b[1], b[2], b[3]]; });
  const overlaps = [];
  for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
    const a = boxes[i], b = boxes[j];
    const ox = Math.min(a[1] + a[3], b[1] + b[3]) - Math.max(a[1], b[1]);
    const oy = Math.min(a[2] + a[4], b[2] + b[4]) - Math.max(a[2], b[2]);
    if (ox > 4 && oy > 4) overlaps.push(`${a[0]} / ${b[0]}`);
  }
  return {count: nodes.length, missing, overlaps};
}"""


def test_every_template_has_a_thumbnail():
    """The template browser shows `<stem>.jpg` as a template's card picture (a placeholder without it)."""
    for name in WORKFLOW_NAMES:
        thumbnail = WORKFLOWS / f"{name}.jpg"
        assert thumbnail.is_file(), f"{thumbnail.name} is missing: run scripts/ui_screenshots.py"
        assert thumbnail.read_bytes()[:3] == b"\xff\xd8\xff", f"{thumbnail.name} is not a JPEG"


@live
def test_web_ui_opens_every_template_with_no_missing_node_no_overlap_and_no_error(server):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the UI tier needs Playwright (pip install playwright; never `playwright install`)")
    if not CHROMIUM.is_file():
        pytest.skip(f"the UI tier needs Debian's chromium at {CHROMIUM} (apt-get install chromium)")
    base = server.url
    for name in WORKFLOW_NAMES:  # the thumbnails are served beside the templates
        thumbnail = f"{base}/api/workflow_templates/comfyui-concept-sliders/{urllib.parse.quote(name)}.jpg"
        with urllib.request.urlopen(thumbnail, timeout=30) as response:
            assert response.status == 200 and response.read(3) == b"\xff\xd8\xff", name
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            problems: list[str] = []
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("console", lambda m: problems.append(f"console: {m.text} {m.location}") if m.type == "error" else None)
            page.on("response", lambda r: problems.append(f"HTTP {r.status} {r.url}") if r.status >= 400 else None)
            page.goto(base + "/")
            page.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=90000)
            page.wait_for_timeout(1500)
            page.keyboard.press("Escape")  # the first-run templates dialog
            ours = [p for p in problems if "concept" in p.lower() or "slider" in p.lower()]
            assert not ours, f"errors from the pack while the UI starts: {ours}"
            for name in WORKFLOW_NAMES:
                problems.clear()
                url = f"{base}/api/workflow_templates/comfyui-concept-sliders/{urllib.parse.quote(name)}.json"
                page.evaluate("async url => { const r = await fetch(url); "
                              "await window.app.loadGraphData(await r.json()); }", url)
                page.wait_for_timeout(800)
                page.keyboard.press("Escape")
                checked = page.evaluate(_UI_CHECK)
                assert checked["count"] == len(json.loads((WORKFLOWS / f"{name}.json").read_text())["nodes"]), name
                assert not checked["missing"], f"{name}: missing node types {checked['missing']}"
                assert not checked["overlaps"], f"{name}: overlapping nodes {checked['overlaps']}"
                assert not problems, f"{name}: errors while it loads: {problems}"
                if name == "SD1.5 - train a slider from image pairs":  # the captions link the README describes
                    wired = page.evaluate(_WIRE_CAPTIONS)
                    assert wired["linked"] and wired["prompt"] == [str(wired["loader"]), 3], wired
        finally:
            browser.close()


# drop Load Image Pairs' captions output on Train Pair Slider's prompt widget, as a user would
_WIRE_CAPTIONS = """async () => {
    const g = window.app.graph;
    const loader = g._nodes.find(n => n.type === 'ConceptSlidersLoadImagePairs');
    const trainer = g._nodes.find(n => n.type === 'ConceptSlidersTrainPairs');
    const slot = trainer.inputs.findIndex(i => i.name === 'prompt');
    const link = loader.connect(3, trainer, slot);
    const out = (await window.app.graphToPrompt()).output;
    return {linked: !!link, slot, loader: loader.id, prompt: out[String(trainer.id)].inputs.prompt};
}"""
