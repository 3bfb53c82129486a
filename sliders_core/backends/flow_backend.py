"""Denoiser over diffusers flow-matching transformers: Flux (dev, schnell) and SD3 / SD3.5.

The state is the latent x_t = (1 − σ)·x0 + σ·ε and the model predicts the velocity ε − x0. Levels
are the scheduler's timesteps (σ·1000), the unit both pipelines sample in. Flux is guidance
distilled: it runs without CFG, dev with its guidance as an input; SD3 samples with CFG. Latents
stay image shaped [B, C, H, W] for the core; Flux's 2×2 token packing happens inside `predict`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from ..config import classify_diffusers_dit_module
from ..denoiser import Cond
from ..errors import SliderError
from ..formats import UnetNaming, flux_host_names, mmdit_host_names
from .diffusers_backend import PipelineDenoiser
from .peft_sliders import PeftSliderHost

FLUX_GUIDANCE = 3.5  # Flux-dev's distilled guidance when none is given (the ComfyUI backend's default too)
MAX_SEQUENCE_LENGTH = {"flux": 512, "sd3": 256}  # the pipelines' T5 token defaults


def detect_flow_family(transformer, is_flux: bool) -> str:
    """The family names the ComfyUI backend gives the same checkpoints, so their sliders are shared."""
    cfg = transformer.config
    width = cfg.attention_head_dim * cfg.num_attention_heads
    if is_flux:
        kind = "flux" if cfg.guidance_embeds else "flux-schnell"
        if (cfg.num_layers, cfg.num_single_layers, width) == (19, 38, 3072):
            return kind
        return f"{kind}-custom-h{width}-d{cfg.num_layers}-s{cfg.num_single_layers}"
    if width in (1536, 2432) and cfg.joint_attention_dim == 4096:  # SD3 Medium, SD3.5 Medium / Large
        return "sd3"
    return f"sd3-custom-h{width}-d{cfg.num_layers}"


class FlowDenoiser(PipelineDenoiser):
    def __init__(self, pipe: FluxPipeline | StableDiffusion3Pipeline, family: str | None = None,
                 sample_defaults: dict | None = None):
        if not isinstance(pipe, (FluxPipeline, StableDiffusion3Pipeline)):
            raise SliderError(f"FlowDenoiser takes a FluxPipeline or StableDiffusion3Pipeline, got {type(pipe).__name__}")
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.is_flux = isinstance(pipe, FluxPipeline)
        self._freeze(pipe, self.transformer, sample_defaults)
        self.family = family or detect_flow_family(self.transformer, self.is_flux)
        self.sliders = PeftSliderHost(self.transformer, classify=classify_diffusers_dit_module)
        # files on the original names (ComfyUI's, kohya's: as ComfyUI trains them): whole layers aliased, the
        # fused ones split into diffusers' layers; other Flux forms (XLabs, …) through diffusers' converter
        cfg = self.transformer.config
        width = cfg.attention_head_dim * cfg.num_attention_heads
        if self.is_flux:
            mlp_width = self.transformer.single_transformer_blocks[0].proj_mlp.out_features
            aliases, splits = flux_host_names(cfg.num_layers, cfg.num_single_layers, width, mlp_width)
        else:
            aliases, splits = mmdit_host_names(cfg.num_layers, width)
        self.naming = UnetNaming(self.sliders.lora_candidates(), weight_shapes=self.sliders.weight_shapes(),
                                 aliases=aliases, splits=splits,
                                 convert=FluxPipeline.lora_state_dict if self.is_flux else None)
        self.latent_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_channels = int(self.vae.config.latent_channels)
        self.patch = 2 if self.is_flux else int(self.transformer.config.patch_size)
        self.image_multiple = self.latent_factor * self.patch
        if self.is_flux:  # Flux has no native size in its config: 1024² for the real one, 16 latent pixels otherwise
            side = 128 if self.family in ("flux", "flux-schnell") else 16
        else:
            side = int(self.transformer.config.sample_size)
        self.default_resolution = side * self.latent_factor
        # Flux-dev takes its guidance as an input and runs without CFG; schnell has none
        self.guidance_input = FLUX_GUIDANCE if self.is_flux and self.transformer.config.guidance_embeds else None
        self.cfg_free = self.is_flux  # guidance distilled
        tokenizer = pipe.tokenizer_2 if self.is_flux else getattr(pipe, "tokenizer_3", None)
        limit = MAX_SEQUENCE_LENGTH["flux" if self.is_flux else "sd3"]
        self.max_sequence_length = min(limit, tokenizer.model_max_length) if tokenizer is not None else limit

    # -- text -----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Cond:
        prompts = list(prompts)
        device = self.pipe.text_encoder.device
        if self.is_flux:
            context, pooled, _ = self.pipe.encode_prompt(
                prompt=prompts, prompt_2=None, device=device, max_sequence_length=self.max_sequence_length)
        else:
            context, _, pooled, _ = self.pipe.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length)
        return Cond({"context": context.to(self.device), "pooled": pooled.to(self.device)})

    # -- model ----------------------------------------------------------------------------------
    def predict(self, x_t: torch.Tensor, level: torch.Tensor, cond: Cond) -> torch.Tensor:
        if len(cond) != x_t.shape[0] or level.shape != (x_t.shape[0],):
            raise ValueError(f"batch mismatch: x {tuple(x_t.shape)}, level {tuple(level.shape)}, cond {len(cond)}")
        device, dtype = self._device, self._dtype
        b, c, h, w = x_t.shape
        context, pooled = cond.tensors["context"].to(dtype), cond.tensors["pooled"].to(dtype)
        self.forward_count += b
        if not self.is_flux:
            out = self.transformer(hidden_states=x_t.to(dtype), timestep=level.to(device), encoder_hidden_states=context,
                                   pooled_projections=pooled, return_dict=False)[0]
            return out.float()
        tokens = FluxPipeline._pack_latents(x_t.to(dtype), b, c, h, w)
        guidance = None if self.guidance_input is None else torch.full((b,), self.guidance_input, device=device)
        out = self.transformer(
            hidden_states=tokens, timestep=(level.to(device) / 1000).to(dtype), guidance=guidance,
            pooled_projections=pooled, encoder_hidden_states=context,
            txt_ids=torch.zeros(context.shape[1], 3, device=device, dtype=dtype),
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype), return_dict=False)[0]
        f = self.latent_factor
        return FluxPipeline._unpack_latents(out, h * f, w * f, f).float()

    def initial_noise(self, batch: int, resolution: int, generator: torch.Generator) -> torch.Tensor:
        multiple = self.image_multiple
        if resolution < multiple or resolution % multiple:
            raise SliderError(f"resolution {resolution} must be a positive multiple of {multiple} for this model")
        side = resolution // self.latent_factor
        return torch.randn((batch, self.latent_channels, side, side), generator=generator).to(self.device)

    # -- the flow schedule ------------------------------------------------------------------------
    def new_scheduler(self, steps: int, noise: torch.Tensor | None = None) -> FlowMatchEulerDiscreteScheduler:
        """The pipeline's own schedule: Flux shifts it by the image's token count (its `mu`; the native
        size's when no noise is given), SD3 by a constant. Sampled with Euler on the flow: SD3 with CFG,
        Flux without (`cfg_free`), dev at its distilled guidance input."""
        scheduler = self.pipe.scheduler.__class__.from_config(self.pipe.scheduler.config)
        if not scheduler.config.get("use_dynamic_shifting", False):
            scheduler.set_timesteps(steps, device=self.device)
            return scheduler
        side = noise.shape[-1] if noise is not None else self.default_resolution // self.latent_factor
        tokens = (side // self.patch) ** 2
        cfg = scheduler.config
        mu = calculate_shift(tokens, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu, device=self.device)
        return scheduler

    def _sigma(self, level: torch.Tensor) -> torch.Tensor:
        return (level.to(self._device).float() / 1000).view(-1, 1, 1, 1)

    def random_levels(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        # σ uniform in (0, 1]: the flow analogue of uniform DDPM timesteps (no shift, no logit-normal weighting)
        return ((1 - torch.rand(batch, generator=generator)) * 1000).to(self.device)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        sigma = self._sigma(level)
        return (1 - sigma) * x0.float() + sigma * noise.float()

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        return noise.float() - x0.float()

    # -- deterministic steps (the flow ODE is already deterministic: Euler both ways) ------------
    def ddim_levels(self, steps: int) -> torch.Tensor:
        """The sampling schedule at the native resolution, then 0 (the clean image)."""
        if steps < 1:
            raise SliderError(f"steps must be ≥ 1, got {steps}")
        timesteps = self.new_scheduler(steps).timesteps.float().cpu()
        return torch.cat([timesteps, torch.zeros(1)])

    def state_at(self, x: torch.Tensor, level: torch.Tensor, new_level: torch.Tensor) -> torch.Tensor:
        return x

    def ddim_step(self, x: torch.Tensor, output: torch.Tensor, level: torch.Tensor,
                  next_level: torch.Tensor) -> torch.Tensor:
        return x.float() + (self._sigma(next_level) - self._sigma(level)) * output.float()

    def model_signature(self) -> list[float]:
        first = "x_embedder" if self.is_flux else "pos_embed.proj"
        return [float(self.transformer.get_submodule(m).weight.detach().double().norm()) for m in (first, "proj_out")]
