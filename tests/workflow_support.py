"""The example workflows' generator (workflows/make_ui_workflows.py), imported by path for the tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "example_workflows" if (REPO / "example_workflows").is_dir() else REPO / "workflows"


def load_generator():
    spec = importlib.util.spec_from_file_location("make_ui_workflows", WORKFLOWS / "make_ui_workflows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
