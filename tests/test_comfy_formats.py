"""ComfyUI tier: our slider files, LDM names and diffusers backend against ComfyUI's own code.

A tiny SD1.5- and SDXL-shaped ComfyUI model (tests/comfy_support.py) is mirrored into a diffusers
``UNet2DConditionModel`` with the same architecture and weights (copied through ComfyUI's own
``comfy.utils.unet_to_diffusers``), so both compute one function.  Then:

* a slider on every LoRA candidate of the diffusers UNet, saved by ``save_slider``, loads through
  ComfyUI's stock LoRA path with no unloaded key and patches exactly ``W + strength·ΔW``;
* ComfyUI at strength α and our peft host at scale α predict the same noise;
* our reader accepts the key forms ComfyUI users hold (``diffusion_model.<LDM>`` and kohya-LDM).

Needs COMFYUI_DIR (a ComfyUI checkout importable by this interpreter); skipped otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import comfy_support
import pytest

if comfy_support.comfyui_dir() is None:
    pytest.skip("COMFYUI_DIR not set: the ComfyUI tier needs a ComfyUI checkout (see README)", allow_module_level=True)

import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from sliders_core.backends.peft_sliders import PeftSliderHost  # noqa: E402
from sliders_core.formats import (  # noqa: E402
    UnetNaming,
    diffusers_to_ldm,
    from_state_dict,
    kohya_stem,
    ldm_to_diffusers,
    save_slider,
)
from sliders_core.slider_weights import SliderWeights  # noqa: E402

SLIDER = "s"
LATENT = 16  # latent side; image side = 8 * LATENT
TOKENS = 12
REL_TOL = 1e-4


# ---------------------------------------------------------------------------------------------
# A diffusers twin of a ComfyUI UNet
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Twin:
    family: str
    patcher: Any  # ComfyUI ModelPatcher (base, no LoRA)
    unet_config: dict  # ComfyUI's unet_config
    comfy_names: dict  # ComfyUI's unet_to_diffusers: diffusers param -> LDM param
    base_state: dict  # LDM param -> unpatched tensor (copy)
    diffusers_param_names: list
    unet: UNet2DConditionModel
    host: PeftSliderHost
    naming: UnetNaming


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def twin(request) -> Twin:
    make = {"sd15": comfy_support.tiny_sd15_patcher, "sdxl": comfy_support.tiny_sdxl_patcher}[request.param]
    patcher = make(seed=0)
    uc = dict(patcher.model.model_config.unet_config)
    comfy_names = comfy_support.unet_diffusers_to_ldm_names(uc)
    ldm_state = {k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**comfy_support.diffusers_config_for(uc, LATENT)).eval()
    ours = unet.state_dict()
    unmapped = sorted(k for k in ours if k not in comfy_names or comfy_names[k] not in ldm_state)
    assert not unmapped, f"diffusers params without a ComfyUI counterpart: {unmapped[:5]}"
    copied = {}
    for name, value in ours.items():
        src = ldm_state[comfy_names[name]]
        assert src.shape == value.shape, (name, comfy_names[name], tuple(src.shape), tuple(value.shape))
        copied[name] = src
    unet.load_state_dict(copied, strict=True)
    used = {comfy_names[k] for k in ours}
    assert used == set(ldm_state), f"ComfyUI params not mirrored: {sorted(set(ldm_state) - used)[:5]}"

    host = PeftSliderHost(unet)
    naming = UnetNaming(host.lora_candidates(), dict(unet.config))
    return Twin(request.param, patcher, uc, comfy_names, ldm_state, sorted(ours), unet, host, naming)


@pytest.fixture(scope="module")
def slider(twin, tmp_path_factory):
    """A random non-zero rank-2 slider on every candidate module ("all" layers), saved and re-read.

    Returns (weights exported from the host, tensors of the saved file).
    """
    host = twin.host
    host.add(SLIDER, modules=sorted(host.lora_candidates()), rank=2, alpha=1.0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in host.parameters(SLIDER):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    host.set_scales({})
    weights = host.export(SLIDER)
    assert set(weights.modules) == set(host.lora_candidates())
    path = save_slider(weights, tmp_path_factory.mktemp(twin.family) / "all.safetensors")
    return weights, load_file(str(path))


# ---------------------------------------------------------------------------------------------
# Forward passes, like with like
# ---------------------------------------------------------------------------------------------
def _inputs(twin: Twin, seed: int = 0, batch: int = 2):
    gen = torch.Generator().manual_seed(seed)
    ctx_dim = twin.unet_config["context_dim"]
    x = torch.randn(batch, 4, LATENT, LATENT, generator=gen) * 1.5  # noisy latent, k-diffusion scale
    ctx = torch.randn(batch, TOKENS, ctx_dim, generator=gen)
    pooled = torch.randn(batch, 1280, generator=gen) if twin.unet_config.get("adm_in_channels") else None
    return x, ctx, pooled


def comfy_eps(twin: Twin, patcher, x, sigma, ctx, pooled):
    y = None
    if pooled is not None:
        y = comfy_support.sdxl_y(patcher, x.shape[0], width=8 * LATENT, height=8 * LATENT, pooled=pooled)
    x0 = comfy_support.patcher_forward(patcher, x, sigma, ctx, y=y)
    return (x - x0) / sigma


@torch.no_grad()
def diffusers_eps(twin: Twin, x, sigma, ctx, pooled):
    ms = twin.patcher.model.model_sampling
    sig = torch.tensor([sigma])
    t = ms.timestep(sig).float()  # ComfyUI's own sigma -> timestep (nearest of its 1000 steps)
    x_vp = x / (sigma ** 2 + 1.0) ** 0.5  # = model_sampling.calculate_input for EPS
    kwargs = {}
    if pooled is not None:
        side = 8 * LATENT
        time_ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=torch.float32).repeat(x.shape[0], 1)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    return twin.unet(x_vp, t.expand(x.shape[0]), encoder_hidden_states=ctx, **kwargs).sample


def _sigma(twin: Twin, t: float) -> float:
    return float(twin.patcher.model.model_sampling.sigma(torch.tensor([t]))[0])


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------------------------------------
# 1. the twins compute the same function
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [150.0, 600.0])
def test_diffusers_twin_matches_comfyui_model(twin, t):
    twin.host.set_scales({})  # adapters (if any are attached already) off
    x, ctx, pooled = _inputs(twin, seed=int(t))
    sigma = _sigma(twin, t)
    ours = diffusers_eps(twin, x, sigma, ctx, pooled)
    theirs = comfy_eps(twin, twin.patcher, x, sigma, ctx, pooled)
    assert torch.isfinite(theirs).all() and theirs.abs().max() > 0.1
    assert _rel_err(ours, theirs) < REL_TOL


# ---------------------------------------------------------------------------------------------
# 2. LDM names, and what ComfyUI's loader does with our file
# ---------------------------------------------------------------------------------------------
def test_our_ldm_names_equal_comfyui_unet_to_diffusers(twin):
    config = dict(twin.unet.config)
    candidates = sorted(twin.host.lora_candidates())
    assert len(candidates) > 20
    wrong = {}
    for path in candidates:
        ldm = diffusers_to_ldm(path, config)
        expected = twin.comfy_names[path + ".weight"]
        if ldm is None or ldm + ".weight" != expected:
            wrong[path] = (ldm, expected)
        elif ldm_to_diffusers(ldm, config) != path:
            wrong[path] = ("back:", ldm_to_diffusers(ldm, config))
    assert not wrong, wrong
    # Every parameter of the UNet (norms, conv_in/out, samplers, embeddings too), not only targets.
    wrong = {}
    for name in twin.diffusers_param_names:
        module, leaf = name.rsplit(".", 1)
        ldm = diffusers_to_ldm(module, config)
        if ldm is None or f"{ldm}.{leaf}" != twin.comfy_names[name]:
            wrong[name] = (ldm, twin.comfy_names[name])
    assert not wrong, wrong


@pytest.mark.parametrize("strength", [1.0, -0.6])
def test_saved_slider_loads_in_comfyui_with_exact_weights(twin, slider, strength):
    weights, file_sd = slider
    assert set(file_sd) == {f"{kohya_stem(p)}.{part}" for p in weights.modules
                            for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    patched, unloaded = comfy_support.load_lora_into(twin.patcher, file_sd, strength)
    assert unloaded == []
    assert len(patched.patches) == len(weights.modules)

    comfy_support.import_comfy()["model_management"].load_models_gpu([patched])
    state = patched.model.diffusion_model.state_dict()
    config = dict(twin.unet.config)
    expected = dict(twin.base_state)
    for path, module in weights.modules.items():
        key = diffusers_to_ldm(path, config) + ".weight"
        assert key == twin.comfy_names[path + ".weight"]
        base = twin.base_state[key]
        expected[key] = base + strength * module.delta_weight().reshape(base.shape)
    changed = 0
    for key, value in state.items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
        changed += int(not torch.equal(value, twin.base_state[key]))
    assert changed == len(weights.modules)


# ---------------------------------------------------------------------------------------------
# 3. ComfyUI at strength α == our peft host at scale α
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.7, -1.3])
def test_comfyui_lora_strength_matches_host_scale(twin, slider, alpha):
    _, file_sd = slider
    x, ctx, pooled = _inputs(twin, seed=7)
    sigma = _sigma(twin, 400.0)
    patched, unloaded = comfy_support.load_lora_into(twin.patcher, file_sd, alpha)
    assert unloaded == []
    theirs = comfy_eps(twin, patched, x, sigma, ctx, pooled)
    base = comfy_eps(twin, twin.patcher, x, sigma, ctx, pooled)
    try:
        twin.host.set_scales({SLIDER: alpha})
        ours = diffusers_eps(twin, x, sigma, ctx, pooled)
    finally:
        twin.host.set_scales({})
    assert _rel_err(theirs, base) > 1e-2, "the slider should visibly change the prediction"
    assert _rel_err(ours, theirs) < REL_TOL


# ---------------------------------------------------------------------------------------------
# 4. our reader takes the key forms ComfyUI users have
# ---------------------------------------------------------------------------------------------
def _ldm_forms(twin: Twin, weights: SliderWeights):
    comfy_form, kohya_ldm = {}, {}
    for path, module in weights.modules.items():
        ldm = twin.comfy_names[path + ".weight"][: -len(".weight")]  # ComfyUI's name, not ours
        alpha = torch.tensor(module.alpha)
        comfy_form[f"diffusion_model.{ldm}.lora_up.weight"] = module.up
        comfy_form[f"diffusion_model.{ldm}.lora_down.weight"] = module.down
        comfy_form[f"diffusion_model.{ldm}.alpha"] = alpha
        stem = "lora_unet_" + ldm.replace(".", "_")
        kohya_ldm[f"{stem}.lora_up.weight"] = module.up
        kohya_ldm[f"{stem}.lora_down.weight"] = module.down
        kohya_ldm[f"{stem}.alpha"] = alpha
    return {"comfy": comfy_form, "kohya_ldm": kohya_ldm}


@pytest.mark.parametrize("form", ["comfy", "kohya_ldm"])
def test_reader_accepts_comfyui_key_forms(twin, slider, form):
    weights, _ = slider
    sd = _ldm_forms(twin, weights)[form]
    # ComfyUI itself reads this form completely (so it is a form its users really have) ...
    _, unloaded = comfy_support.load_lora_into(twin.patcher, sd, 1.0)
    assert unloaded == []
    # ... and so do we, back to the same modules under the diffusers names.
    got = from_state_dict(sd, twin.naming)
    assert set(got.modules) == set(weights.modules)
    for path, module in weights.modules.items():
        back = got.modules[path]
        assert back.alpha == module.alpha
        assert torch.equal(back.down, module.down) and torch.equal(back.up, module.up)
