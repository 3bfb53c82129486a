"""Training options as one dataclass whose fields are also written into the slider file's metadata."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from .errors import SliderError

# Which UNet layers carry the slider's LoRA. Every Linear/Conv2d of a UNet gets one layer kind from
# its diffusers module path; a preset selects modules by path and kind.
LAYER_KINDS = ("self_attn", "cross_attn_q", "cross_attn_kv", "cross_attn_out", "transformer_other",
               "resnet", "sampler", "other",
               # flow transformers (Flux, SD3 / SD3.5 MMDiT, Chroma, Qwen-Image), by the host's or diffusers' paths
               "joint_attn", "single_block", "dit_mlp", "modulation")
# the block lists of a flow transformer: the host's names (Flux, SD3), then diffusers' (both families)
_DIT_BLOCKS = ("double_blocks.", "single_blocks.", "joint_blocks.", "transformer_blocks.", "single_transformer_blocks.")

_ATTN_PROJ = ("to_q", "to_k", "to_v", "to_out.0")
_SAMPLER_CONV = (".downsamplers.0.conv", ".upsamplers.0.conv")


def classify_unet_module(path: str) -> str:
    """Layer kind (LAYER_KINDS) of a Linear/Conv2d of a diffusers UNet, from its module path."""
    if ".attn1." in path and path.endswith(_ATTN_PROJ):
        return "self_attn"
    if ".attn2." in path and path.endswith(_ATTN_PROJ):
        return {"to_q": "cross_attn_q", "to_k": "cross_attn_kv", "to_v": "cross_attn_kv"}.get(
            path.rsplit(".", 1)[-1], "cross_attn_out")
    if ".attentions." in path and path.endswith(("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")):
        return "transformer_other"
    if ".resnets." in path and path.endswith(("conv1", "conv2", "time_emb_proj", "conv_shortcut")):
        return "resnet"
    if path.endswith(_SAMPLER_CONV):
        return "sampler"
    return "other"  # conv_in/out, time and class embeddings: loadable from files, never trained by a preset


def classify_dit_module(path: str) -> str:
    """Layer kind of a Linear of a flow transformer, from the host's module path: Flux (double-stream
    blocks with a joint attention per stream, then single-stream blocks) or SD3's MMDiT (joint blocks
    of a context and an image stream; SD3.5 Medium adds a second image self-attention, `attn2`)."""
    if re.search(r"\.(img|txt)_attn\.(qkv|proj)$", path) or re.search(
            r"\.(context|x)_block\.attn2?\.(qkv|proj)$", path):
        return "joint_attn"
    if re.search(r"^single_blocks\.\d+\.linear[12]$", path):  # fused q/k/v + MLP in, attention + MLP out
        return "single_block"
    if re.search(r"\.(img|txt)_mlp\.\d+$", path) or re.search(r"_block\.mlp\.fc[12]$", path):
        return "dit_mlp"
    if re.search(r"(_mod\.lin|modulation\.lin|adaLN_modulation\.\d+)$", path):
        return "modulation"
    # hosts that keep diffusers' names for a family (Qwen-Image): q/k/v apart, as in diffusers
    return classify_diffusers_dit_module(path)  # else "other": patch / text / time embeddings, the final layer


def classify_diffusers_dit_module(path: str) -> str:
    """The same kinds for diffusers' names of Flux (`FluxTransformer2DModel`), SD3 / SD3.5
    (`SD3Transformer2DModel`) and Qwen-Image: q/k/v are separate layers (ComfyUI fuses Flux's and SD3's)."""
    if re.search(r"^transformer_blocks\.\d+\.attn2?\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)$", path):
        return "joint_attn"
    if re.search(r"^single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp|proj_out)$", path):
        return "single_block"
    if re.search(r"^transformer_blocks\.\d+\.(ff|ff_context|img_mlp|txt_mlp)\.net\.(0\.proj|2)$", path):
        return "dit_mlp"
    if re.search(r"(\.norm1?(_context)?\.linear|\.(img|txt)_mod\.1)$", path):
        return "modulation"
    return "other"


def is_dit(paths) -> bool:
    return any(p.startswith(_DIT_BLOCKS) for p in paths)


# -- the official sliders' training methods (trainscripts/textsliders/lora.py), restated as rules -----
# The official LoRANetwork wraps every Linear/Conv2d inside modules of the classes `Attention` (network
# "lierla") and, for "c3lier" (its default config), also `ResnetBlock2D`, `Downsample2D`, `Upsample2D`,
# `DownBlock2D`, `UpBlock2D`. The training method filters on the *wrapping module's* path:
#   noxattn: no "attn2" / "time_embed" in it; innoxattn: no "attn2"; selfattn: "attn1" in it;
#   xattn: "attn2" in it; xattn-strict: as xattn, minus children with "out" in their name;
#   full: everything; noxattn-hspace: noxattn inside "mid_block" only; noxattn-hspace-last: only the
#   mid block's second resnet's conv2.
OFFICIAL_METHODS = ("noxattn", "innoxattn", "selfattn", "xattn", "xattn-strict", "full",
                    "noxattn-hspace", "noxattn-hspace-last")


def _official_wrapper(path: str, kind: str) -> str | None:
    """Path of the module the official code wraps around this layer (its Attention / ResnetBlock2D /
    sampler), or None for layers it never wraps. (A DownBlock2D/UpBlock2D parent reaches the same
    layers, and no method's filter tells the two paths apart.)"""
    if kind in ("self_attn", "cross_attn_q", "cross_attn_kv", "cross_attn_out"):
        marker = ".attn1." if ".attn1." in path else ".attn2."
        return path[: path.index(marker) + len(marker) - 1]
    if kind == "resnet":
        return re.match(r"^(.*\.resnets\.\d+)\.", path).group(1)
    if kind == "sampler":
        return path.rsplit(".", 1)[0]
    return None


def official_method_selects(method: str, path: str, kind: str, network: str = "c3lier") -> bool:
    """Whether the official sliders trainer with this method and network type trains `path`."""
    if method not in OFFICIAL_METHODS:
        raise SliderError(f"unknown official training method {method!r}; expected one of {OFFICIAL_METHODS}")
    wrapper = _official_wrapper(path, kind)
    if wrapper is None or (network == "lierla" and kind in ("resnet", "sampler")):
        return False
    child = path[len(wrapper) + 1:]
    if method in ("noxattn", "noxattn-hspace", "noxattn-hspace-last"):
        keep = "attn2" not in wrapper and "time_embed" not in wrapper
    elif method == "innoxattn":
        keep = "attn2" not in wrapper
    elif method == "selfattn":
        keep = "attn1" in wrapper
    elif method in ("xattn", "xattn-strict"):
        keep = "attn2" in wrapper
    else:  # full
        keep = True
    if method == "xattn-strict":
        keep = keep and "out" not in child
    if method == "noxattn-hspace":
        keep = keep and "mid_block" in wrapper
    if method == "noxattn-hspace-last":
        keep = keep and "mid_block" in wrapper and ".1" in wrapper and "conv2" in child
    return keep


def _kinds(*kinds: str) -> Callable[[str, str], bool]:
    return lambda path, kind: kind in kinds


def _official(method: str) -> Callable[[str, str], bool]:
    return lambda path, kind: official_method_selects(method, path, kind)


# preset name → (selects(path, kind), one-line description). The official names select exactly the
# official c3lier sets (the network type of its shipped configs); the others are ours.
LAYER_PRESETS: dict[str, tuple[Callable[[str, str], bool], str]] = {
    **{m: (_official(m), f"official '{m}' (c3lier network)") for m in OFFICIAL_METHODS},
    "noxattn-ff": (_kinds("self_attn", "transformer_other", "resnet"),
                   "ours: self-attention, transformer proj_in/proj_out/feed-forward and resnets, "
                   "no cross-attention or sampler convs (this project's 'noxattn' before v0.2)"),
    "attn": (_kinds("self_attn", "cross_attn_q", "cross_attn_kv", "cross_attn_out"),
             "ours: self- and cross-attention projections"),
    "xattn_kv": (_kinds("cross_attn_kv"), "ours: cross-attention keys and values (SliderSpace)"),
    "all": (lambda path, kind: kind != "other",
            "ours: every Linear/Conv2d of the transformer, resnet and sampler blocks"),
    # flow transformers (Flux)
    "dit-attn": (_kinds("joint_attn"), "DiT: the joint-attention projections (q/k/v and out of both streams: "
                 "Flux's double-stream blocks, SD3's joint blocks), the reference's Flux choice"),
    "dit-attn-single": (_kinds("joint_attn", "single_block"), "DiT: dit-attn plus the single-stream blocks' "
                        "fused linear layers (attention and MLP)"),
    "dit-all": (_kinds("joint_attn", "single_block", "dit_mlp"), "DiT: dit-attn-single plus the MLPs of the "
                "two-stream blocks"),
}
DIT_DEFAULT = "dit-attn"
AUTO_LAYERS = "auto"  # the trainer's own default for the model in hand (RunOptions.auto_layers on UNets)
LAYER_PRESETS[AUTO_LAYERS] = (lambda path, kind: False, "the trainer's default for this model: noxattn on UNets "
                              f"(SliderSpace: xattn_kv), {DIT_DEFAULT} on flow transformers (Flux, SD3)")


def resolve_layers(layers: str, candidates, unet_default: str = "noxattn") -> str:
    """`auto` → the preset it stands for on this model; any other preset as it is."""
    if layers != AUTO_LAYERS:
        return layers
    return DIT_DEFAULT if is_dit(candidates) else unet_default


def layer_presets_help() -> str:
    return "; ".join(f"{name}: {text}" for name, (_, text) in LAYER_PRESETS.items())


def preset_modules(candidates: dict[str, str], layers: str) -> list[str]:
    """The candidate module paths (path → kind) a layer preset selects, sorted."""
    if layers not in LAYER_PRESETS:
        raise SliderError(f"layers must be one of {sorted(LAYER_PRESETS)}, got {layers!r}")
    selects = LAYER_PRESETS[resolve_layers(layers, candidates)][0]
    modules = sorted(p for p, kind in candidates.items() if selects(p, kind))
    if not modules and is_dit(candidates):
        dit = ", ".join(name for name in LAYER_PRESETS if name.startswith("dit-"))
        raise SliderError(f"layers={layers!r} is a UNet preset and this model is a transformer: use one of {dit} "
                          f"('{DIT_DEFAULT}', attention only, as the reference trains Flux)")
    if not modules:
        raise SliderError(f"the model has no modules for layers={layers!r}")
    return modules


TRAINED_SIGNS = ("plus", "both", "separate")
CONTRASTS = ("pair", "ends")
REDUCTIONS = ("mean", "sum")
TRAJECTORY_PROMPTS = ("target", "preservation")
MAX_ETA = 50.0  # the reference uses 1–4; beyond this the target is dominated by the η term


class RunOptions:
    """What every trainer's options dataclass shares: its record in the slider file's metadata."""

    auto_layers = "noxattn"  # what layers="auto" selects on a UNet (not a field: a property of the trainer)

    def with_layers_for(self, candidates):
        """These options with `layers="auto"` replaced by the preset it means on this model, so the file
        records what was trained."""
        return dataclasses.replace(self, layers=resolve_layers(self.layers, candidates, self.auto_layers))

    def to_metadata(self) -> dict[str, str]:
        return {"sliders.train_config": json.dumps(dataclasses.asdict(self), sort_keys=True)}


class BatchedRunOptions(RunOptions):
    """Options of a trainer that draws `batch_size` examples per step (image pairs, SliderSpace images)."""

    def validate(self) -> None:
        check_lora_options(self)
        need(self.batch_size >= 1, f"batch_size must be ≥ 1, got {self.batch_size!r}")


@dataclass
class TrainConfig(RunOptions):
    """Text-slider training options. Defaults are the reference's (MISSION §1) unless noted."""

    rank: int = 4
    alpha: float = 1.0
    lr: float = 2e-4
    iterations: int = 1000
    eta: float | None = None  # None: take η from the prompt set (its guidance_scale), else 1.0
    # η of the −1 steps (signs "both" / "separate"): the negative end's own strength; None: the same η.
    # On the shapes colour slider the blue end wants 3 where the red end wants 2 (README → Disentanglement)
    negative_eta: float | None = None
    resolution: int | None = None  # None: the prompt set's, else the model's native size
    batch_size: int | None = None  # None: the prompt set's, else 1
    layers: str = "auto"  # noxattn on UNets (the official default), dit-attn on DiTs
    seed: int = 0
    # x_t comes from one frozen denoising trajectory per refresh, reused for several iterations
    # (the reference re-denoises for every iteration, ≈80 % of its cost).
    trajectory_steps: int = 30
    trajectory_reuse: int = 20
    trajectory_guidance: float = 3.0  # CFG while generating x_t (reference: 3)
    save_every: int = 0  # 0: only at the end
    max_grad_norm: float = 0.0  # 0: no clipping
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30 % slower
    # the push is the mean over preservation attributes (the reference's η scale: it samples one p per
    # step); "sum" is eq. 8 as printed, η once per attribute (files whose train_config lacks this field)
    preservation_reduce: str = "mean"
    # Disentanglement options (issue 13; benchmarks/disentanglement.py measures each against prompting).
    # "both": every other step trains the LoRA at scale −1 toward the eq. 8 target with −η, so α = −1
    # is learned instead of extrapolated from +1 (no extra cost per iteration). "separate": the same
    # steps, but the slider is two-ended, one LoRA per end in one file: the −1 steps train the second
    # LoRA, which α < 0 applies at |α|. Each end gets half the iterations; for concepts whose two ends
    # one LoRA cannot both follow (colour, shape on the shapes model)
    signs: str = "plus"
    # "pair": the push is c+ against c- (eq. 8). "ends": each sign's push is its own end against the
    # neutral prompt, ε(c±⊕p) − ε(c_n⊕p), so η = 1 at α = ±1 is the prompted end, never past it. With
    # signs="plus" only the positive end is trained: a one-ended slider (−1 is extrapolated)
    contrast: str = "pair"
    # the push loses, sample by sample, its component along every preservation attribute's own direction
    # ε(x_t, c_n⊕p) − ε(x_t, c_n): where the model would move if p were named. The prompts alone only
    # average p out of the push; this removes what the concept drags along with it (red → larger on
    # the shapes model). One more frozen prompt per attribute with contrast="pair", none with "ends"
    project_preservation: bool = False
    # "preservation": x_t is drawn under c_t ⊕ p, p cycled per trajectory, so the slider trains on
    # states of every preserved value (the LoRA-on prediction stays at c_t)
    trajectory_prompts: str = "target"
    # x_t drawn with the slider on at the step's scale (the reference's loop); with signs="both" the sign
    # alternates per trajectory instead of per step, so each x_t comes from the sign it trains
    trajectory_slider: bool = False
    anchors: tuple[str, ...] = ()  # prompts whose LoRA-on prediction is held to the frozen one
    anchor_weight: float = 1.0
    # the part of the trajectory x_t is drawn from, 0 = pure noise, 1 = the clean end
    level_range: tuple[float, float] = (0.0, 1.0)

    def validate(self) -> None:
        check_lora_options(self)
        need(self.signs in TRAINED_SIGNS, f"signs must be one of {TRAINED_SIGNS}, got {self.signs!r}")
        need(self.preservation_reduce in REDUCTIONS,
             f"preservation_reduce must be one of {REDUCTIONS}, got {self.preservation_reduce!r}")
        need(self.contrast in CONTRASTS, f"contrast must be one of {CONTRASTS}, got {self.contrast!r}")
        need(self.trajectory_prompts in TRAJECTORY_PROMPTS,
             f"trajectory_prompts must be one of {TRAJECTORY_PROMPTS}, got {self.trajectory_prompts!r}")
        need(all(isinstance(a, str) for a in self.anchors), f"anchors must be prompts, got {self.anchors!r}")
        need(math.isfinite(self.anchor_weight) and self.anchor_weight >= 0,
             f"anchor_weight must be ≥ 0, got {self.anchor_weight!r}")
        low, high = self.level_range
        need(0 <= low < high <= 1, f"level_range must be (low, high) with 0 ≤ low < high ≤ 1, got {self.level_range!r}")
        if self.eta is not None:
            check_eta(self.eta)
        if self.negative_eta is not None:
            check_eta(self.negative_eta)
            need(self.signs != "plus", "negative_eta is the η of the −1 steps: it needs signs 'both' or 'separate'")
        need(self.resolution is None or (self.resolution >= 8 and self.resolution % 8 == 0),
             f"resolution must be a multiple of 8, got {self.resolution!r}")
        need(self.batch_size is None or self.batch_size >= 1, f"batch_size must be ≥ 1, got {self.batch_size!r}")
        need(self.trajectory_steps >= 2, "trajectory_steps must be ≥ 2")
        need(self.trajectory_reuse >= 1, "trajectory_reuse must be ≥ 1")
        need(self.trajectory_guidance >= 1, "trajectory_guidance must be ≥ 1 (1 = no CFG)")


def need(ok: bool, msg: str) -> None:
    if not ok:
        raise SliderError(msg)


def check_lora_options(config) -> None:
    """The options every slider trainer shares: rank, alpha, lr, iterations, layers, save_every."""
    need(isinstance(config.rank, int) and config.rank >= 1, f"rank must be an integer ≥ 1, got {config.rank!r}")
    need(math.isfinite(config.alpha) and config.alpha > 0, f"alpha must be > 0, got {config.alpha!r}")
    need(math.isfinite(config.lr) and 0 < config.lr < 1, f"lr must be in (0, 1), got {config.lr!r}")
    need(config.iterations >= 1, f"iterations must be ≥ 1, got {config.iterations!r}")
    need(config.layers in LAYER_PRESETS, f"layers must be one of {list(LAYER_PRESETS)}, got {config.layers!r}")
    need(config.save_every >= 0, "save_every must be ≥ 0")


def check_eta(eta: float) -> float:
    if not (isinstance(eta, (int, float)) and math.isfinite(eta)) or eta <= 0:
        raise SliderError(f"η (guidance_scale) must be a positive number, got {eta!r}; the reference uses 1–4")
    if eta > MAX_ETA:
        raise SliderError(f"η = {eta} is absurdly large (max {MAX_ETA}); the reference uses 1–4")
    return float(eta)


def parse_numbers(text: str, what: str = "value") -> list[float]:
    """"-2, -1, 0, 1, 2" → floats. Commas or semicolons separate; empty items are skipped; NaN and
    infinities are refused (an α of NaN would blank the image without saying why)."""
    try:
        values = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError as exc:
        raise SliderError(f"{what} must be comma-separated numbers such as '-2, 0, 2', got {text!r}") from exc
    if not all(math.isfinite(v) for v in values):
        raise SliderError(f"{what} must be finite numbers, got {text!r}")
    return values


@dataclass
class PairTrainConfig(BatchedRunOptions):
    """Image-pair slider options. Defaults are the official image sliders' (rank 4, alpha 1, AdamW 2e-4,
    1000 iterations, official noxattn, one pair per step) unless noted."""

    rank: int = 4
    alpha: float = 1.0
    lr: float = 2e-4
    iterations: int = 1000
    layers: str = "auto"  # noxattn on UNets (the official default), dit-attn on DiTs
    seed: int = 0
    batch_size: int = 1  # pairs per step, all of one strength level
    save_every: int = 0
    max_grad_norm: float = 0.0
    gradient_checkpointing: bool = False
