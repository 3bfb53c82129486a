"""Test support: run ComfyUI's own model / LoRA code in-process, on CPU, with tiny models.

Nothing here imports ComfyUI at module import time.  Tests that need ComfyUI call
``import_comfy()`` (or skip when ``comfyui_dir()`` is None), e.g.::

    comfy_dir = comfy_support.comfyui_dir()
    if comfy_dir is None:
        pytest.skip("COMFYUI_DIR not set")

Environment:
    COMFYUI_DIR         path to a ComfyUI checkout (verified with Comfy-Org/ComfyUI a125cd84, 0.3.64).
    COMFY_SUPPORT_GPU=1 let ComfyUI pick CUDA when available (default: force CPU, like ``--cpu``).

Import setup done by ``import_comfy()`` (what a plain ``python``/``pytest`` process needs):
  * ``sys.path.insert(0, COMFYUI_DIR)``.
  * ``comfy.options.args_parsing`` is left False (the default), so ``comfy.cli_args`` parses an
    empty argv and pytest's own ``sys.argv`` is ignored.
  * ``comfy.cli_args.args.cpu = True`` BEFORE ``comfy.model_management`` is first imported:
    model_management probes the device at import time and, without ``--cpu``, calls
    ``torch.cuda.current_device()`` -> "Torch not compiled with CUDA enabled" on a CPU torch.
  * torchvision must import (ComfyUI imports it unconditionally); torchaudio is optional (ComfyUI
    only logs "torchaudio missing, ACE model will be broken").

Self-check:  COMFYUI_DIR=/work/ComfyUI python tests/comfy_support.py
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pathlib
import sys
from collections.abc import Iterator
from typing import Any

__all__ = [
    "ComfyUnavailable",
    "comfyui_dir",
    "import_comfy",
    "TINY_SD15_UNET_CONFIG",
    "TINY_SDXL_UNET_CONFIG",
    "tiny_sd15_patcher",
    "tiny_sdxl_patcher",
    "init_weights_",
    "comfy_lora_key_map",
    "load_lora_into",
    "unet_diffusers_to_ldm_names",
    "sdxl_y",
    "patcher_forward",
    "kohya_name",
    "diffusers_config_for",
]

_COMFY: dict[str, Any] | None = None


class ComfyUnavailable(RuntimeError):
    """ComfyUI cannot be imported (COMFYUI_DIR unset/wrong, or its dependencies missing)."""


def comfyui_dir() -> pathlib.Path | None:
    """The ComfyUI checkout named by env var COMFYUI_DIR, or None when unset/empty."""
    value = os.environ.get("COMFYUI_DIR", "").strip()
    if not value:
        return None
    return pathlib.Path(value).expanduser().resolve()


def load_pack():
    """The pack as ComfyUI loads it: a package (`concept_sliders_pack`) whose nodes import `..sliders_core`
    relatively. Call after import_comfy()."""
    import importlib.util

    name, root = "concept_sliders_pack", pathlib.Path(__file__).resolve().parents[1]
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    import concept_sliders_pack.nodes.comfy_backend  # noqa: F401
    return sys.modules[name]


def import_comfy() -> dict[str, Any]:
    """Make ComfyUI importable (CPU) and import the modules the tests use.

    Returns a dict of modules: comfy, model_management, model_patcher, lora, lora_convert, sd,
    utils, supported_models, folder_paths.  Raises ComfyUnavailable with a clear reason otherwise.
    Idempotent; safe to call when running inside a real ComfyUI process (nothing is re-set).
    """
    global _COMFY
    if _COMFY is not None:
        return _COMFY

    root = comfyui_dir()
    if "comfy.model_management" not in sys.modules:
        if root is None:
            raise ComfyUnavailable("COMFYUI_DIR is not set (point it at a ComfyUI checkout)")
        if not (root / "comfy" / "model_patcher.py").is_file() or not (root / "folder_paths.py").is_file():
            raise ComfyUnavailable(f"COMFYUI_DIR={root} is not a ComfyUI checkout (no comfy/model_patcher.py)")
    if root is not None and str(root) not in sys.path:
        sys.path.insert(0, str(root))

    try:
        import comfy.cli_args
        import comfy.options  # noqa: F401  (args_parsing stays False -> argv ignored)

        if "comfy.model_management" not in sys.modules:
            want_gpu = os.environ.get("COMFY_SUPPORT_GPU", "") == "1"
            import torch

            if not (want_gpu and torch.cuda.is_available()):
                comfy.cli_args.args.cpu = True  # same as `main.py --cpu`

        import comfy.lora as lora
        import comfy.lora_convert as lora_convert
        import comfy.model_management as model_management
        import comfy.model_patcher as model_patcher
        import comfy.sd as sd
        import comfy.supported_models as supported_models
        import comfy.utils as utils
        import folder_paths
    except ImportError as exc:  # missing torchvision, transformers, ...
        raise ComfyUnavailable(
            f"cannot import ComfyUI from {root}: {exc!r} "
            "(install ComfyUI's requirements.txt and torchvision in this interpreter)"
        ) from exc

    _COMFY = dict(
        comfy=sys.modules["comfy"],
        model_management=model_management,
        model_patcher=model_patcher,
        lora=lora,
        lora_convert=lora_convert,
        sd=sd,
        utils=utils,
        supported_models=supported_models,
        folder_paths=folder_paths,
    )
    return _COMFY


# ---------------------------------------------------------------------------------------------
# Tiny models
# ---------------------------------------------------------------------------------------------

# Same key set as comfy/model_detection.py's full SD15 config, shrunk.  Two levels, one res block
# each, one transformer block per attention (all levels, like SD1.5), Conv2d 1x1 proj_in/proj_out
# (use_linear_in_transformer False).  SD15 adds num_heads 8 / num_head_channels -1 itself
# (unet_extra_config) -> head dim 4 at level 0, 8 at level 1.
# Diffusers layout: down_blocks.{0,1}.{resnets,attentions}.0, down_blocks.0.downsamplers.0,
# mid_block.{resnets.{0,1},attentions.0}, up_blocks.{0,1}.{resnets,attentions}.{0,1},
# up_blocks.0.upsamplers.0.  down_blocks.0 resnets have no conv_shortcut (32->32), down_blocks.1 do.
TINY_SD15_UNET_CONFIG: dict[str, Any] = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "transformer_depth": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "transformer_depth_output": [1, 1, 1, 1],
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}

# Shrunk SDXL: no attention at level 0 (like SDXL's [0, 0, 2, 2, 10, 10]), Linear proj_in/out,
# context 2048, adm 2816 (pooled 1280 + 6 x 256 size embeddings, "num_classes": "sequential").
# SDXL uses BASE's num_head_channels 64 / num_heads -1 -> model_channels must be a multiple of 64,
# hence 64 here (1 head at level 0, 2 heads at level 1).
# Diffusers layout: down_blocks.0.resnets.0, down_blocks.0.downsamplers.0,
# down_blocks.1.{resnets,attentions}.0, mid_block.*, up_blocks.0.{resnets,attentions}.{0,1},
# up_blocks.0.upsamplers.0, up_blocks.1.resnets.{0,1}.
TINY_SDXL_UNET_CONFIG: dict[str, Any] = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_classes": "sequential",
    "adm_in_channels": 2816,
    "in_channels": 4,
    "model_channels": 64,
    "num_res_blocks": [1, 1],
    "transformer_depth": [0, 1],
    "channel_mult": [1, 2],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": True,
    "context_dim": 2048,
    "transformer_depth_output": [0, 0, 1, 1],
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


def init_weights_(module, seed: int = 0) -> None:
    """Deterministically initialise every parameter and float buffer of ``module`` in place.

    comfy.ops (disable_weight_init) skips reset_parameters(), so freshly built ComfyUI models hold
    uninitialised memory.  Norm layers get weight 1 / bias 0; other weights N(0, 1/fan_in); other
    biases N(0, 0.02^2).  Parameters are visited in sorted name order with one CPU generator, so the
    result depends only on ``seed`` and the architecture.
    """
    import torch

    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    norm_types = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d)
    owner = {}
    for mname, mod in module.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            owner[f"{mname}.{pname}" if mname else pname] = mod
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            mod = owner.get(name)
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(mod, norm_types):
                val = torch.ones(p.shape) if leaf == "weight" else torch.zeros(p.shape)
            elif p.dim() >= 2:
                fan_in = p[0].numel()
                val = torch.randn(p.shape, generator=gen) / math.sqrt(max(fan_in, 1))
            else:
                val = torch.randn(p.shape, generator=gen) * 0.02
            p.copy_(val.to(dtype=p.dtype, device=p.device))


def _tiny_patcher(model_cls_name: str, base_config: dict[str, Any], seed: int, overrides: dict[str, Any]):
    c = import_comfy()
    import torch

    unet_config = dict(base_config)
    unet_config.update(overrides)
    unet_config.setdefault("dtype", torch.float32)
    model_config = getattr(c["supported_models"], model_cls_name)(unet_config)
    model = model_config.get_model({})
    init_weights_(model.diffusion_model, seed)
    model.eval()
    mm = c["model_management"]
    return c["model_patcher"].ModelPatcher(
        model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


def tiny_sd15_patcher(seed: int = 0, **unet_overrides):
    """ModelPatcher around a tiny SD1.5-shaped comfy.model_base.BaseModel (EPS, see TINY_SD15_UNET_CONFIG)."""
    return _tiny_patcher("SD15", TINY_SD15_UNET_CONFIG, seed, unet_overrides)


def tiny_sdxl_patcher(seed: int = 0, **unet_overrides):
    """ModelPatcher around a tiny SDXL-shaped comfy.model_base.SDXL (EPS, see TINY_SDXL_UNET_CONFIG)."""
    return _tiny_patcher("SDXL", TINY_SDXL_UNET_CONFIG, seed, unet_overrides)


# Flux-shaped (double- and single-stream blocks, guidance embedding), sized for FakeClip's 768-d context
# and 1280-d pooled vector: 16 latent channels, 2×2 patches
TINY_FLUX_CONFIG = {"image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16,
                    "vec_in_dim": 1280, "context_in_dim": 768, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2,
                    "depth": 2, "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2,
                    "qkv_bias": True}


def tiny_flux_patcher(seed: int = 0, schnell: bool = False, **overrides):
    """ModelPatcher around a tiny comfy.model_base.Flux (flow matching; dev, or schnell without guidance input)."""
    config = {**TINY_FLUX_CONFIG, "guidance_embed": not schnell}
    return _tiny_patcher("FluxSchnell" if schnell else "Flux", config, seed, overrides)


# Chroma-shaped: Flux's double- and single-stream blocks with no per-block modulation layers (a small
# approximator network makes the modulations), no pooled vector, 2×2 patches counted in its in_channels
TINY_CHROMA_CONFIG = {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 768,
                      "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2,
                      "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True, "in_dim": 64,
                      "out_dim": 64, "hidden_dim": 128, "n_layers": 2}


def tiny_chroma_patcher(seed: int = 0, **overrides):
    """ModelPatcher around a tiny comfy.model_base.Chroma (flow matching, sampled with CFG)."""
    return _tiny_patcher("Chroma", TINY_CHROMA_CONFIG, seed, overrides)


# Qwen-Image-shaped: dual-stream blocks named as diffusers names them (separate q/k/v), 16 latent channels
# in 2×2 patches, FakeClip's 768-d context (no pooled vector)
TINY_QWEN_IMAGE_CONFIG = {"image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16,
                          "num_layers": 2, "attention_head_dim": 32, "num_attention_heads": 2,
                          "joint_attention_dim": 768, "axes_dims_rope": (8, 12, 12)}


def tiny_qwen_image_patcher(seed: int = 0, **overrides):
    """ModelPatcher around a tiny comfy.model_base.QwenImage (flow matching, sampled with CFG)."""
    return _tiny_patcher("QwenImage", TINY_QWEN_IMAGE_CONFIG, seed, overrides)


# SD3-shaped MMDiT (joint blocks of a context and an image stream; depth 2 → hidden 128, 2 heads), for
# FakeClip's 768-d context and 1280-d pooled vector
TINY_SD3_CONFIG = {"in_channels": 16, "out_channels": 16, "pos_embed_scaling_factor": None, "patch_size": 2,
                   "depth": 2, "adm_in_channels": 1280, "pos_embed_max_size": 16, "num_patches": 256,
                   "input_size": None, "context_embedder_config": {
                       "target": "torch.nn.Linear", "params": {"in_features": 768, "out_features": 128}}}


def tiny_sd3_patcher(seed: int = 0, **overrides):
    """ModelPatcher around a tiny comfy.model_base.SD3 (flow matching, sampled with CFG)."""
    import torch

    patcher = _tiny_patcher("SD3", TINY_SD3_CONFIG, seed, overrides)
    with torch.no_grad():  # a buffer (checkpoints fill it), left uninitialised by the host's empty ops
        patcher.model.diffusion_model.pos_embed.normal_(0, 0.02, generator=torch.Generator().manual_seed(seed))
    return patcher


def tiny_vae(seed: int = 2, latent_channels: int = 4):
    """A ComfyUI VAE object over a randomly initialised TAESD (8× down; 4 latent channels, 16 for Flux / SD3)."""
    c = import_comfy()
    import comfy.taesd.taesd
    import torch

    taesd = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
    init_weights_(taesd, seed=seed)
    state = dict(taesd.state_dict())
    state["vae_scale"], state["vae_shift"] = torch.tensor(0.18215), torch.tensor(0.0)
    return c["sd"].VAE(sd=state)


# ---------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------

def diffusers_config_for(uc: dict[str, Any], sample_size: int = 16) -> dict[str, Any]:
    """UNet2DConditionModel kwargs with the architecture of ComfyUI's UNetModel config ``uc``."""
    mult = list(uc["channel_mult"])
    nrb = list(uc["num_res_blocks"])
    assert len(set(nrb)) == 1, "diffusers needs the same number of res blocks on every level"
    depth = list(uc["transformer_depth"])
    per_level, k = [], 0
    for n in nrb:
        level = depth[k:k + n]
        assert len(set(level)) == 1
        per_level.append(level[0])
        k += n
    depth_out = list(uc["transformer_depth_output"])
    # ComfyUI pops transformer_depth_output from the end: it is listed in input-level order
    assert depth_out == [d for d in per_level for _ in range(nrb[0] + 1)], "uniform up-path depth"
    assert uc["transformer_depth_middle"] == per_level[-1], "diffusers' mid block takes the last level's depth"
    channels = [uc["model_channels"] * m for m in mult]
    if uc.get("num_head_channels", -1) != -1:
        heads = [c // uc["num_head_channels"] for c in channels]
    else:
        heads = [uc["num_heads"]] * len(mult)
    cfg: dict[str, Any] = dict(
        sample_size=sample_size,
        in_channels=uc["in_channels"],
        out_channels=uc["out_channels"],
        block_out_channels=tuple(channels),
        layers_per_block=nrb[0],
        down_block_types=tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in per_level),
        up_block_types=tuple("CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(per_level)),
        mid_block_type="UNetMidBlock2DCrossAttn",
        transformer_layers_per_block=tuple(max(d, 1) for d in per_level),
        cross_attention_dim=uc["context_dim"],
        attention_head_dim=tuple(heads),  # diffusers' legacy name: the number of heads
        use_linear_projection=bool(uc["use_linear_in_transformer"]),
        norm_num_groups=32,
    )
    if uc.get("adm_in_channels"):
        assert uc.get("num_classes") == "sequential"
        cfg.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                   projection_class_embeddings_input_dim=uc["adm_in_channels"])
    return cfg


def comfy_lora_key_map(patcher) -> dict[str, str]:
    """``comfy.lora.model_lora_keys_unet(patcher.model, {})``: LoRA key prefix -> model state key.

    Prefixes (for SD1.5/SDXL UNets): ``lora_unet_<LDM path>`` and ``<diffusion_model.LDM path>``
    for every ``.weight`` in the state dict; and, for every diffusers ``.weight`` name known to
    comfy.utils.unet_to_diffusers: ``lora_unet_<diffusers path>``, ``lycoris_<diffusers path>``,
    ``<diffusers path>`` / ``unet.<diffusers path>`` with ``.to_`` -> ``.processor.to_`` (and
    ``to_out.0`` -> ``to_out``).  Values are ``diffusion_model.<LDM path>.weight``.
    """
    c = import_comfy()
    return c["lora"].model_lora_keys_unet(patcher.model, {})


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        try:
            self.messages.append(record.getMessage())
        except Exception:  # pragma: no cover
            pass


@contextlib.contextmanager
def _capture_root_warnings() -> Iterator[_ListHandler]:
    root = logging.getLogger()
    handler = _ListHandler()
    old_level = root.level
    if root.level > logging.WARNING or root.level == logging.NOTSET:
        root.setLevel(logging.WARNING)
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


_NOT_LOADED = "lora key not loaded: "


def load_lora_into(patcher, lora_state_dict: dict[str, Any], strength: float = 1.0) -> tuple[Any, list[str]]:
    """Apply a LoRA state dict the way comfy/sd.py:load_lora_for_models does (model part only).

    key_map = model_lora_keys_unet; lora = lora_convert.convert_lora(sd); patches =
    lora.load_lora(lora, key_map); new = patcher.clone(); new.add_patches(patches, strength).

    Returns (new_patcher, unloaded) where ``unloaded`` is the sorted list of input keys ComfyUI would
    report as "lora key not loaded: ..." (captured from its logging), plus the input keys whose
    target weight was refused by add_patches (ComfyUI's "NOT LOADED <model key>").  An empty list
    means the stock LoraLoader would accept every key.
    """
    c = import_comfy()
    key_map = c["lora"].model_lora_keys_unet(patcher.model, {})
    lora_sd = c["lora_convert"].convert_lora(dict(lora_state_dict))
    with _capture_root_warnings() as cap:
        patches = c["lora"].load_lora(lora_sd, key_map)
    unloaded = {m[len(_NOT_LOADED):] for m in cap.messages if m.startswith(_NOT_LOADED)}

    new_patcher = patcher.clone()
    accepted = set(new_patcher.add_patches(patches, strength))
    refused_targets = {k if isinstance(k, str) else k[0] for k in patches if k not in accepted}
    if refused_targets:
        for prefix, target in key_map.items():
            if target in refused_targets:
                unloaded.update(k for k in lora_sd if k.startswith(prefix + "."))
    return new_patcher, sorted(unloaded)


def unet_diffusers_to_ldm_names(unet_config: dict[str, Any]) -> dict[str, str]:
    """``comfy.utils.unet_to_diffusers(unet_config)``: diffusers parameter name -> LDM parameter name.

    Direction: keys are diffusers names (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight``),
    values are LDM names relative to ``diffusion_model.`` (``input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight``).
    Both sides carry the ``.weight``/``.bias`` suffix.  Only the standard UNet parameters are
    listed (resnets, attentions incl. proj_in/out/norm, samplers, conv_in/out, time/label embedding).
    Caveat: it also lists ``downsamplers``/``upsamplers`` for the level that has none (last down
    level, last up level); those LDM names do not exist in the model.
    ``unet_config`` may be a patcher (its model_config.unet_config is used) or a config dict.
    """
    c = import_comfy()
    if not isinstance(unet_config, dict):
        unet_config = unet_config.model.model_config.unet_config
    return c["utils"].unet_to_diffusers(unet_config)


def kohya_name(diffusers_module_path: str) -> str:
    """``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` -> ``lora_unet_down_blocks_0_...``."""
    return "lora_unet_" + diffusers_module_path.replace(".", "_")


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------

def sdxl_y(patcher, batch: int, width: int = 256, height: int = 256, pooled=None):
    """SDXL ``y`` [batch, 2816] via ``model.encode_adm`` (pooled defaults to zeros [batch, 1280])."""
    import torch

    if pooled is None:
        pooled = torch.zeros(batch, 1280)
    return patcher.model.encode_adm(pooled_output=pooled, width=width, height=height)


def patcher_forward(patcher, x, sigma, context, y=None, strict: bool = True):
    """Denoised x0 from ``patcher.model.apply_model(x, sigma, c_crossattn=context, y=y)``.

    Loads ``patcher`` first with ``comfy.model_management.load_models_gpu([patcher])``, which
    (un)patches weights when switching between clones of one model, so calls on a base patcher and
    its LoRA clone can be interleaved.  ``sigma`` is the k-diffusion sigma (float or [B] tensor).
    For SDXL-shaped models ``y`` defaults to ``sdxl_y`` with zero pooled output.
    With ``strict`` (default) a RuntimeError is raised when ComfyUI logs "ERROR lora ..." while
    patching (a patch whose shape does not fit: accepted by load_lora/add_patches, then skipped).
    """
    c = import_comfy()
    import torch

    with _capture_root_warnings() as cap:
        c["model_management"].load_models_gpu([patcher])
    errors = [m for m in cap.messages if m.startswith("ERROR lora ")]
    if errors and strict:
        # comfy.lora.calculate_weight logs and skips a patch whose shapes don't fit the weight
        # (e.g. a 1x1 lora_down on a 3x3 conv); add_patches had accepted it silently.
        raise RuntimeError("ComfyUI could not apply LoRA patches: " + "; ".join(errors))
    model = patcher.model
    device = patcher.load_device
    x = x.to(device)
    if not torch.is_tensor(sigma):
        sigma = torch.full((x.shape[0],), float(sigma))
    sigma = sigma.to(device).reshape(-1)
    if sigma.numel() == 1 and x.shape[0] > 1:
        sigma = sigma.expand(x.shape[0])
    kwargs = {}
    if getattr(model, "adm_channels", 0):
        if y is None:
            y = sdxl_y(patcher, x.shape[0], width=x.shape[-1] * 8, height=x.shape[-2] * 8)
        kwargs["y"] = y.to(device)
    elif y is not None:
        kwargs["y"] = y.to(device)
    with torch.no_grad():
        return model.apply_model(x, sigma, c_crossattn=context.to(device), **kwargs)


# ---------------------------------------------------------------------------------------------
# Self-check
# ---------------------------------------------------------------------------------------------

def _kohya_lora(module_path: str, weight_shape, rank: int = 4, alpha: float = 2.0, seed: int = 1):
    import torch

    g = torch.Generator().manual_seed(seed)
    out_f, in_f = weight_shape[0], weight_shape[1]
    if len(weight_shape) == 4:  # conv: kxk down, 1x1 up (kohya LoCon layout)
        down = torch.randn((rank, in_f) + tuple(weight_shape[2:]), generator=g) * 0.5
        up = torch.randn(out_f, rank, 1, 1, generator=g) * 0.5
    else:
        down = torch.randn(rank, in_f, generator=g) * 0.5
        up = torch.randn(out_f, rank, generator=g) * 0.5
    name = kohya_name(module_path)
    return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(alpha)}


def _self_check() -> int:
    import time

    import torch

    if comfyui_dir() is None:
        print("COMFYUI_DIR is not set; nothing to check")
        return 2
    t0 = time.time()
    import_comfy()
    print(f"import_comfy: {time.time() - t0:.1f}s")

    failures = 0
    cases = [
        ("sd15", tiny_sd15_patcher, 768,
         ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
          "down_blocks.1.resnets.0.conv1"]),
        ("sdxl", tiny_sdxl_patcher, 2048,
         ["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
          "up_blocks.0.resnets.1.conv2"]),
    ]
    for tag, make, ctx_dim, targets in cases:
        t = time.time()
        base = make(seed=0)
        nparams = sum(p.numel() for p in base.model.diffusion_model.parameters())
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, 16, 16, generator=g)
        ctx = torch.randn(1, 77, ctx_dim, generator=g)
        out0 = patcher_forward(base, x, 1.0, ctx)
        key_map = comfy_lora_key_map(base)
        names = unet_diffusers_to_ldm_names(base)
        print(f"[{tag}] params={nparams} build+forward={time.time() - t:.2f}s out={tuple(out0.shape)} "
              f"finite={bool(torch.isfinite(out0).all())} key_map={len(key_map)} unet_to_diffusers={len(names)}")

        sd_state = base.model.state_dict()
        lora_sd = {}
        for path in targets:
            ldm = key_map[kohya_name(path)]
            lora_sd.update(_kohya_lora(path, tuple(sd_state[ldm].shape)))
            print(f"[{tag}]   {kohya_name(path)} -> {ldm} {tuple(sd_state[ldm].shape)}")
        patched, unloaded = load_lora_into(base, lora_sd, 1.0)
        out1 = patcher_forward(patched, x, 1.0, ctx)
        out0b = patcher_forward(base, x, 1.0, ctx)
        diff = (out1 - out0).abs().max().item()
        back = (out0b - out0).abs().max().item()
        ok = unloaded == [] and diff > 1e-4 and back == 0.0 and len(patched.patches) == len(targets)
        print(f"[{tag}]   kohya LoRA ({len(lora_sd)} keys): unloaded={unloaded} patched_weights={len(patched.patches)} "
              f"max|lora-base|={diff:.4g} base-again-vs-base={back:.3g} -> {'OK' if ok else 'FAIL'}")
        failures += 0 if ok else 1

        bogus = dict(lora_sd)
        bogus["lora_unet_not_a_module.lora_down.weight"] = torch.zeros(1, 1)
        _, unloaded = load_lora_into(base, bogus, 1.0)
        ok = unloaded == ["lora_unet_not_a_module.lora_down.weight"]
        print(f"[{tag}]   with a bogus key: unloaded={unloaded} -> {'OK' if ok else 'FAIL'}")
        failures += 0 if ok else 1

        conv = [p for p in targets if "conv" in p][0]
        w = sd_state[key_map[kohya_name(conv)]]
        bad = _kohya_lora(conv, (w.shape[0], w.shape[1], 1, 1))  # 1x1 down on a 3x3 conv: shape misfit
        bad_patcher, unloaded = load_lora_into(base, bad, 1.0)
        try:
            patcher_forward(bad_patcher, x, 1.0, ctx)
            ok = False
        except RuntimeError as exc:
            ok = unloaded == [] and "ERROR lora" in str(exc)
        print(f"[{tag}]   1x1-down LoRA on a 3x3 conv: load_lora unloaded={unloaded}, "
              f"patcher_forward raises on ComfyUI's patch error -> {'OK' if ok else 'FAIL'}")
        failures += 0 if ok else 1
    print("self-check:", "OK" if failures == 0 else f"{failures} FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(_self_check())
