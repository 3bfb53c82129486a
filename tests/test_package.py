import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_pack_root_imports_without_comfyui():
    spec = importlib.util.spec_from_file_location(
        "concept_sliders_pack", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        assert isinstance(module.NODE_CLASS_MAPPINGS, dict)
        assert isinstance(module.NODE_DISPLAY_NAME_MAPPINGS, dict)
    finally:
        sys.modules.pop(spec.name, None)


def test_core_never_imports_comfyui():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "sliders_core").rglob("*.py")
                 if re.search(r"^\s*(import comfy|from comfy)", p.read_text(), re.M)]
    assert offenders == []


def test_requirements_mirror_pyproject_and_never_pin_torch():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines == project["dependencies"]
    torch_req = next(req for req in lines if req.startswith("torch"))
    assert "==" not in torch_req and "<" not in torch_req
