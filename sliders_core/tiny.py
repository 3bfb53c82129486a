"""Tiny SD1- and SDXL-shaped diffusers pipelines built from configs (random weights, no downloads).

They exercise every code path of the real architectures in milliseconds: tests use them, and the
CLI's main job runs on one until the project's own shapes model ships.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerFast

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


def _vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=32)


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


def save_tiny_model(kind: str, folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny pipeline as a normal diffusers folder (the loaders then treat it like a real one)."""
    builders = {"sd1": tiny_sd1_pipeline, "sdxl": tiny_sdxl_pipeline}
    if kind not in builders:
        raise ValueError(f"kind must be one of {sorted(builders)}")
    folder = Path(folder)
    builders[kind](seed).save_pretrained(folder)
    return folder
