import os
import re

import pytest
import torch
from conftest import random_slider
from safetensors import safe_open
from safetensors.torch import save_file

from sliders_core import formats
from sliders_core.errors import FamilyMismatchError, SliderError
from sliders_core.formats import (
    UnetNaming,
    diffusers_to_ldm,
    from_state_dict,
    kohya_stem,
    ldm_to_diffusers,
    load_slider,
    read_state_dict,
    safe_output_path,
    save_slider,
)

SD15_UNET = {  # the real SD1.5 layout (config values only, no weights)
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "layers_per_block": 2, "mid_block_type": "UNetMidBlock2DCrossAttn",
}
SDXL_UNET = {
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 2, "mid_block_type": "UNetMidBlock2DCrossAttn",
}


@pytest.mark.parametrize("config, diffusers, ldm", [
    (SD15_UNET, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
     "input_blocks.1.1.transformer_blocks.0.attn1.to_q"),
    (SD15_UNET, "down_blocks.0.attentions.1.proj_in", "input_blocks.2.1.proj_in"),
    (SD15_UNET, "down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    (SD15_UNET, "down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
    (SD15_UNET, "down_blocks.3.resnets.1.conv2", "input_blocks.11.0.out_layers.3"),
    (SD15_UNET, "mid_block.attentions.0.transformer_blocks.0.ff.net.2", "middle_block.1.transformer_blocks.0.ff.net.2"),
    (SD15_UNET, "mid_block.resnets.1.time_emb_proj", "middle_block.2.emb_layers.1"),
    (SD15_UNET, "up_blocks.0.resnets.2.conv1", "output_blocks.2.0.in_layers.2"),
    (SD15_UNET, "up_blocks.0.upsamplers.0.conv", "output_blocks.2.1.conv"),
    (SD15_UNET, "up_blocks.1.attentions.2.proj_out", "output_blocks.5.1.proj_out"),
    (SD15_UNET, "up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
    (SD15_UNET, "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k",
     "output_blocks.11.1.transformer_blocks.0.attn2.to_k"),
    (SDXL_UNET, "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_v",
     "input_blocks.4.1.transformer_blocks.1.attn1.to_v"),
    (SDXL_UNET, "down_blocks.2.attentions.1.proj_in", "input_blocks.8.1.proj_in"),
    (SDXL_UNET, "up_blocks.0.attentions.0.proj_out", "output_blocks.0.1.proj_out"),
    (SDXL_UNET, "up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
    (SDXL_UNET, "up_blocks.2.resnets.0.conv_shortcut", "output_blocks.6.0.skip_connection"),
])
def test_ldm_names_match_known_layouts(config, diffusers, ldm):
    assert diffusers_to_ldm(diffusers, config) == ldm
    assert ldm_to_diffusers(ldm, config) == diffusers


@pytest.mark.parametrize("model", ["sd1", "sdxl"])
def test_every_candidate_module_has_a_unique_reversible_ldm_name(model, request):
    denoiser = request.getfixturevalue(model)
    config = dict(denoiser.unet.config)
    candidates = denoiser.sliders.lora_candidates()
    ldm = {p: diffusers_to_ldm(p, config) for p in candidates}
    assert None not in ldm.values()
    assert len(set(ldm.values())) == len(ldm)
    assert all(ldm_to_diffusers(v, config) == p for p, v in ldm.items())
    # the LDM module exists with the same weight shape under ComfyUI naming rules: resnets renamed
    assert any(".in_layers.2" in v for v in ldm.values()) and any(".emb_layers.1" in v for v in ldm.values())


def _assert_same(a, b):
    assert set(a.modules) == set(b.modules)
    for path in a.modules:
        assert torch.equal(a.modules[path].down, b.modules[path].down.reshape(a.modules[path].down.shape))
        assert torch.equal(a.modules[path].up, b.modules[path].up.reshape(a.modules[path].up.shape))
        assert a.modules[path].alpha == b.modules[path].alpha


def test_saved_file_has_only_kohya_unet_keys_covering_every_module(sd1, tmp_path):
    weights = random_slider(sd1, layers="all", alpha=3.0)
    weights.metadata = {"sliders.base_family": sd1.family, "sliders.prompts": '["x"]'}
    path = save_slider(weights, tmp_path / "s.safetensors")
    with safe_open(str(path), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert all(k.startswith("lora_unet_") for k in keys)
    expected = {f"{kohya_stem(p)}.{part}" for p in weights.modules
                for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert keys == expected
    assert set(weights.modules) == {p for p, kind in sd1.sliders.lora_candidates().items() if kind != "other"}
    assert metadata["sliders.base_family"] == sd1.family
    _assert_same(weights, load_slider(path, sd1.naming, sd1.family))


@pytest.mark.parametrize("model", ["sd1", "sdxl"])
def test_round_trip_is_bit_exact_in_every_format(model, request, tmp_path):
    denoiser = request.getfixturevalue(model)
    weights = random_slider(denoiser, layers="all", rank=3, alpha=1.5)
    config = dict(denoiser.unet.config)
    kohya = formats.to_kohya_state_dict(weights)

    forms = {"kohya_diffusers": kohya}
    forms["kohya_ldm"] = {
        re.sub(r"^lora_unet_\w+?(?=\.)", lambda m: kohya_stem(diffusers_to_ldm(
            denoiser.naming.from_kohya(m.group(0)), config)), k): v for k, v in kohya.items()}
    forms["comfy"] = {}
    forms["peft"] = {}
    forms["diffusers_lora"] = {}
    for path, module in weights.modules.items():
        ldm = diffusers_to_ldm(path, config)
        forms["comfy"].update({f"diffusion_model.{ldm}.lora_down.weight": module.down,
                               f"diffusion_model.{ldm}.lora_up.weight": module.up,
                               f"diffusion_model.{ldm}.alpha": torch.tensor(module.alpha)})
        # peft stores no alpha: it lives in adapter_config; a peft file then loads at alpha = rank
        forms["peft"].update({f"base_model.model.{path}.lora_A.weight": module.down,
                              f"base_model.model.{path}.lora_B.weight": module.up})
        forms["diffusers_lora"].update({f"unet.{path}.lora.down.weight": module.down,
                                        f"unet.{path}.lora.up.weight": module.up})
    for name, state in forms.items():
        file = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(file))
        loaded = load_slider(file, denoiser.naming, denoiser.family)
        if name in ("peft", "diffusers_lora"):
            assert all(m.alpha == m.rank for m in loaded.modules.values())
            for m in loaded.modules.values():
                m.alpha = 1.5
        _assert_same(weights, loaded)
    # the official sliders ship pickled .pt dicts in kohya form: read with weights_only=True
    pt = tmp_path / "official.pt"
    torch.save(kohya, pt)
    _assert_same(weights, load_slider(pt, denoiser.naming, denoiser.family))


def test_loaded_slider_attaches_with_identical_effect(sd1, tmp_path):
    weights = random_slider(sd1, rank=2)
    weights.metadata = {"sliders.base_family": sd1.family}
    path = save_slider(weights, tmp_path / "s.safetensors")
    from sliders_core.inference import attach_slider_file

    name = attach_slider_file(sd1, path)
    x, t, c = torch.randn(1, 4, 16, 16), torch.tensor([500]), sd1.encode(["a photo"])
    with torch.no_grad():
        sd1.sliders.set_scales({"s": 1.3})
        a = sd1.predict(x, t, c)
        sd1.sliders.set_scales({name: 1.3})
        b = sd1.predict(x, t, c)
    assert torch.equal(a, b)


def two_ended(denoiser):
    """Random two-ended slider weights (ranks differ per end), no slider left attached."""
    plus, minus = random_slider(denoiser, "p", rank=2, seed=1), random_slider(denoiser, "m", rank=3, seed=2)
    for name in ("p", "m"):
        denoiser.sliders.remove(name)
    return formats.SliderWeights(plus.modules, {"sliders.base_family": denoiser.family, formats.META_ENDS: "two"},
                                 negative=minus.modules)


def test_two_ended_file_keeps_each_end_and_a_stock_loader_sees_the_positive_one(sd1, tmp_path):
    weights = two_ended(sd1)
    path = save_slider(weights, tmp_path / "two.safetensors")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    negative = {k for k in keys if k.startswith(formats.NEGATIVE_END_PREFIX)}
    assert keys - negative == set(formats.to_kohya_state_dict(formats.SliderWeights(weights.modules)))
    assert {k[len(formats.NEGATIVE_END_PREFIX):] for k in negative} == set(
        formats.to_kohya_state_dict(formats.SliderWeights(weights.negative)))
    loaded = load_slider(path, sd1.naming, sd1.family)
    _assert_same(weights, loaded)
    _assert_same(formats.SliderWeights(weights.negative), formats.SliderWeights(loaded.negative))
    assert formats.describe(loaded)["ends"] == 2 and formats.describe(formats.SliderWeights(weights.modules))["ends"] == 1
    assert loaded.end_at(-0.5) == (loaded.negative, 0.5) and loaded.end_at(0.5) == (loaded.modules, 0.5)


def test_a_two_ended_slider_applies_its_negative_end_at_minus_alpha(sd1):
    weights = two_ended(sd1)
    sd1.sliders.add("two", weights)
    sd1.sliders.add("minus", formats.SliderWeights(weights.negative))
    sd1.sliders.add("plus", formats.SliderWeights(weights.modules))
    x, t, c = torch.randn(1, 4, 16, 16), torch.tensor([500]), sd1.encode(["a photo"])

    @torch.no_grad()
    def out(scales):
        sd1.sliders.set_scales(scales)
        return sd1.predict(x, t, c)

    assert sd1.sliders.names() == ["two", "minus", "plus"]
    assert torch.allclose(out({"two": -0.7}), out({"minus": 0.7}), atol=1e-6)
    assert torch.allclose(out({"two": 0.7}), out({"plus": 0.7}), atol=1e-6)
    assert not torch.allclose(out({"two": -0.7}), out({"plus": -0.7}), atol=1e-4)  # not the positive end negated
    with sd1.sliders.merging():  # folded into the weights, and across a change of sign
        assert torch.allclose(out({"two": -0.7}), out({"minus": 0.7}), atol=1e-5)
        assert torch.allclose(out({"two": 0.7}), out({"plus": 0.7}), atol=1e-5)
    exported = sd1.sliders.export("two")
    _assert_same(formats.SliderWeights(weights.negative), formats.SliderWeights(exported.negative))
    sd1.sliders.remove("two")
    assert sd1.sliders.names() == ["minus", "plus"]
    assert not any("negative_end" in a for a in sd1.unet.peft_config)


def test_pickle_with_code_is_refused(sd1, tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(SliderError, match="more than tensors|corrupt"):
        load_slider(path, sd1.naming)


def test_corrupt_and_truncated_files(sd1, tmp_path):
    weights = random_slider(sd1)
    path = save_slider(weights, tmp_path / "s.safetensors")
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SliderError, match="corrupt or truncated"):
        load_slider(truncated, sd1.naming)
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(SliderError, match="corrupt or truncated"):
        load_slider(garbage, sd1.naming)
    text_file = tmp_path / "x.txt"
    text_file.write_text("x")
    with pytest.raises(SliderError, match="unsupported"):
        read_state_dict(text_file)
    half = {k: v for k, v in formats.to_kohya_state_dict(weights).items() if "lora_up" not in k}
    save_file(half, str(tmp_path / "h.safetensors"))
    with pytest.raises(SliderError, match="lacks its up weight"):
        load_slider(tmp_path / "h.safetensors", sd1.naming)
    save_file({"some.random.key": torch.zeros(1)}, str(tmp_path / "r.safetensors"))
    with pytest.raises(SliderError, match="no known LoRA format"):
        load_slider(tmp_path / "r.safetensors", sd1.naming)


def test_slider_for_another_family_is_refused(sd1, sdxl, tmp_path):
    weights = random_slider(sdxl)
    weights.metadata = {"sliders.base_family": sdxl.family}
    path = save_slider(weights, tmp_path / "xl.safetensors")
    with pytest.raises(FamilyMismatchError, match="base family"):
        load_slider(path, sd1.naming, sd1.family)
    # without metadata, the module names/shapes give it away
    weights.metadata = {}
    bare = save_slider(weights, tmp_path / "bare.safetensors")
    with pytest.raises(SliderError, match="another block layout|does not fit"):
        from sliders_core.inference import attach_slider_file
        attach_slider_file(sd1, bare)


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", "/abs/path", "a\\b", ""])
def test_output_names_cannot_escape_their_folder(tmp_path, name):
    with pytest.raises(SliderError):
        safe_output_path(tmp_path, name)


def test_output_name_inside_folder(tmp_path):
    assert safe_output_path(tmp_path, "age") == (tmp_path / "age.safetensors").resolve()


def test_failed_write_leaves_the_old_file_and_no_temp(sd1, tmp_path, monkeypatch):
    weights = random_slider(sd1)
    path = save_slider(weights, tmp_path / "s.safetensors")
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(formats, "save_file", broken)
    with pytest.raises(OSError):
        save_slider(weights, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]


def test_saved_file_follows_the_umask(sd1, tmp_path):
    old = os.umask(0o022)
    try:
        path = save_slider(random_slider(sd1), tmp_path / "s.safetensors")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_lora_pieces_of_a_fused_layer_become_one_lora_with_exactly_their_delta():
    """Flux/SD3 files in diffusers form give q, k and v apart; the host's layer is one qkv."""
    naming = UnetNaming(["blk.qkv", "blk.proj"], weight_shapes={"blk.qkv": (12, 4), "blk.proj": (4, 4)},
                        aliases={"blk.to_out.0": "blk.proj"},
                        slices={"blk.to_q": ("blk.qkv", 0, 4), "blk.to_k": ("blk.qkv", 4, 4), "blk.to_v": ("blk.qkv", 8, 4)})
    gen = torch.Generator().manual_seed(0)
    a_q, b_q, a_v, b_v = (torch.randn(shape, generator=gen) for shape in ((2, 4), (4, 2), (3, 4), (4, 3)))
    state = {"transformer.blk.to_q.lora_A.weight": a_q, "transformer.blk.to_q.lora_B.weight": b_q,
             "transformer.blk.to_v.lora_A.weight": a_v, "transformer.blk.to_v.lora_B.weight": b_v,
             "transformer.blk.to_out.0.lora_A.weight": a_q, "transformer.blk.to_out.0.lora_B.weight": b_q}
    weights = from_state_dict(state, naming)
    fused = weights.modules["blk.qkv"]
    expected = torch.zeros(12, 4)
    expected[0:4], expected[8:12] = b_q @ a_q, b_v @ a_v  # no k piece: its rows stay unchanged
    assert torch.allclose(fused.up @ fused.down * (fused.alpha / fused.down.shape[0]), expected, atol=1e-6)
    assert torch.equal(weights.modules["blk.proj"].up, b_q)
    with pytest.raises(SliderError, match="both whole and as"):
        from_state_dict({**state, "transformer.blk.qkv.lora_A.weight": torch.zeros(2, 4),
                         "transformer.blk.qkv.lora_B.weight": torch.zeros(12, 2)}, naming)
    with pytest.raises(SliderError, match="lacks its up"):
        from_state_dict({"transformer.blk.to_k.lora_A.weight": a_q}, naming)
