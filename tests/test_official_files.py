"""Slider files written by the official sliders code load here and act exactly as the official LoRA.

The fixtures in tests/fixtures/official were made by scripts/make_official_fixtures.py with the
official code itself (its LoRANetwork and save_weights, bfloat16 .pt files); they hold the official
UNet output at two strengths and the module list of every official training method on each model.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sliders_core.config import OFFICIAL_METHODS, official_method_selects, preset_modules
from sliders_core.denoiser import Cond
from sliders_core.errors import SliderError
from sliders_core.formats import kohya_stem, load_slider

FIXTURES = Path(__file__).parent / "fixtures" / "official"
ROOT = Path(__file__).resolve().parents[1]
CASES = [(m, "c3lier") for m in OFFICIAL_METHODS] + [("full", "lierla")]
MODELS = ("tiny-sd1", "tiny-sdxl", "shapes")


@pytest.fixture(scope="module")
def expected():
    return load_file(FIXTURES / "expected.safetensors")


@pytest.fixture(scope="module")
def module_sets():
    return json.loads((FIXTURES / "module_sets.json").read_text())


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    from sliders_core.backends.diffusers_backend import DiffusersDenoiser, load_diffusers_model
    from sliders_core.tiny import tiny_sd1_pipeline, tiny_sdxl_pipeline

    builders = {"tiny-sd1": lambda: DiffusersDenoiser(tiny_sd1_pipeline(seed=0)),
                "tiny-sdxl": lambda: DiffusersDenoiser(tiny_sdxl_pipeline(seed=0)),
                "shapes": lambda: load_diffusers_model(ROOT / "models" / "shapes-v1")}
    return request.param, builders[request.param]()


def _predict(denoiser, expected, model_name):
    inputs = {k.split("/")[-1]: v for k, v in expected.items() if k.startswith(f"{model_name}/input/")}
    cond = {"context": inputs["context"]}
    if "text_embeds" in inputs:
        cond["text_embeds"] = inputs["text_embeds"]
    with torch.no_grad():
        return denoiser.predict(inputs["x"], inputs["level"], Cond(cond))


def test_presets_select_the_official_module_sets(model, module_sets):
    name, denoiser = model
    candidates = denoiser.sliders.lora_candidates()
    for method, network in CASES:
        official = module_sets[name][f"{method}-{network}"]
        if network == "c3lier":
            ours = preset_modules(candidates, method) if official else []
        else:
            ours = sorted(p for p, kind in candidates.items() if official_method_selects(method, p, kind, network))
        assert sorted(kohya_stem(p) for p in ours) == official, (name, method, network)


def test_official_pt_files_load_and_match_the_official_output(model, expected):
    name, denoiser = model
    base = _predict(denoiser, expected, name)
    tested = 0
    for method, network in CASES:
        case = f"{name}-{method}-{network}"
        path = FIXTURES / f"{case}.pt"
        if not path.exists():  # a method that wraps nothing on this model (checked above)
            continue
        weights = load_slider(path, denoiser.naming, denoiser.family)
        slider = method.replace("-", "_")
        denoiser.sliders.add(slider, weights)
        try:
            for strength in (0.7, -1.3):
                denoiser.sliders.set_scales({slider: strength})
                ours = _predict(denoiser, expected, name)
                official = expected[f"{case}/{strength}"]
                assert (ours - official).abs().max() <= 1e-4 * official.abs().max() + 1e-6, (case, strength)
                assert (ours - base).abs().max() > 1e-3, f"{case}: the slider had no effect at {strength}"
            denoiser.sliders.set_scales({})
            torch.testing.assert_close(_predict(denoiser, expected, name), expected[f"{case}/0"])
        finally:
            denoiser.sliders.remove(slider)
        tested += 1
    assert tested >= 8


def test_sampler_convs_are_trained_by_the_official_default(sd1):
    modules = preset_modules(sd1.sliders.lora_candidates(), "noxattn")
    assert "down_blocks.0.downsamplers.0.conv" in modules and "up_blocks.0.upsamplers.0.conv" in modules
    assert not any(".attn2." in m for m in modules)
    assert not any(m.endswith(("proj_in", "proj_out", "ff.net.2")) for m in modules)  # those are noxattn-ff
    ours = preset_modules(sd1.sliders.lora_candidates(), "noxattn-ff")
    assert any(m.endswith("ff.net.2") for m in ours) and not any("samplers" in m for m in ours)


def test_a_file_for_another_layout_names_the_module(sd1, tmp_path):
    state = torch.load(FIXTURES / "tiny-sd1-full-c3lier.pt", weights_only=True)
    stem = kohya_stem("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    state[stem.replace("down_blocks_0", "down_blocks_7") + ".lora_down.weight"] = state[stem + ".lora_down.weight"]
    state[stem.replace("down_blocks_0", "down_blocks_7") + ".lora_up.weight"] = state[stem + ".lora_up.weight"]
    torch.save(state, tmp_path / "other_layout.pt")
    with pytest.raises(SliderError, match="down_blocks_7.*another block layout"):
        load_slider(tmp_path / "other_layout.pt", sd1.naming, sd1.family)


def test_a_file_for_other_widths_names_the_module_and_both_shapes(sd1, tmp_path):
    state = torch.load(FIXTURES / "tiny-sd1-selfattn-c3lier.pt", weights_only=True)
    stem = kohya_stem("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    state[stem + ".lora_down.weight"] = torch.zeros(2, 48)
    torch.save(state, tmp_path / "other_width.pt")
    with pytest.raises(SliderError, match=r"attn1\.to_q does not fit.*48 → 32.*32 → 32"):
        load_slider(tmp_path / "other_width.pt", sd1.naming, sd1.family)
