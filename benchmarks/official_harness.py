"""Import the official Concept Sliders code (rohitgandikota/sliders) from a checkout the user gives.

Nothing of it is vendored here: `--official DIR` points at a clone, and only model loading and
device/dtype are patched (see `official_loop.py`). Used by the side-by-side benchmark and by
`scripts/make_official_fixtures.py`, which writes the official `.pt` files the tests load.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

TEXT_SLIDERS = Path("trainscripts") / "textsliders"


def import_official(checkout: str | Path, *, trainer: bool = False) -> dict[str, types.ModuleType]:
    """The official modules by name: always `lora`; with `trainer`, also `train_lora`, `train_util`,
    `model_util`, `prompt_util`, `config_util` (these need pydantic; wandb is stubbed when absent,
    as it only logs)."""
    folder = Path(checkout).resolve() / TEXT_SLIDERS
    if not (folder / "lora.py").is_file():
        raise SystemExit(f"{checkout} is not a checkout of the official sliders code: {folder / 'lora.py'} is missing")
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    names = ["lora"]
    if trainer:
        try:
            import pydantic  # noqa: F401
        except ImportError as exc:
            raise SystemExit("the official trainer needs pydantic: pip install pydantic") from exc
        if importlib.util.find_spec("wandb") is None:
            sys.modules["wandb"] = types.SimpleNamespace(init=lambda **_: None, log=lambda *_, **__: None)
        names += ["train_util", "model_util", "prompt_util", "config_util", "train_lora"]
    return {name: importlib.import_module(name) for name in names}


def set_network_type(lora, network: str) -> None:
    """What the official `train()` does to the module list for `network.type` (it extends
    DEFAULT_TARGET_REPLACE in place for "c3lier"), made idempotent so runs can alternate."""
    if network not in ("lierla", "c3lier"):
        raise ValueError(f"network must be lierla or c3lier, got {network!r}")
    targets = lora.UNET_TARGET_REPLACE_MODULE_TRANSFORMER[:1]  # ["Attention"]; the same list object as the default
    if network == "c3lier":
        targets += lora.UNET_TARGET_REPLACE_MODULE_CONV
    lora.DEFAULT_TARGET_REPLACE[:] = targets
