"""Tiny SD1-, SDXL-, Flux- and SD3-shaped diffusers pipelines built from configs (random weights, no downloads).

They exercise every code path of the real architectures in milliseconds: tests use them, and the
CLI's main job runs on one until the project's own shapes model ships.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

WORDS = (
    "a an the photo of person man woman male female old young very child baby elderly happy sad "
    "smiling face portrait dog cat car house tree red green blue yellow large small big tiny "
    "circle square triangle shape winter summer snow sunny day night with and in on"
).split()
MAX_TOKENS = 16


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS; unknown words map to [UNK]."""
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]",
        eos_token="[EOS]", model_max_length=MAX_TOKENS)


def _text_encoder(hidden: int, projection: int | None, seed: int):
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(WORDS) + 4, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=MAX_TOKENS, pad_token_id=0, bos_token_id=2,
        eos_token_id=3, projection_dim=projection or hidden)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _vae(seed: int, latent_channels: int = 4, **config) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=32, **config)


def _scheduler() -> DDIMScheduler:
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def tiny_sd1_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    return StableDiffusionPipeline(
        vae=_vae(seed + 1), text_encoder=_text_encoder(32, None, seed + 2), tokenizer=word_tokenizer(),
        unet=unet, scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8, use_linear_projection=True,
        transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32)
    return StableDiffusionXLPipeline(
        vae=_vae(seed + 1), text_encoder=_text_encoder(32, None, seed + 2),
        text_encoder_2=_text_encoder(32, 32, seed + 3), tokenizer=word_tokenizer(), tokenizer_2=word_tokenizer(),
        unet=unet, scheduler=_scheduler())


# Flux: 2 double- and 2 single-stream blocks, 2 heads of 32 (rope axes 8 + 12 + 12), 16 latent channels in
# 2×2 patches; a CLIP (pooled vector) and a T5 (context), as the real one
TINY_FLUX_TRANSFORMER = {"patch_size": 1, "in_channels": 64, "num_layers": 2, "num_single_layers": 2,
                         "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 32,
                         "pooled_projection_dim": 32, "axes_dims_rope": (8, 12, 12)}


def _t5(seed: int, width: int = 32) -> T5EncoderModel:
    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=len(WORDS) + 4, d_model=width, d_kv=8, d_ff=2 * width, num_layers=1,
                                   num_heads=2, pad_token_id=0, eos_token_id=3, decoder_start_token_id=0))


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True) -> FluxPipeline:
    """Flux-dev shaped (guidance input); `guidance_embeds=False`: schnell shaped."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER, guidance_embeds=guidance_embeds)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                                max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    return FluxPipeline(
        transformer=transformer, scheduler=scheduler,
        vae=_vae(seed + 1, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=_text_encoder(32, None, seed + 2), tokenizer=word_tokenizer(),
        text_encoder_2=_t5(seed + 3), tokenizer_2=word_tokenizer())


def tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """SD3 shaped: MMDiT of 2 joint blocks, as many heads of 64 (every SD3's rule, which ComfyUI's key map
    relies on), two CLIPs (pooled 32 + 32), no T5 (SD3 runs without it)."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=64,
        num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=128, pooled_projection_dim=64,
        pos_embed_max_size=32)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(seed + 1, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=_text_encoder(32, 32, seed + 2), tokenizer=word_tokenizer(),
        text_encoder_2=_text_encoder(32, 32, seed + 3), tokenizer_2=word_tokenizer(),
        text_encoder_3=None, tokenizer_3=None)


def save_tiny_model(kind: str, folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny pipeline as a normal diffusers folder (the loaders then treat it like a real one)."""
    builders = {"sd1": tiny_sd1_pipeline, "sdxl": tiny_sdxl_pipeline, "flux": tiny_flux_pipeline,
                "sd3": tiny_sd3_pipeline}
    if kind not in builders:
        raise ValueError(f"kind must be one of {sorted(builders)}")
    folder = Path(folder)
    builders[kind](seed).save_pretrained(folder)
    return folder
