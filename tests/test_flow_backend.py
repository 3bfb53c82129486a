"""The diffusers backend on flow transformers: tiny Flux (dev, schnell) and SD3 pipelines built from configs."""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sliders_core.backends.diffusers_backend import load_diffusers_model
from sliders_core.backends.flow_backend import FlowDenoiser
from sliders_core.config import TrainConfig, preset_modules
from sliders_core.denoiser import Cond
from sliders_core.errors import SliderError
from sliders_core.formats import load_slider, save_slider
from sliders_core.prompts import PromptPair
from sliders_core.text_slider import train_text_slider
from sliders_core.tiny import save_tiny_model, tiny_flux_pipeline, tiny_sd3_pipeline

FIXTURES = Path(__file__).parent / "fixtures" / "official"
PAIR = PromptPair(target="a circle", positive="a large circle", negative="a small circle", eta=2.0)


@pytest.fixture(scope="module", params=["flux", "sd3"])
def flow(request):
    pipe = tiny_flux_pipeline(seed=0) if request.param == "flux" else tiny_sd3_pipeline(seed=0)
    return FlowDenoiser(pipe)


def _cond(denoiser, prompt="a red circle"):
    return denoiser.encode([prompt])


def test_flow_states_and_targets_are_the_rectified_flow(flow):
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 16, 16, 16, generator=gen)
    noise = torch.randn(2, 16, 16, 16, generator=gen)
    level = flow.random_levels(2, gen)
    assert level.min() > 0 and level.max() <= 1000
    x_t = flow.add_noise(x0, noise, level)
    sigma = (level / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, (1 - sigma) * x0 + sigma * noise)
    # a perfect velocity carries x_t to x0 in one Euler step to level 0, and to pure noise at level 1000
    target = flow.training_target(x0, noise, level)
    torch.testing.assert_close(flow.ddim_step(x_t, target, level, torch.zeros(2)), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flow.ddim_step(x_t, target, level, torch.full((2,), 1000.0)), noise, atol=1e-5, rtol=1e-5)


def test_sampling_follows_the_pipelines_schedule(flow):
    noise = flow.initial_noise(1, flow.default_resolution, torch.Generator().manual_seed(0))
    assert noise.shape == (1, 16, 16, 16)
    trajectory = flow.sample(_cond(flow), _cond(flow, ""), guidance=3.0, steps=4, noise=noise, record=True)
    levels = torch.stack([lv[0] for lv in trajectory.levels])
    assert len(levels) == 4 and levels[0] == 1000 and bool((levels[1:] < levels[:-1]).all())
    torch.testing.assert_close(flow.ddim_levels(4)[:-1], levels.cpu())  # inversion walks the same levels
    assert torch.isfinite(trajectory.final).all() and not torch.equal(trajectory.final, noise)
    with pytest.raises(SliderError, match="multiple of"):
        flow.initial_noise(1, 34, torch.Generator())


def test_flux_runs_without_cfg_and_dev_takes_its_guidance_input():
    dev = FlowDenoiser(tiny_flux_pipeline(seed=0))
    noise = dev.initial_noise(1, 32, torch.Generator().manual_seed(0))
    cond, uncond = _cond(dev), _cond(dev, "a blue square")
    a = dev.sample(cond, uncond, guidance=1.0, steps=3, noise=noise).final
    b = dev.sample(cond, uncond, guidance=7.0, steps=3, noise=noise).final
    torch.testing.assert_close(a, b)  # the unconditional never enters: guidance is distilled
    x, level = noise, torch.tensor([600.0])
    with_input = dev.predict(x, level, cond)
    dev.guidance_input = 1.0
    assert (dev.predict(x, level, cond) - with_input).abs().max() > 1e-4
    schnell = FlowDenoiser(tiny_flux_pipeline(seed=0, guidance_embeds=False))
    assert schnell.guidance_input is None and schnell.family.startswith("flux-schnell")


def test_sd3_samples_with_cfg():
    sd3 = FlowDenoiser(tiny_sd3_pipeline(seed=0))
    noise = sd3.initial_noise(1, 32, torch.Generator().manual_seed(0))
    cond, uncond = _cond(sd3), _cond(sd3, "")
    a = sd3.sample(cond, uncond, guidance=1.0, steps=3, noise=noise).final
    b = sd3.sample(cond, uncond, guidance=5.0, steps=3, noise=noise).final
    assert (a - b).abs().max() > 1e-4


def test_dit_presets_on_diffusers_names(flow):
    candidates = flow.sliders.lora_candidates()
    attn = preset_modules(candidates, "dit-attn")
    assert attn and all(".attn" in m and m.startswith("transformer_blocks.") for m in attn)
    assert {m.rsplit(".", 1)[-1] for m in attn} >= {"to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"}
    assert not any(".ff." in m or "norm" in m for m in attn)
    everything = preset_modules(candidates, "dit-all")
    assert any(".ff.net." in m for m in everything) and set(attn) < set(everything)
    if flow.is_flux:
        single = set(preset_modules(candidates, "dit-attn-single")) - set(attn)
        assert single and all(m.startswith("single_transformer_blocks.") for m in single)
    with pytest.raises(SliderError, match="UNet preset.*dit-attn"):
        preset_modules(candidates, "noxattn")


def test_text_slider_trains_saves_in_the_diffusers_form_and_reloads(flow, tmp_path):
    config = TrainConfig(iterations=30, lr=2e-3, layers="dit-attn", resolution=32, seed=0)
    result = train_text_slider(flow, [PAIR], config, name="size")
    losses = result.losses
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8, "the loss did not fall"
    path = save_slider(flow.sliders.export("size"), tmp_path / "size.safetensors")
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    x, level, cond = flow.initial_noise(1, 32, torch.Generator().manual_seed(3)), torch.tensor([700.0]), _cond(flow)
    flow.sliders.set_scales({"size": 1.5})
    trained = flow.predict(x, level, cond)
    flow.sliders.set_scales({})
    base = flow.predict(x, level, cond)
    assert (trained - base).abs().max() > 1e-4
    flow.sliders.add("reloaded", load_slider(path, flow.naming, flow.family))
    try:
        flow.sliders.set_scales({"reloaded": 1.5})
        torch.testing.assert_close(flow.predict(x, level, cond), trained, atol=1e-5, rtol=1e-4)
    finally:
        flow.sliders.set_scales({})
        flow.sliders.remove("reloaded")
        flow.sliders.remove("size")


def test_a_flux_slider_is_refused_on_sd3(tmp_path):
    flux, sd3 = FlowDenoiser(tiny_flux_pipeline(seed=0)), FlowDenoiser(tiny_sd3_pipeline(seed=0))
    flux.sliders.add("s", modules=preset_modules(flux.sliders.lora_candidates(), "dit-attn"), rank=2)
    weights = flux.sliders.export("s")
    weights.metadata["sliders.base_family"] = flux.family
    path = save_slider(weights, tmp_path / "flux_slider.safetensors")
    with pytest.raises(SliderError, match="base family"):
        load_slider(path, sd3.naming, sd3.family)


def test_official_flux_pt_loads_and_matches_the_official_output():
    """tiny-flux-full.pt: the official Flux sliders' LoRANetwork on this very transformer (its
    `lora_unet_transformer_blocks_…` keys, which ComfyUI's stock loader reports as not loaded)."""
    flux = FlowDenoiser(tiny_flux_pipeline(seed=0))
    expected = load_file(FIXTURES / "flux-expected.safetensors")
    inputs = {k.split("/")[-1]: v for k, v in expected.items() if k.startswith("input/")}
    cond = Cond({"context": inputs["context"], "pooled": inputs["pooled"]})
    weights = load_slider(FIXTURES / "tiny-flux-full.pt", flux.naming, flux.family)
    assert len(weights.modules) == 22
    flux.sliders.add("official", weights)
    with torch.no_grad():
        for strength in (0.7, -1.3):
            flux.sliders.set_scales({"official": strength})
            ours, official = flux.predict(inputs["x"], inputs["level"], cond), expected[f"tiny-flux-full/{strength}"]
            assert (ours - official).abs().max() <= 1e-4 * official.abs().max() + 1e-6, strength
            assert (official - expected["tiny-flux-full/0"]).abs().max() > 1e-3
        flux.sliders.set_scales({})
        torch.testing.assert_close(flux.predict(inputs["x"], inputs["level"], cond), expected["tiny-flux-full/0"])


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_files_on_the_original_names_load_with_the_fused_layers_split(family):
    """A kohya file on the original (BFL / MMDiT) names that ComfyUI trains under, e.g.
    `lora_unet_double_blocks_0_img_attn_qkv`: the fused q/k/v become diffusers' three layers, each with
    the same down and its rows of the up, so the ΔW is exactly the file's; whole layers map one to one."""
    from sliders_core.formats import from_state_dict

    denoiser = FlowDenoiser(tiny_flux_pipeline(seed=0) if family == "flux" else tiny_sd3_pipeline(seed=0))
    width = 64 if family == "flux" else 128
    fused, whole = ("double_blocks_0_img_attn_qkv", "double_blocks_1_txt_attn_proj") if family == "flux" else \
        ("joint_blocks_0_context_block_attn_qkv", "joint_blocks_1_x_block_mlp_fc2")
    gen = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, width, generator=gen), torch.randn(3 * width, 2, generator=gen)
    whole_in = width if family == "flux" else 4 * width  # Flux's txt_attn.proj, SD3's mlp.fc2
    state = {f"lora_unet_{fused}.lora_down.weight": down, f"lora_unet_{fused}.lora_up.weight": up,
             f"lora_unet_{fused}.alpha": torch.tensor(1.0),
             f"lora_unet_{whole}.lora_down.weight": torch.randn(2, whole_in, generator=gen),
             f"lora_unet_{whole}.lora_up.weight": torch.randn(width, 2, generator=gen)}
    weights = from_state_dict(state, denoiser.naming, source="original-names")
    pieces = ["attn.to_q", "attn.to_k", "attn.to_v"] if family == "flux" else \
        ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]
    target = "transformer_blocks.1.attn.to_add_out" if family == "flux" else "transformer_blocks.1.ff.net.2"
    assert set(weights.modules) == {f"transformer_blocks.0.{p}" for p in pieces} | {target}
    delta = torch.cat([weights.modules[f"transformer_blocks.0.{p}"].delta_weight() for p in pieces])
    torch.testing.assert_close(delta, (up @ down) * 0.5)


def test_flow_model_folders_load_offline(tmp_path):
    for kind in ("flux", "sd3"):
        folder = save_tiny_model(kind, tmp_path / kind)
        denoiser = load_diffusers_model(folder)
        assert isinstance(denoiser, FlowDenoiser) and denoiser.is_flux == (kind == "flux")
        reference = FlowDenoiser(tiny_flux_pipeline(seed=0) if kind == "flux" else tiny_sd3_pipeline(seed=0))
        assert denoiser.model_signature() == pytest.approx(reference.model_signature())


def test_pair_slider_trains_both_signs_on_flow_models(flow, tmp_path):
    from sliders_core.config import PairTrainConfig
    from sliders_core.image_pairs import pairs_from_batches
    from sliders_core.pair_slider import train_pair_slider

    gen = torch.Generator().manual_seed(0)
    a = torch.rand(3, 32, 32, 3, generator=gen) * 0.3
    pairs = pairs_from_batches(a, (a + 0.5).clamp(0, 1), 32)
    config = PairTrainConfig(iterations=40, rank=2, lr=3e-3, layers="dit-attn", seed=0)
    result = train_pair_slider(flow, pairs, config, progress=False)
    assert np.mean(result.losses[-10:]) < np.mean(result.losses[:10])
    # at +1 the LoRA moves the velocity toward B's training target, at −1 toward A's
    x_a, x_b = flow.encode_images(pairs.a[:1]), flow.encode_images(pairs.b[:1])
    noise, level, cond = torch.randn(x_a.shape, generator=gen), torch.tensor([500.0]), flow.encode([""])
    name = flow.sliders.names()[-1]
    errors = {}
    for sign, x0 in ((1.0, x_b), (-1.0, x_a)):
        x_t, target = flow.add_noise(x0, noise, level), flow.training_target(x0, noise, level)
        with torch.no_grad():
            flow.sliders.set_scales({name: sign})
            on = (flow.predict(x_t, level, cond) - target).pow(2).mean()
            flow.sliders.set_scales({})
            off = (flow.predict(x_t, level, cond) - target).pow(2).mean()
        errors[sign] = (float(on), float(off))
    flow.sliders.remove(name)
    assert all(on < off for on, off in errors.values()), errors
    assert result.weights.metadata["sliders.kind"] == "pairs"


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_sliderspace_discovers_on_a_flow_model(tmp_path, family):
    from sliders_core.shapes.encoder import load_shapes_encoder
    from sliders_core.sliderspace import (
        SliderSpaceConfig,
        generate_concept_images,
        principal_directions,
        train_sliderspace,
    )

    flux = FlowDenoiser(tiny_flux_pipeline(seed=0) if family == "flux" else tiny_sd3_pipeline(seed=0))
    encoder = load_shapes_encoder()
    found = generate_concept_images(flux, "a circle", 6, seed=0, batch=3, steps=3)
    directions, explained = principal_directions(encoder.embed(found.images.float()), 2)
    results = train_sliderspace(flux, encoder, found, directions, explained, "a circle",
                                SliderSpaceConfig(iterations=4, lr=5e-3, layers="dit-attn"),
                                checkpoint_dir=tmp_path, progress=False)
    assert len(results) == 2 and all(np.isfinite(r.losses).all() for r in results)
    weights = load_slider(tmp_path / "direction_0.safetensors", flux.naming, flux.family)
    assert weights.metadata["sliders.kind"] == "sliderspace"
    assert sorted(weights.modules) == preset_modules(flux.sliders.lora_candidates(), "dit-attn")


def test_a_file_nothing_can_read_is_refused_with_the_keys():
    flux = FlowDenoiser(tiny_flux_pipeline(seed=0))
    state = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 64),
             "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(100, 2),  # 100 rows: no fit
             "something_else.lora_down.weight": torch.zeros(2, 64)}
    from sliders_core.formats import from_state_dict

    with pytest.raises(SliderError, match="something_else"):
        from_state_dict(state, flux.naming, source="odd")
