"""The shapes model: a small text-conditioned pixel-space diffusion model in diffusers components.

It is a normal ``StableDiffusionPipeline`` folder (tokenizer, CLIP text encoder, UNet, scheduler)
with ``vae``/``safety_checker``/``feature_extractor`` null, plus ``sliders_model.json``
{"family": "shapes"}. ``scripts/train_shapes_model.py`` trains it from scratch on CPU and writes
the shipped folder ``models/shapes-v1``; ``scripts/eval_shapes_model.py`` measures how well it obeys
its prompts.

Design (see shared/SHAPES.md for the feasibility trial this improves on):
- Pixel space, 32x32 RGB, no VAE. The images are 3 KB of flat colour: a VAE would add parameters,
  training time and its own reconstruction error (hue, edge sharpness: exactly what the metrics
  measure) to save nothing at this size. The backend treats a missing VAE as ``latent_factor`` 1.
- Word-level tokenizer over ``caption_vocabulary()`` (11 words + 4 specials), max 8 tokens;
  ``[BOS] a large red circle [EOS] [PAD] [PAD]``.
- Text encoder: ``CLIPTextModel`` hidden 64, 2 layers, 4 heads, MLP 128, trained jointly.
- UNet: ``UNet2DConditionModel`` (32, 64, 64) channels at 32/16/8 px, 1 resnet per block,
  cross-attention at 8x8 and in the mid block only (attention at 16x16 doubled the step time in
  the trial for little gain). Size, colour and shape are global attributes, so the text also
  reaches every resnet through the time embedding: ``addition_embed_type="text"`` attention-pools
  the text states into the time embedding, and ``resnet_time_scale_shift="scale_shift"`` applies
  it as FiLM (~30 K parameters). Cross-attention is kept so attention-layer sliders (the
  reference's targets) have leverage. 1.51 M UNet + 0.07 M text parameters, 6.4 MB fp32.
- Scheduler: DDPM, cosine (squaredcos_cap_v2), epsilon prediction, 1000 steps. DDPM (ancestral)
  sampling beat DDIM for this model in the trial (DDIM left visible noise).
- Training: from scratch with the weight on high noise (size, colour, layout), then fine-tuned on the
  middle band of noise levels, where circle and square part ways (see scripts/train_shapes_model.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from .data import caption_vocabulary

FAMILY = "shapes"
FAMILY_FILE = "sliders_model.json"  # same name as backends.diffusers_backend.FAMILY_FILE
RESOLUTION = 32
MAX_TOKENS = 8
SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
TEXT_HIDDEN = 64

# Sampler defaults measured by scripts/eval_shapes_model.py on the shipped model (288 full prompts,
# size / colour / shape): 25 steps CFG 3: .941 / 1.0 / 1.0; 25/5: .917 / 1.0 / 1.0; 50/5: .920 / 1.0 / .993.
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 3.0

SHAPES_MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "shapes-v1"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word level over the caption vocabulary; unknown words map to [UNK]; [BOS] ... [EOS]."""
    vocab = {w: i for i, w in enumerate([*SPECIALS, *caption_vocabulary()])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]",
        eos_token="[EOS]", model_max_length=MAX_TOKENS)


def text_encoder_config() -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(SPECIALS) + len(caption_vocabulary()), hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        projection_dim=TEXT_HIDDEN)


def unet_config() -> dict:
    return dict(
        sample_size=RESOLUTION, in_channels=3, out_channels=3,
        block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=4,  # diffusers' legacy name: 4 heads
        norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text", addition_embed_type_num_heads=4,
        resnet_time_scale_shift="scale_shift",
    )


def build_scheduler() -> DDPMScheduler:
    # x0 is clamped to [-1, 1] at every step. StableDiffusionPipeline rewrites clip_sample=True to
    # False on load, so the clamp is expressed as dynamic thresholding with its maximum at 1.0
    # (the per-sample threshold s is clamped to [1, 1]: a plain clamp). "trailing" starts at t=999.
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                         prediction_type="epsilon", clip_sample=False, thresholding=True,
                         dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
                         variance_type="fixed_small", timestep_spacing="trailing", steps_offset=1)


def build_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """Fresh (random) model, deterministic for a seed."""
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_encoder_config())
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**unet_config())
    return StableDiffusionPipeline(
        vae=None, text_encoder=text_encoder, tokenizer=build_tokenizer(), unet=unet,
        scheduler=build_scheduler(), safety_checker=None, feature_extractor=None,
        image_encoder=None, requires_safety_checker=False)


def parameter_count(pipe: StableDiffusionPipeline) -> dict[str, int]:
    return {"unet": sum(p.numel() for p in pipe.unet.parameters()),
            "text_encoder": sum(p.numel() for p in pipe.text_encoder.parameters())}


def save_shapes_pipeline(folder: str | Path, pipe: StableDiffusionPipeline | None = None, *,
                         fp16: bool = False, metadata: dict | None = None) -> Path:
    """Write ``pipe`` (a fresh one if None) as a diffusers StableDiffusionPipeline folder plus
    ``sliders_model.json``. Writes into a temporary sibling and renames, so a reader never sees a
    half-written folder."""
    import shutil

    folder = Path(folder)
    pipe = pipe if pipe is not None else build_pipeline()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if fp16:
        pipe.unet.half()
        pipe.text_encoder.half()
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
    finally:
        if fp16:
            pipe.unet.float()
            pipe.text_encoder.float()
    info = {"family": FAMILY, "sample_steps": DEFAULT_STEPS, "sample_guidance": DEFAULT_GUIDANCE, **(metadata or {})}
    (tmp / FAMILY_FILE).write_text(json.dumps(info, indent=2) + "\n")
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


@torch.no_grad()
def sample_images(pipe: StableDiffusionPipeline, prompts: list[str], seeds: list[int], *,
                  steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
                  batch: int = 64) -> torch.Tensor:
    """Images [N, H, W, 3] in 0..1, one per (prompt, seed), many prompts per batch, through the
    backend's own sampler (initial noise per seed, step noise from the first seed of each batch).
    Usable on a model in training: the backend freezes what it wraps, so the flags are put back."""
    from ..backends.diffusers_backend import DiffusersDenoiser

    params = [*pipe.unet.parameters(), *pipe.text_encoder.parameters()]
    trainable = [p.requires_grad for p in params]
    try:
        denoiser = DiffusersDenoiser(pipe, family=FAMILY)
        uncond, out = denoiser.encode([""]), []
        for start in range(0, len(prompts), batch):
            chunk, chunk_seeds = prompts[start:start + batch], seeds[start:start + batch]
            noise = torch.cat([denoiser.initial_noise(1, denoiser.default_resolution, torch.Generator().manual_seed(s))
                               for s in chunk_seeds])
            trajectory = denoiser.sample(denoiser.encode(chunk), uncond, guidance=guidance, steps=steps, noise=noise,
                                         generator=torch.Generator().manual_seed(chunk_seeds[0]))
            out.append(denoiser.decode(trajectory.final))
    finally:
        for p, flag in zip(params, trainable):
            p.requires_grad_(flag)
    return torch.cat(out)
