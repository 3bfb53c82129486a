"""Every LoRA key mapping of the project lives here, and every slider file read or write.

Written: safetensors with kohya keys ``lora_unet_<diffusers module path, . → _>`` and
``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` plus string metadata — the form ComfyUI's
stock LoraLoader, A1111/Forge and diffusers all read. Flow transformers named by diffusers (Flux,
SD3 from the core's diffusers backend) are written as ``transformer.<path>.lora_A.weight`` /
``.lora_B.weight`` with alpha / rank folded into B: the form diffusers' Flux and SD3 loaders and
ComfyUI's read (ComfyUI maps no ``lora_unet_<diffusers path>`` key on those families).

Read (each converted to `SliderWeights` keyed by diffusers module path):
- kohya with diffusers module names (ours, the official sliders' ``.pt`` files, their Flux ones too),
  also under OneTrainer's ``lora_transformer_`` and SimpleTuner's ``lycoris_`` prefixes,
- kohya with LDM module names (``lora_unet_input_blocks_1_1_...``),
- ComfyUI ``diffusion_model.<LDM path>.lora_up.weight / .lora_down.weight / .alpha``,
- peft ``<path>.lora_A.weight / .lora_B.weight`` (optionally ``base_model.model.`` / ``unet.``
  prefixes, no alpha stored → alpha = rank),
- diffusers' ``<path>.lora.down.weight / .lora.up.weight``.
``.pt``/``.ckpt``/``.bin`` files are read only through ``torch.load(weights_only=True)``.

A two-ended slider (`SliderWeights.negative`) is one file: its positive end under the keys above (so a
stock LoraLoader applies that end) and its negative end under the same keys behind ``negative_end.``,
with metadata ``sliders.ends = "two"``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import FamilyMismatchError, SliderError
from .slider_weights import META_FAMILY, LoraModule, SliderWeights

log = logging.getLogger(__name__)

KOHYA_UNET_PREFIX = "lora_unet_"
# kohya-style prefixes trainers put before a flow transformer's diffusers module names
DIT_KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_")
DIFFUSERS_DIT_BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")
COMFY_UNET_PREFIX = "diffusion_model."
SLIDER_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
NEGATIVE_END_PREFIX = "negative_end."  # a two-ended slider's α < 0 LoRA
META_ENDS = "sliders.ends"


def kohya_stem(module_path: str) -> str:
    """``down_blocks.0.attentions.0.proj_in`` → ``lora_unet_down_blocks_0_attentions_0_proj_in``."""
    return KOHYA_UNET_PREFIX + module_path.replace(".", "_")


# ---------------------------------------------------------------------------------------------
# LDM (original Stable Diffusion / ComfyUI) ↔ diffusers UNet module names
# ---------------------------------------------------------------------------------------------
_RESNET_LDM_TO_DIFFUSERS = {
    "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
}
_RESNET_DIFFUSERS_TO_LDM = {v: k for k, v in _RESNET_LDM_TO_DIFFUSERS.items()}


def unet_block_prefixes(unet_config: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(LDM prefix, diffusers prefix, kind) for every block of a UNet2DConditionModel layout.

    kind is "resnet", "attention" or "sampler"; the inner names of attention blocks are identical
    in both namings, resnets rename their layers, samplers are a single conv.
    """
    down_types = list(unet_config["down_block_types"])
    up_types = list(unet_config["up_block_types"])
    layers = unet_config["layers_per_block"]
    layers = [layers] * len(down_types) if isinstance(layers, int) else list(layers)
    blocks: list[tuple[str, str, str]] = [
        ("input_blocks.0.0", "conv_in", "sampler"),
        ("time_embed.0", "time_embedding.linear_1", "sampler"),
        ("time_embed.2", "time_embedding.linear_2", "sampler"),
        ("label_emb.0.0", "add_embedding.linear_1", "sampler"),
        ("label_emb.0.2", "add_embedding.linear_2", "sampler"),
        ("out.0", "conv_norm_out", "sampler"),
        ("out.2", "conv_out", "sampler"),
    ]
    n = 1
    for i, block_type in enumerate(down_types):
        for j in range(layers[i]):
            blocks.append((f"input_blocks.{n}.0", f"down_blocks.{i}.resnets.{j}", "resnet"))
            if "CrossAttn" in block_type:
                blocks.append((f"input_blocks.{n}.1", f"down_blocks.{i}.attentions.{j}", "attention"))
            n += 1
        if i < len(down_types) - 1:
            blocks.append((f"input_blocks.{n}.0.op", f"down_blocks.{i}.downsamplers.0.conv", "sampler"))
            n += 1
    mid_type = unet_config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
    blocks.append(("middle_block.0", "mid_block.resnets.0", "resnet"))
    if "CrossAttn" in mid_type:
        blocks.append(("middle_block.1", "mid_block.attentions.0", "attention"))
        blocks.append(("middle_block.2", "mid_block.resnets.1", "resnet"))
    else:
        blocks.append(("middle_block.1", "mid_block.resnets.1", "resnet"))
    up_layers = list(reversed(layers))
    n = 0
    for i, block_type in enumerate(up_types):
        has_attn = "CrossAttn" in block_type
        for j in range(up_layers[i] + 1):
            blocks.append((f"output_blocks.{n}.0", f"up_blocks.{i}.resnets.{j}", "resnet"))
            if has_attn:
                blocks.append((f"output_blocks.{n}.1", f"up_blocks.{i}.attentions.{j}", "attention"))
            if j == up_layers[i] and i < len(up_types) - 1:
                blocks.append((f"output_blocks.{n}.{2 if has_attn else 1}.conv",
                               f"up_blocks.{i}.upsamplers.0.conv", "sampler"))
            n += 1
    return blocks


def _convert_module_path(path: str, blocks: list[tuple[str, str, str]], to_ldm: bool) -> str | None:
    best = None
    for ldm, diffusers, kind in blocks:
        src, dst = (diffusers, ldm) if to_ldm else (ldm, diffusers)
        if (path == src or path.startswith(src + ".")) and (best is None or len(src) > len(best[0])):
            best = (src, dst, kind)
    if best is None:
        return None
    src, dst, kind = best
    inner = path[len(src) + 1:]
    if not inner:
        return dst
    if kind == "resnet":
        table = _RESNET_DIFFUSERS_TO_LDM if to_ldm else _RESNET_LDM_TO_DIFFUSERS
        if inner not in table:
            return None
        inner = table[inner]
    elif kind == "sampler":
        return None
    return f"{dst}.{inner}"


def diffusers_to_ldm(path: str, unet_config: Mapping[str, Any]) -> str | None:
    return _convert_module_path(path, unet_block_prefixes(unet_config), to_ldm=True)


def ldm_to_diffusers(path: str, unet_config: Mapping[str, Any]) -> str | None:
    return _convert_module_path(path, unet_block_prefixes(unet_config), to_ldm=False)


class UnetNaming:
    """Resolves any key form of a module back to the model's diffusers module path."""

    def __init__(self, module_paths: Iterable[str], unet_config: Mapping[str, Any] | None = None,
                 ldm_names: Mapping[str, str] | None = None,
                 weight_shapes: Mapping[str, tuple[int, ...]] | None = None,
                 aliases: Mapping[str, str] | None = None,
                 slices: Mapping[str, tuple[str, int, int]] | None = None,
                 splits: Mapping[str, Sequence[tuple[str, int, int]]] | None = None,
                 convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None):
        """`ldm_names` (diffusers path → LDM path) comes from a host that knows it (ComfyUI);
        otherwise it is derived from a diffusers `unet_config`. `weight_shapes` (path → the base
        weight's shape) lets a file that does not fit be refused with the module and the reason.
        Flow transformers, whose paths are the host's own: `aliases` maps another name of a whole
        module (diffusers' `transformer_blocks.0.attn.to_out.0`) to it, and `slices` maps a module
        that the host fuses with others (diffusers' to_q / to_k / to_v → one qkv) to (path, first
        output row, rows). `splits` is the other way round, for a model named by diffusers: another
        naming's fused layer (the host's `qkv`) → the (path, first row, rows) of each piece. `convert`
        rewrites a file in a form only the host's library knows (diffusers' Flux loader: XLabs, …) into
        one of ours, for files nothing here matches."""
        self.module_paths = set(module_paths)
        self.weight_shapes = dict(weight_shapes or {})
        self.aliases = {a: p for a, p in (aliases or {}).items() if p in self.module_paths}
        self.slices = {a: v for a, v in (slices or {}).items() if v[0] in self.module_paths}
        self._by_stem = {kohya_stem(p): p for p in self.module_paths}
        self._slice_by_stem: dict[str, tuple[str, int, int]] = {}
        diffusers_dit = is_diffusers_dit(self.module_paths)
        for prefix in DIT_KOHYA_PREFIXES:  # diffusers names of a flow transformer, in kohya form
            for path in self.module_paths if diffusers_dit else ():
                self._by_stem.setdefault(prefix + path.replace(".", "_"), path)
            for alias, path in self.aliases.items():
                self._by_stem.setdefault(prefix + alias.replace(".", "_"), path)
            for piece, target in self.slices.items():
                self._slice_by_stem[prefix + piece.replace(".", "_")] = target
        self.splits = {h: list(v) for h, v in (splits or {}).items() if all(q[0] in self.module_paths for q in v)}
        self._split_by_stem = {kohya_stem(h): v for h, v in self.splits.items()}
        self.convert = convert
        if ldm_names is None and unet_config is not None and "down_block_types" in unet_config:
            blocks = unet_block_prefixes(unet_config)
            ldm_names = {p: _convert_module_path(p, blocks, to_ldm=True) for p in self.module_paths}
        self._ldm_to_path = {ldm: p for p, ldm in (ldm_names or {}).items() if ldm is not None and p in self.module_paths}
        for ldm, p in self._ldm_to_path.items():
            self._by_stem.setdefault(kohya_stem(ldm), p)

    def from_kohya(self, stem: str) -> str | None:
        return self._by_stem.get(stem)

    def from_ldm(self, ldm_path: str) -> str | None:
        return self._ldm_to_path.get(ldm_path)

    def from_dotted(self, path: str) -> str | None:
        bare = path.removeprefix("transformer.")  # diffusers' prefix for a DiT's modules
        for candidate in (path, bare):
            if candidate in self.module_paths:
                return candidate
        return self._ldm_to_path.get(path) or self.aliases.get(bare)

    def slice_of(self, path: str) -> tuple[str, int, int] | None:
        return self.slices.get(path.removeprefix("transformer."))

    def slice_of_stem(self, stem: str) -> tuple[str, int, int] | None:
        return self._slice_by_stem.get(stem)

    def split_of(self, key: str, form: str) -> list[tuple[str, int, int]] | None:
        """The pieces of a fused layer named by a kohya stem or a dotted path (`splits`)."""
        return self._split_by_stem.get(key) if form == "kohya" else self.splits.get(key)


def flux_host_names(num_layers: int, num_single_layers: int, width: int,
                    mlp_width: int) -> tuple[dict[str, str], dict[str, list[tuple[str, int, int]]]]:
    """Flux's original (BFL) names, ComfyUI's and kohya's, for diffusers' FluxTransformer2DModel: (aliases
    of whole layers, splits of the fused layers: a double block's q/k/v, a single block's `linear1` =
    q, k, v and the MLP's input). The other direction of the map ComfyUI reads diffusers Flux files with."""
    aliases, splits = {}, {}
    for i in range(num_layers):
        host, ours = f"double_blocks.{i}", f"transformer_blocks.{i}"
        aliases.update({f"{host}.img_attn.proj": f"{ours}.attn.to_out.0", f"{host}.txt_attn.proj": f"{ours}.attn.to_add_out",
                        f"{host}.img_mlp.0": f"{ours}.ff.net.0.proj", f"{host}.img_mlp.2": f"{ours}.ff.net.2",
                        f"{host}.txt_mlp.0": f"{ours}.ff_context.net.0.proj", f"{host}.txt_mlp.2": f"{ours}.ff_context.net.2",
                        f"{host}.img_mod.lin": f"{ours}.norm1.linear", f"{host}.txt_mod.lin": f"{ours}.norm1_context.linear"})
        for stream, pieces in (("img_attn", ("to_q", "to_k", "to_v")), ("txt_attn", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            splits[f"{host}.{stream}.qkv"] = [(f"{ours}.attn.{piece}", j * width, width) for j, piece in enumerate(pieces)]
    for i in range(num_single_layers):
        host, ours = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        aliases.update({f"{host}.linear2": f"{ours}.proj_out", f"{host}.modulation.lin": f"{ours}.norm.linear"})
        splits[f"{host}.linear1"] = [*((f"{ours}.attn.{piece}", j * width, width) for j, piece in enumerate(("to_q", "to_k", "to_v"))),
                                     (f"{ours}.proj_mlp", 3 * width, mlp_width)]
    return aliases, splits


def mmdit_host_names(num_layers: int, width: int) -> tuple[dict[str, str], dict[str, list[tuple[str, int, int]]]]:
    """SD3's original MMDiT names (ComfyUI's and the checkpoints') for diffusers' SD3Transformer2DModel:
    (aliases of whole layers, splits of the fused q/k/v into their three row blocks of `width`). The
    other direction of the map ComfyUI reads diffusers SD3 files with; the last block's context
    modulation, whose scale and shift halves are swapped, is left out (no preset trains it)."""
    qkv = {"x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
           "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
           "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
    whole = {"x_block.attn.proj": "attn.to_out.0", "x_block.attn2.proj": "attn2.to_out.0",
             "context_block.attn.proj": "attn.to_add_out", "x_block.mlp.fc1": "ff.net.0.proj",
             "x_block.mlp.fc2": "ff.net.2", "context_block.mlp.fc1": "ff_context.net.0.proj",
             "context_block.mlp.fc2": "ff_context.net.2", "x_block.adaLN_modulation.1": "norm1.linear",
             "context_block.adaLN_modulation.1": "norm1_context.linear"}
    aliases, splits = {}, {}
    for i in range(num_layers):
        host, ours = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        for name, target in whole.items():
            if not (i == num_layers - 1 and name == "context_block.adaLN_modulation.1"):
                aliases[f"{host}.{name}"] = f"{ours}.{target}"
        for name, pieces in qkv.items():
            splits[f"{host}.{name}"] = [(f"{ours}.{piece}", j * width, width) for j, piece in enumerate(pieces)]
    return aliases, splits


def is_diffusers_dit(paths: Iterable[str]) -> bool:
    """Module paths of a diffusers flow transformer (FluxTransformer2DModel, SD3Transformer2DModel)."""
    return any(p.startswith(DIFFUSERS_DIT_BLOCKS) for p in paths)


# ---------------------------------------------------------------------------------------------
# state dict ↔ SliderWeights
# ---------------------------------------------------------------------------------------------
_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    # (form, regex with groups: module, part) — part is down / up / alpha
    ("kohya", re.compile(r"^((?:lora_unet|lora_transformer|lycoris)_\w+?)\.(lora_down|lora_up)\.weight$")),
    ("kohya", re.compile(r"^((?:lora_unet|lora_transformer|lycoris)_\w+?)\.(alpha)$")),
    ("comfy", re.compile(r"^diffusion_model\.(.+)\.(lora_down|lora_up)\.weight$")),
    ("comfy", re.compile(r"^diffusion_model\.(.+)\.(alpha)$")),
    ("peft", re.compile(r"^(?:base_model\.model\.)?(?:unet\.)?(.+)\.(lora_A|lora_B)(?:\.[\w-]+)?\.weight$")),
    ("diffusers", re.compile(r"^(?:unet\.)?(.+)\.lora\.(down|up)\.weight$")),
]
_PART = {"lora_down": "down", "lora_up": "up", "lora_A": "down", "lora_B": "up",
         "down": "down", "up": "up", "alpha": "alpha"}


def to_kohya_state_dict(weights: SliderWeights) -> dict[str, torch.Tensor]:
    """The written form (module docstring): kohya, or diffusers' for a diffusers-named flow transformer;
    a two-ended slider's negative end behind NEGATIVE_END_PREFIX."""
    out = _lora_keys(weights.modules)
    if weights.negative is not None:
        out |= {NEGATIVE_END_PREFIX + k: v for k, v in _lora_keys(weights.negative).items()}
    return out


def _lora_keys(modules: Mapping[str, LoraModule]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if is_diffusers_dit(modules):
        for path, module in sorted(modules.items()):
            out[f"transformer.{path}.lora_A.weight"] = module.down.detach().contiguous().cpu()
            out[f"transformer.{path}.lora_B.weight"] = (module.up.detach() * (module.alpha / module.rank)).contiguous().cpu()
        return out
    for path, module in sorted(modules.items()):
        stem = kohya_stem(path)
        out[f"{stem}.lora_down.weight"] = module.down.detach().contiguous().cpu()
        out[f"{stem}.lora_up.weight"] = module.up.detach().contiguous().cpu()
        out[f"{stem}.alpha"] = torch.tensor(float(module.alpha), dtype=torch.float32)
    return out


def from_state_dict(state: Mapping[str, torch.Tensor], naming: UnetNaming,
                    metadata: Mapping[str, str] | None = None, source: str = "slider") -> SliderWeights:
    """Any supported key form → SliderWeights keyed by the model's diffusers module paths (a two-ended
    slider's negative end too)."""
    negative = {k[len(NEGATIVE_END_PREFIX):]: v for k, v in state.items() if k.startswith(NEGATIVE_END_PREFIX)}
    weights = _modules_from_state_dict({k: v for k, v in state.items() if not k.startswith(NEGATIVE_END_PREFIX)},
                                       naming, metadata, source)
    if negative:
        weights.negative = _modules_from_state_dict(negative, naming, None, f"{source} (negative end)").modules
    return weights


def _modules_from_state_dict(state: Mapping[str, torch.Tensor], naming: UnetNaming,
                             metadata: Mapping[str, str] | None, source: str) -> SliderWeights:
    if naming.convert is not None and not all(_known(key, naming) for key in state):
        try:
            state = naming.convert(dict(state))
        except Exception as exc:  # a converter's own asserts and key errors mean: not a form it knows either
            raise SliderError(f"{source}: keys in a form this model's names do not match, and diffusers' converter "
                              f"could not read it either ({type(exc).__name__}: {exc}); e.g. "
                              f"{[k for k in state if not _known(k, naming)][:3]}") from exc
    parts: dict[str, dict[str, torch.Tensor]] = {}
    fused: dict[str, dict[tuple[int, int], dict[str, torch.Tensor]]] = {}  # path → (first row, rows) → part
    split: dict[str, tuple[list[tuple[str, int, int]], dict[str, torch.Tensor]]] = {}  # fused layer → pieces, parts
    unknown, unmatched, skipped_te = [], [], []
    for key, tensor in state.items():
        kind, target, module_key, part = _place(key, naming)
        if kind == "text_encoder":
            skipped_te.append(key)
        elif kind == "unknown":
            unknown.append(key)
        elif kind == "unmatched":
            unmatched.append(key)
        elif kind == "split":
            split.setdefault(module_key, (target, {}))[1][part] = tensor
        elif kind == "slice":
            fused.setdefault(target[0], {}).setdefault(target[1:], {})[part] = tensor
        else:
            parts.setdefault(target, {})[part] = tensor
    if unknown:
        raise SliderError(f"{source}: {len(unknown)} key(s) in no known LoRA format, e.g. {unknown[:3]}")
    if unmatched:
        raise SliderError(
            f"{source}: {len(unmatched)} key(s) name modules that this model does not have, e.g. {unmatched[:3]}. "
            "Every Linear/Conv2d of the UNet is accepted under its diffusers or LDM name, so the file was made "
            "for a model with another block layout (another base family, or a custom UNet); "
            "`python -m sliders_core info FILE` shows what it was trained on")
    if skipped_te:
        log.warning("%s: ignoring %d text-encoder LoRA key(s); sliders act on the UNet only", source, len(skipped_te))
    for fused_name, (pieces, p) in split.items():  # one LoRA on a fused layer → the same down, its up's rows
        if "down" not in p or "up" not in p:
            raise SliderError(f"{source}: module {fused_name} lacks its {'up' if 'down' in p else 'down'} weight")
        for path, start, rows in pieces:
            parts[path] = {**p, "up": p["up"][start:start + rows]}
    for path, pieces in fused.items():
        if path in parts:
            raise SliderError(f"{source}: module {path} is given both whole and as q/k/v (or MLP) pieces")
        parts[path] = _fuse(source, path, pieces, naming.weight_shapes.get(path))
    if not parts:
        raise SliderError(f"{source}: no UNet LoRA weights found")
    modules = {}
    for path, p in sorted(parts.items()):
        if "down" not in p or "up" not in p:
            raise SliderError(f"{source}: module {path} lacks its {'up' if 'down' in p else 'down'} weight")
        down, up = p["down"], p["up"]
        if down.shape[0] != up.shape[1]:
            raise SliderError(f"{source}: module {path} has mismatched ranks {tuple(down.shape)} / {tuple(up.shape)}")
        _check_fits(source, path, down, up, naming.weight_shapes.get(path))
        alpha = float(p["alpha"].float().item()) if "alpha" in p else float(down.shape[0])
        modules[path] = LoraModule(down=down, up=up, alpha=alpha)
    return SliderWeights(modules=modules, metadata=dict(metadata or {}))


_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "te_")  # "lora_te" covers kohya's lora_te1 / lora_te2


def _place(key: str, naming: UnetNaming) -> tuple[str, Any, str | None, str | None]:
    """Where one key of a file goes: (kind, target, module key, part). kind: "text_encoder" (skipped),
    "unknown" (no LoRA form), "unmatched" (a known form, a module this model lacks), "split" (target:
    the pieces this model keeps apart of a layer the file has fused), "slice" (target: (path, first
    row, rows) of a layer this model fuses) or "whole" (target: the module path)."""
    if key.startswith(_TEXT_ENCODER_PREFIXES):
        return "text_encoder", None, None, None
    for form, pattern in _PATTERNS:  # noqa: B007 (form is read after the loop breaks)
        match = pattern.match(key)
        if match:
            break
    else:
        return "unknown", None, None, None
    module, part = match.group(1), _PART[match.group(2)]
    pieces = naming.split_of(module, form) if form in ("kohya", "comfy") else None
    if pieces is not None:
        return "split", pieces, module, part
    if form == "kohya":
        path, piece = naming.from_kohya(module), naming.slice_of_stem(module)
    elif form == "comfy":
        path, piece = naming.from_ldm(module) or naming.from_dotted(module), None
    else:
        path, piece = naming.from_dotted(module), naming.slice_of(module)
    if path is not None:
        return "whole", path, module, part
    if piece is not None:
        return "slice", piece, module, part
    return "unmatched", None, module, part


def _known(key: str, naming: UnetNaming) -> bool:
    """Whether `from_state_dict` can place this key without the host's converter."""
    return _place(key, naming)[0] not in ("unknown", "unmatched")


def _fuse(source: str, path: str, pieces: dict[tuple[int, int], dict[str, torch.Tensor]],
          base: tuple[int, ...] | None) -> dict[str, torch.Tensor]:
    """LoRAs on the pieces of a fused layer (q, k, v, … as rows of one weight) → one LoRA on the whole:
    the downs stacked, each up (times its alpha / rank) placed at its rows. Its ΔW is exactly theirs."""
    downs, ups, rows_total = [], [], base[0] if base else max(start + n for start, n in pieces)
    for (start, rows), p in sorted(pieces.items()):
        if "down" not in p or "up" not in p:
            raise SliderError(f"{source}: a piece of module {path} (rows {start}–{start + rows}) lacks its "
                              f"{'up' if 'down' in p else 'down'} weight")
        rank = p["down"].shape[0]
        scale = float(p["alpha"].float().item()) / rank if "alpha" in p else 1.0
        if p["up"].shape[0] != rows:
            raise SliderError(f"{source}: a piece of module {path} maps to {p['up'].shape[0]} features, the model's "
                              f"rows {start}–{start + rows} are {rows}")
        up = torch.zeros(rows_total, rank, dtype=p["up"].dtype)
        up[start:start + rows] = p["up"].reshape(rows, rank) * scale
        downs.append(p["down"].reshape(rank, -1))
        ups.append(up)
    down, up = torch.cat(downs), torch.cat(ups, dim=1)
    return {"down": down, "up": up, "alpha": torch.tensor(float(down.shape[0]))}


def _check_fits(source: str, path: str, down: torch.Tensor, up: torch.Tensor, base: tuple[int, ...] | None) -> None:
    """ΔW = up·down must have the base weight's shape (kohya stores 1×1 convs and linears alike)."""
    if base is None:
        return
    out_features, in_features = base[0], math.prod(base[1:])
    if up.shape[0] != out_features or down[0].numel() != in_features:
        raise SliderError(
            f"{source}: module {path} does not fit: the file's LoRA maps {down[0].numel()} → {up.shape[0]} "
            f"features, this model's layer {in_features} → {out_features} (weight {tuple(base)}). The names "
            "match but the widths do not: the slider was made for another model of the same layout "
            "(e.g. SD1 vs SD2 cross-attention width, or a resized custom UNet)")


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
def safe_output_path(folder: str | Path, name: str, suffix: str = ".safetensors") -> Path:
    """A file name from a user/widget resolved inside `folder`; separators, '..' and absolute paths are refused."""
    if not name or not name.strip():
        raise SliderError("slider name is empty")
    if "/" in name or "\\" in name or name in (".", "..") or ".." in Path(name).parts or "\x00" in name:
        raise SliderError(f"slider name {name!r} must be a plain file name without path separators or '..'")
    if not name.endswith(suffix):
        name += suffix
    folder = Path(folder).resolve()
    path = (folder / name).resolve()
    if path.parent != folder:
        raise SliderError(f"slider name {name!r} escapes the output folder {folder}")
    return path


def save_slider(weights: SliderWeights, path: str | Path) -> Path:
    """Write kohya safetensors atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise SliderError(f"sliders are saved as .safetensors, got {path.name}")
    return write_safetensors(to_kohya_state_dict(weights), weights.metadata, path)


def write_safetensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any], path: str | Path) -> Path:
    """Atomic write: a temp file in the same folder, fsync, then rename (no half-written file, ever)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a packed copy of each: safetensors refuses shared memory and non-contiguous (channels_last) tensors
    tensors = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}
    metadata = {k: str(v) for k, v in metadata.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; these are normal, shareable files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# An inversion file (sliders_core.inversion): the start latent, the schedule, the source prompt's
# condition and one unconditional condition per step (or one shared by every step).
def inversion_state_dict(latent: torch.Tensor, levels: torch.Tensor, cond: Mapping[str, torch.Tensor],
                         unconds: Sequence[Mapping[str, torch.Tensor]] | Mapping[str, torch.Tensor]) -> dict:
    out = {"latent": latent.float(), "levels": levels}
    out.update({f"cond.{k}": v for k, v in cond.items()})
    if isinstance(unconds, Mapping):
        out.update({f"uncond.shared.{k}": v for k, v in unconds.items()})
    else:
        for i, uncond in enumerate(unconds):
            out.update({f"uncond.{i}.{k}": v for k, v in uncond.items()})
    return out


def split_inversion_state_dict(tensors: Mapping[str, torch.Tensor], steps: int, source: str):
    """→ (latent, levels, cond, [uncond per step]); a missing or stray key is a corrupt file."""
    def group(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    cond, shared = group("cond."), group("uncond.shared.")
    unconds = [shared] * steps if shared else [group(f"uncond.{i}.") for i in range(steps)]
    expected = {"latent", "levels", *(f"cond.{k}" for k in cond)}
    expected |= {f"uncond.shared.{k}" for k in shared} if shared else {
        f"uncond.{i}.{k}" for i, u in enumerate(unconds) for k in u}
    if "latent" not in tensors or "levels" not in tensors or not cond or any(not u for u in unconds) \
            or set(tensors) != expected or any(set(u) != set(cond) for u in unconds):
        raise SliderError(f"{source}: not a complete inversion file (keys for {steps} steps expected); "
                          "it is corrupt or was written by something else — invert the image again")
    return tensors["latent"], tensors["levels"], cond, unconds


def read_state_dict(path: str | Path, what: str = "slider") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a LoRA (or inversion) file; never unpickles arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise SliderError(f"{what} file not found: {path}")
    suffixes = SLIDER_SUFFIXES if what == "slider" else (".safetensors",)
    if path.suffix not in suffixes:
        raise SliderError(f"{path.name}: unsupported {what} file type; expected one of {suffixes}")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise SliderError(f"{path.name}: corrupt or truncated safetensors file ({exc})") from exc
        return tensors, metadata
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in many types; all mean "not a plain tensor dict"
        raise SliderError(f"{path.name}: unreadable or corrupt .pt file, or it holds more than tensors ({exc})") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SliderError(f"{path.name}: expected a dict of tensors")
    return dict(obj), {}


def load_slider(path: str | Path, naming: UnetNaming, family: str | None = None) -> SliderWeights:
    """Read any supported slider/LoRA file for a model; refuse one made for another family."""
    path = Path(path)
    tensors, metadata = read_state_dict(path)
    file_family = metadata.get(META_FAMILY)
    if family is not None and file_family is not None and file_family != family:
        raise FamilyMismatchError(
            f"{path.name} is a slider for base family '{file_family}', but the model is '{family}'; "
            "load a model of that family or train the slider for this one")
    weights = from_state_dict(tensors, naming, metadata, source=path.name)
    weights.metadata.setdefault("sliders.source_file", path.name)
    return weights


def describe(weights: SliderWeights) -> dict[str, Any]:
    prompts = weights.metadata.get("sliders.prompts")
    return {
        "family": weights.family,
        "modules": len(weights.modules),
        "ranks": sorted({m.rank for m in weights.modules.values()}),
        "prompts": json.loads(prompts) if prompts else None,
        "steps": weights.metadata.get("sliders.steps"),
        # two: one LoRA per end (α < 0 applies the negative end's); one: α < 0 negates the one LoRA
        "ends": 1 if weights.negative is None else 2,
    }
