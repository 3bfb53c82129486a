"""Recipe (verified on ComfyUI a125cd84): the project's pixel-space shapes model as ComfyUI MODEL/CLIP/VAE.

Built only from ComfyUI's own classes (subclasses, no monkey-patching):
  MODEL: comfy.supported_models_base.BASE subclass -> comfy.model_base.BaseModel(unet_model=ShapesUNet)
         ShapesUNet = openaimodel.UNetModel + diffusers' "text" addition embedding (label_emb) + 8 GroupNorm groups
  CLIP : comfy.sd.CLIP(ClipTarget(ShapesTokenizer, ShapesClip)) over sd1_clip.SD1Tokenizer/SDTokenizer, SD1ClipModel/SDClipModel
  VAE  : comfy.sd.VAE(sd={"pixel_space_vae": tensor(1.0)})  (ComfyUI's own pixel-space "VAE")
Import only after ComfyUI is importable (inside a ComfyUI process, or tests/comfy_support.import_comfy()).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models_base
import comfy.utils
import torch
from comfy.clip_model import CLIPEmbeddings, CLIPTextModel
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel


# ----------------------------------------------------------------------------------------------
# UNet
# ----------------------------------------------------------------------------------------------
def comfy_unet_config(d: dict) -> dict:
    """ComfyUI UNetModel kwargs for the shapes UNet2DConditionModel config (only what that model uses)."""
    down, up = list(d["down_block_types"]), list(d["up_block_types"])
    n = len(down)
    layers = d["layers_per_block"]
    layers = [layers] * n if isinstance(layers, int) else list(layers)
    depth = d.get("transformer_layers_per_block", 1)
    depth = [depth] * n if isinstance(depth, int) else list(depth)
    ch = list(d["block_out_channels"])
    assert all(c % ch[0] == 0 for c in ch)
    heads = d.get("num_attention_heads") or d["attention_head_dim"]  # diffusers: attention_head_dim = #heads here
    assert isinstance(heads, int), "per-level head counts need num_heads per level (not supported by UNetModel)"
    assert d["addition_embed_type"] == "text" and d.get("encoder_hid_dim") is None
    assert d["resnet_time_scale_shift"] == "scale_shift" and d["flip_sin_to_cos"] and d["freq_shift"] == 0
    assert d["time_embedding_type"] == "positional" and d.get("class_embed_type") is None
    assert d["mid_block_type"] == "UNetMidBlock2DCrossAttn" and d["conv_in_kernel"] == d["conv_out_kernel"] == 3
    rev_depth = list(reversed([depth[i] if "CrossAttn" in t else 0 for i, t in enumerate(down)]))
    out_depth = []  # ComfyUI pops from the end: last entries = first (deepest) output blocks
    for i, t in enumerate(up):
        out_depth = [rev_depth[i] if "CrossAttn" in t else 0] * (list(reversed(layers))[i] + 1) + out_depth
    return {
        "image_size": d["sample_size"], "in_channels": d["in_channels"], "out_channels": d["out_channels"],
        "model_channels": ch[0], "channel_mult": [c // ch[0] for c in ch], "num_res_blocks": layers,
        "transformer_depth": [depth[i] if "CrossAttn" in t else 0 for i, t in enumerate(down)],
        "transformer_depth_output": out_depth, "transformer_depth_middle": depth[-1],
        "context_dim": d["cross_attention_dim"], "use_linear_in_transformer": d["use_linear_projection"],
        "use_spatial_transformer": True, "legacy": False, "use_scale_shift_norm": True,
        "num_heads": heads, "num_head_channels": -1, "adm_in_channels": None, "use_checkpoint": False,
        "use_temporal_attention": False, "use_temporal_resblock": False,
        # not UNetModel kwargs: read by ShapesUNet below
        "norm_num_groups": d["norm_num_groups"], "text_time_heads": d["addition_embed_type_num_heads"],
    }


class TextTimeEmbedding(torch.nn.Module):
    """diffusers' TextTimeEmbedding + AttentionPooling (same parameter names), on ComfyUI ops."""

    def __init__(self, dim, time_embed_dim, num_heads, dtype=None, device=None, operations=None):
        super().__init__()
        self.norm1 = operations.LayerNorm(dim, dtype=dtype, device=device)
        self.pool = torch.nn.Module()
        self.pool.positional_embedding = torch.nn.Parameter(torch.empty(1, dim, dtype=dtype, device=device))
        for name in ("k_proj", "q_proj", "v_proj"):
            setattr(self.pool, name, operations.Linear(dim, dim, dtype=dtype, device=device))
        self.proj = operations.Linear(dim, time_embed_dim, dtype=dtype, device=device)
        self.norm2 = operations.LayerNorm(time_embed_dim, dtype=dtype, device=device)
        self.num_heads = num_heads

    def forward(self, x):
        x = self.norm1(x)
        b, length, width = x.shape
        h, dh = self.num_heads, width // self.num_heads
        cls = x.mean(dim=1, keepdim=True) + comfy.model_management.cast_to_device(
            self.pool.positional_embedding, x.device, x.dtype)
        xs = torch.cat([cls, x], dim=1)
        q = self.pool.q_proj(cls).view(b, 1, h, dh).transpose(1, 2)              # b h 1 dh
        k = self.pool.k_proj(xs).view(b, length + 1, h, dh).transpose(1, 2)      # b h L+1 dh
        v = self.pool.v_proj(xs).view(b, length + 1, h, dh).transpose(1, 2)
        w = torch.softmax((q @ k.transpose(-1, -2)).float() / math.sqrt(dh), dim=-1).to(v.dtype)
        a = (w @ v).transpose(1, 2).reshape(b, width)
        return self.norm2(self.proj(a))


class ShapesUNet(UNetModel):
    """UNetModel whose label_emb is diffusers' "text" addition embedding of the context (y = context)."""

    def __init__(self, norm_num_groups=32, text_time_heads=4, **kwargs):
        super().__init__(**kwargs)
        for m in self.modules():                      # ComfyUI hard-codes GroupNorm(32, ...); diffusers: 8
            if isinstance(m, torch.nn.GroupNorm):
                m.num_groups = norm_num_groups
        self.num_classes = "text"                     # makes UNetModel._forward add label_emb(y)
        self.label_emb = TextTimeEmbedding(kwargs["context_dim"], kwargs["model_channels"] * 4, text_time_heads,
                                           dtype=self.dtype, device=kwargs.get("device"),
                                           operations=kwargs["operations"])

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):  # noqa: B006
        return super().forward(x, timesteps, context, context if y is None else y, control,
                               transformer_options, **kwargs)


class ShapesLatent(comfy.latent_formats.LatentFormat):
    """Pixel space: the latent IS the model-space image (−1..1), 3 channels, scale 1 (like ChromaRadiance)."""
    latent_channels = 3
    scale_factor = 1.0

    def __init__(self):
        self.latent_rgb_factors = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
        self.latent_rgb_factors_bias = [0.0, 0.0, 0.0]


class Shapes(comfy.supported_models_base.BASE):
    """Class name "Shapes" -> nodes/comfy_backend.model_family() gives "shapes" (the CLI's family)."""
    unet_config = {}                 # never matched by checkpoint detection: built only by our loader
    unet_extra_config = {}           # num_heads / num_head_channels come from comfy_unet_config
    sampling_settings = {"beta_schedule": "cosine"}   # = diffusers squaredcos_cap_v2 (see notes)
    latent_format = ShapesLatent
    memory_usage_factor = 0.05
    supported_inference_dtypes = [torch.float32, torch.float16, torch.bfloat16]

    def get_model(self, state_dict, prefix="", device=None):
        return comfy.model_base.BaseModel(self, model_type=comfy.model_base.ModelType.EPS, device=device,
                                          unet_model=ShapesUNet)


def diffusers_unet_to_comfy(sd: dict, unet_config: dict) -> dict:
    """diffusers UNet state dict -> ComfyUI diffusion_model keys (comfy.utils.unet_to_diffusers + label_emb)."""
    mapping = comfy.utils.unet_to_diffusers(unet_config)   # diffusers key -> LDM key
    out, left = {}, []
    for k, v in sd.items():
        if k in mapping:
            out[mapping[k]] = v
        elif k.startswith("add_embedding."):
            out["label_emb." + k[len("add_embedding."):]] = v
        else:
            left.append(k)
    if left:
        raise ValueError(f"unmapped UNet keys: {left[:5]}")
    return out


def load_shapes_model(folder, dtype=torch.float32):
    folder = Path(folder)
    dcfg = json.loads((folder / "unet" / "config.json").read_text())
    sd = comfy.utils.load_torch_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    uc = comfy_unet_config(dcfg)
    config = Shapes(uc)
    config.set_inference_dtype(dtype, None)
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    model = config.get_model({}, device=offload_device)
    ldm = diffusers_unet_to_comfy(sd, config.unet_config)
    missing, unexpected = model.diffusion_model.load_state_dict(ldm, strict=False)
    if missing or unexpected:
        raise ValueError(f"shapes UNet: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


# ----------------------------------------------------------------------------------------------
# text encoder
# ----------------------------------------------------------------------------------------------
class ShapesTextModel(CLIPTextModel):
    """comfy.clip_model.CLIPTextModel with the config's vocab size (ComfyUI's assumes 49408)."""

    def __init__(self, config_dict, dtype, device, operations):
        super().__init__(config_dict, dtype, device, operations)
        self.text_model.embeddings = CLIPEmbeddings(
            config_dict["hidden_size"], vocab_size=config_dict["vocab_size"],
            num_positions=config_dict["max_position_embeddings"], dtype=dtype, device=device, operations=operations)


def make_clip_target(folder):
    folder = Path(folder)
    te_config = json.loads((folder / "text_encoder" / "config.json").read_text())
    tok_config = json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text())
    max_length = min(int(tok_config["model_max_length"]), int(te_config["max_position_embeddings"]))
    special = {"start": te_config["bos_token_id"], "end": te_config["eos_token_id"],
               "pad": te_config["pad_token_id"]}
    tokenizer_path = str(folder / "tokenizer")

    class ShapesClipModel(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006
            super().__init__(device=device, dtype=dtype, max_length=max_length, layer="last",
                             textmodel_json_config=dict(te_config), model_class=ShapesTextModel,
                             special_tokens=special, return_projected_pooled=False,
                             model_options=model_options)

    class ShapesSDTokenizer(comfy.sd1_clip.SDTokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):  # noqa: B006
            from transformers import PreTrainedTokenizerFast
            super().__init__(tokenizer_path, max_length=max_length, pad_with_end=False, pad_token=special["pad"],
                             end_token=special["end"], embedding_directory=embedding_directory,
                             embedding_size=te_config["hidden_size"], embedding_key="shapes",
                             tokenizer_class=PreTrainedTokenizerFast, has_start_token=True, has_end_token=True,
                             pad_to_max_length=True, tokenizer_data=tokenizer_data)
            # SDTokenizer moves a "word group" shorter than max_word_length (8) whole to the next chunk;
            # with max_length 8 a group of exactly 7 tokens never fits an empty chunk -> endless loop
            # (verified: "a large red circle a small blue" hangs). 1 = always split at the chunk edge,
            # so the first chunk is exactly diffusers' truncation.
            self.max_word_length = 1

        def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
            # ComfyUI splits long prompts into several max_length chunks (context 16, 24, ...); diffusers'
            # encode_prompt (the CLI) truncates to one. Keep the first chunk, as the CLI does.
            chunks = super().tokenize_with_weights(text, return_word_ids, **kwargs)
            if len(chunks) > 1:
                logging.warning("shapes text encoder: prompt longer than %d tokens, truncated", max_length)
            return chunks[:1]

    # the SD1 wrappers give the {name: tokens} dict that comfy.sd.CLIP / CLIPTextEncode pass around
    class ShapesTokenizer(comfy.sd1_clip.SD1Tokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):  # noqa: B006
            super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data,
                             name="shapes", tokenizer=ShapesSDTokenizer)

    class ShapesClip(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006
            super().__init__(device=device, dtype=dtype, model_options=model_options, name="shapes",
                             clip_model=ShapesClipModel)

    return comfy.supported_models_base.ClipTarget(ShapesTokenizer, ShapesClip)


def load_shapes_clip(folder, dtype=torch.float32):
    folder = Path(folder)
    # ComfyUI keeps text encoders in fp16 by default (model_management.text_encoder_dtype), which moves the
    # conditioning by ~2e-3 here; the model is tiny, so keep float32 unless told otherwise
    clip = comfy.sd.CLIP(make_clip_target(folder), model_options={"dtype": dtype})
    sd = comfy.utils.load_torch_file(str(folder / "text_encoder" / "model.safetensors"))
    if not any(k.startswith("text_model.") for k in sd):   # transformers 5 saves CLIPTextModel without it
        sd = {"text_model." + k: v for k, v in sd.items()}
    missing, unexpected = clip.load_sd(sd)
    # text_projection is unused (layer "last", unprojected pooled); position_ids buffers are leftovers
    missing = [k for k in missing if k != "text_projection.weight"]
    if missing:
        raise ValueError(f"shapes text encoder: missing {missing}")
    proj = clip.cond_stage_model.shapes.transformer.text_projection.weight
    with torch.no_grad():   # keep the unused projection finite (comfy.ops leaves it uninitialised)
        proj.copy_(torch.eye(proj.shape[0], dtype=proj.dtype))
    return clip


# ----------------------------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------------------------
def load_pixel_vae():
    """ComfyUI's own pixel-space VAE (what VAELoader's "pixel_space" entry builds): encode = IMAGE*2−1
    as [B,3,H,W], decode = clamp((x+1)/2) as [B,H,W,3]; downscale_ratio 1, latent_channels 3."""
    return comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})


def clip_denoised(patcher, limit=1.0):
    """The CLI samples with DDPMScheduler(thresholding=True, sample_max_value=1) = x0 clamped to [-1, 1] each
    step. Without it, every sampler that starts at sigma_max (t=999, sigma 20291: normal, simple, karras,
    sgm_uniform, ddpm, ...) returns noise on this model; only ddim_uniform (starts at t=961) survives."""
    patcher = patcher.clone()
    patcher.set_model_sampler_post_cfg_function(lambda args: args["denoised"].clamp(-limit, limit))
    return patcher


def load_shapes(folder, clamp=True):
    model = load_shapes_model(folder)
    return (clip_denoised(model) if clamp else model), load_shapes_clip(folder), load_pixel_vae()
