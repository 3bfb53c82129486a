"""ComfyUI tier: the core's flow backend and ComfyUI compute the same Flux and SD3, sliders included.

The tiny diffusers Flux and SD3 transformers (sliders_core.tiny) are converted into ComfyUI models by
ComfyUI's own diffusers converter (`comfy.model_detection.convert_diffusers_mmdit`). Then:
* both compute the same prediction (ComfyUI's denoised x0 = x − σ·v of our velocity);
* a slider the core trains on diffusers names loads in the stock LoraLoader with no unloaded key
  and gives the core's output at equal strength;
* the official Flux sliders' `.pt` file (keys `lora_unet_transformer_blocks_…`, which the stock
  loader does not load) gives, through Apply Slider, the official LoRA's output.

Needs COMFYUI_DIR; skipped otherwise.
"""

from __future__ import annotations

from pathlib import Path

import comfy_support
import pytest

if comfy_support.comfyui_dir() is None:
    pytest.skip("COMFYUI_DIR not set: the ComfyUI tier needs a ComfyUI checkout (see README)", allow_module_level=True)

C = comfy_support.import_comfy()
comfy_support.load_pack()

import torch  # noqa: E402
from concept_sliders_pack.nodes.common import SliderFile  # noqa: E402
from concept_sliders_pack.sliders_core.backends.flow_backend import FlowDenoiser  # noqa: E402
from concept_sliders_pack.sliders_core.config import preset_modules  # noqa: E402
from concept_sliders_pack.sliders_core.denoiser import Cond  # noqa: E402
from concept_sliders_pack.sliders_core.formats import read_state_dict, save_slider  # noqa: E402
from concept_sliders_pack.sliders_core.tiny import tiny_flux_pipeline, tiny_sd3_pipeline  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "official"
FLUX_COMFY = {"image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16, "vec_in_dim": 32,
              "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2,
              "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True}
SD3_COMFY = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "adm_in_channels": 64,
             "pos_embed_max_size": 32, "num_patches": 1024, "pos_embed_scaling_factor": None, "input_size": None,
             "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 64, "out_features": 128}}}


def comfy_twin(core: FlowDenoiser):
    """A ComfyUI ModelPatcher holding exactly the core model's transformer weights."""
    import comfy.model_detection

    state = {k: v.detach().clone() for k, v in core.transformer.state_dict().items()}
    converted = comfy.model_detection.convert_diffusers_mmdit(state, "")
    name, config = ("Flux", FLUX_COMFY) if core.is_flux else ("SD3", SD3_COMFY)
    model_config = getattr(C["supported_models"], name)({**config, "dtype": torch.float32})
    model = model_config.get_model({})
    missing, unexpected = model.diffusion_model.load_state_dict(converted, strict=False)
    assert not unexpected and not [k for k in missing if k != "pos_embed"], (missing, unexpected)
    if "pos_embed" in missing:  # a fixed sin-cos table diffusers computes; ComfyUI reads it from checkpoints
        model.diffusion_model.pos_embed.copy_(core.transformer.pos_embed.pos_embed)
    model.eval()
    mm = C["model_management"]
    return C["model_patcher"].ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def comfy_x0(patcher, x, level, cond: Cond, flux: bool):
    """ComfyUI's denoised prediction at the core's level (σ·1000)."""
    C["model_management"].load_models_gpu([patcher])
    sigma = level / 1000
    kwargs = {"guidance": torch.tensor([3.5])} if flux else {}
    with torch.no_grad():
        return patcher.model.apply_model(x, sigma, c_crossattn=cond.tensors["context"], y=cond.tensors["pooled"], **kwargs)


@pytest.fixture(scope="module", params=["flux", "sd3"])
def twins(request):
    core = FlowDenoiser(tiny_flux_pipeline(seed=0) if request.param == "flux" else tiny_sd3_pipeline(seed=0))
    return core, comfy_twin(core)


def _inputs(core, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 16, 16, generator=gen)
    return x, torch.tensor([600.0]), core.encode(["a red circle"])


def core_x0(core, slider, strength, x, level, cond):
    """The core's denoised prediction with one slider at `strength`; every slider is off afterwards."""
    core.sliders.set_scales({slider: strength})
    try:
        with torch.no_grad():
            return x - level / 1000 * core.predict(x, level, cond)
    finally:
        core.sliders.set_scales({})


def _close(a, b, tol=1e-4):
    return float((a - b).abs().max() / b.abs().max()) < tol


def test_core_flow_model_and_its_comfyui_twin_predict_the_same(twins):
    core, patcher = twins
    x, level, cond = _inputs(core)
    with torch.no_grad():
        ours = x - level / 1000 * core.predict(x, level, cond)
    assert _close(comfy_x0(patcher, x, level, cond, core.is_flux), ours)


@pytest.mark.parametrize("strength", [1.0, -0.6])
def test_core_slider_loads_in_the_stock_loader_with_equal_output(twins, tmp_path, strength):
    core, patcher = twins
    modules = preset_modules(core.sliders.lora_candidates(), "dit-all")
    core.sliders.add("s", modules=modules, rank=2, alpha=1.0)
    gen = torch.Generator().manual_seed(1)
    try:
        with torch.no_grad():
            for p in core.sliders.parameters("s"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        path = save_slider(core.sliders.export("s"), tmp_path / "s.safetensors")
        x, level, cond = _inputs(core, seed=2)
        ours = core_x0(core, "s", strength, x, level, cond)
    finally:
        core.sliders.remove("s")
    state, _ = read_state_dict(path)
    stock, unloaded = comfy_support.load_lora_into(patcher, state, strength)
    assert unloaded == [] and len(stock.patches) > 0
    theirs, base = comfy_x0(stock, x, level, cond, core.is_flux), comfy_x0(patcher, x, level, cond, core.is_flux)
    assert not _close(theirs, base, 1e-3), "the slider should change the prediction"
    assert _close(theirs, ours)


def test_official_flux_pt_through_apply_slider_gives_the_official_output():
    core = FlowDenoiser(tiny_flux_pipeline(seed=0))
    patcher = comfy_twin(core)
    expected = load_file(FIXTURES / "flux-expected.safetensors")
    inputs = {k.split("/")[-1]: v for k, v in expected.items() if k.startswith("input/")}
    cond = Cond({"context": inputs["context"], "pooled": inputs["pooled"]})
    x, level = inputs["x"], inputs["level"]
    state, metadata = read_state_dict(FIXTURES / "tiny-flux-full.pt")
    stock, unloaded = comfy_support.load_lora_into(patcher, state, 1.0)
    assert len(unloaded) == len(state)  # the stock loader: "lora key not loaded" for every key
    slider = SliderFile(state, metadata, "tiny-flux-full")
    assert len(slider.resolve(patcher).modules) == 2 * 4 + 2  # q/k/v fused: qkv, proj per stream; linear1 per single block
    from concept_sliders_pack.nodes.apply_nodes import apply_slider

    for strength in (0.7, -1.3):
        with torch.inference_mode():
            applied = apply_slider(patcher, slider, strength)
        official = x - level / 1000 * expected[f"tiny-flux-full/{strength}"]
        assert _close(comfy_x0(applied, x, level, cond, True), official)
    assert _close(comfy_x0(patcher, x, level, cond, True), x - level / 1000 * expected["tiny-flux-full/0"])


@pytest.mark.parametrize("strength", [1.0, -0.6])
def test_a_slider_on_the_hosts_names_loads_in_the_core_with_the_hosts_output(twins, strength):
    """The other direction: a file on ComfyUI's module names (`lora_unet_double_blocks_…` /
    `lora_unet_joint_blocks_…`, as a slider trained in ComfyUI is saved) gives in the core the output
    the stock loader gives in ComfyUI. The host's fused q/k/v are split into diffusers' three layers."""
    from concept_sliders_pack.nodes.comfy_backend import module_names
    from concept_sliders_pack.sliders_core.config import classify_dit_module
    from concept_sliders_pack.sliders_core.formats import from_state_dict, kohya_stem

    core, patcher = twins
    host = module_names(patcher)
    selected = sorted(p for p in host if classify_dit_module(p) in ("joint_attn", "single_block", "dit_mlp"))
    gen = torch.Generator().manual_seed(4)
    state = {}
    for path in selected:
        out_features, in_features = patcher.model.diffusion_model.get_submodule(path).weight.shape
        state[f"{kohya_stem(path)}.lora_down.weight"] = torch.randn(2, in_features, generator=gen) * 0.1
        state[f"{kohya_stem(path)}.lora_up.weight"] = torch.randn(out_features, 2, generator=gen) * 0.1
        state[f"{kohya_stem(path)}.alpha"] = torch.tensor(1.0)
    stock, unloaded = comfy_support.load_lora_into(patcher, state, strength)
    assert unloaded == []
    x, level, cond = _inputs(core, seed=6)
    theirs = comfy_x0(stock, x, level, cond, core.is_flux)
    weights = from_state_dict(state, core.naming, source="host-named")
    core.sliders.add("host", weights)
    try:
        ours = core_x0(core, "host", strength, x, level, cond)
    finally:
        core.sliders.remove("host")
    assert not _close(theirs, comfy_x0(patcher, x, level, cond, core.is_flux), 1e-3)
    assert _close(ours, theirs)
