"""Denoiser over diffusers components: SD1.x/SD2 (one CLIP encoder) and SDXL (two, pooled + time ids).

Loads a local diffusers folder or a single-file checkpoint strictly offline. Pixel-space models
(no VAE, e.g. the project's shapes model) are supported too.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FluxPipeline,
    SchedulerMixin,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tqdm.auto import tqdm

from ..denoiser import Cond, SampleCallback, SliderSchedule, Trajectory
from ..errors import SliderError
from ..formats import UnetNaming
from .peft_sliders import PeftSliderHost

# optional {"family": "...", "sample_steps": N, "sample_guidance": G} in a model folder
FAMILY_FILE = "sliders_model.json"


def detect_family(unet: UNet2DConditionModel, is_xl: bool) -> str:
    cfg = unet.config
    if is_xl or cfg.get("addition_embed_type") == "text_time":
        return "sdxl" if cfg.cross_attention_dim == 2048 and cfg.sample_size == 128 else _fingerprint("sdxl", cfg)
    standard = {(768, 64): "sd1", (1024, 64): "sd2", (1024, 96): "sd2"}
    if tuple(cfg.block_out_channels) == (320, 640, 1280, 1280):
        family = standard.get((cfg.cross_attention_dim, cfg.sample_size))
        if family:
            return family
    return _fingerprint("sd", cfg)


def _fingerprint(kind: str, cfg) -> str:
    """A stable name for non-standard (tiny/custom) UNets so their sliders still refuse other models."""
    channels = "-".join(str(c) for c in cfg.block_out_channels)
    return f"{kind}-custom-c{channels}-x{cfg.cross_attention_dim}-in{cfg.in_channels}"


TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


class PipelineDenoiser:
    """What the UNet and the flow-transformer denoisers share: a frozen diffusers pipeline around one
    network, its device and dtype read once, gradient checkpointing, text-encoder offloading, the
    sampling loop, and images to and from latents. Subclasses give `predict`, `new_scheduler(steps,
    noise)`, `cfg_free`, `vae` and `image_multiple` (the side an image to encode must divide by)."""

    cfg_free = False  # guidance-distilled models (Flux) are sampled without CFG

    def _freeze(self, pipe, network: torch.nn.Module, sample_defaults: dict | None) -> None:
        self.pipe, self.network = pipe, network
        self.forward_count = 0  # single-sample network forwards, for the benchmarks
        # sampler settings the model was tuned for ({"steps": .., "guidance": ..}; sliders_model.json)
        self.sample_defaults = dict(sample_defaults or {})
        network.requires_grad_(False)
        # read once: in diffusers 0.42 `.device`/`.dtype` scan every module (≈1–3 ms a read, ≈20 % of a
        # training iteration on small models); the network is never moved after construction
        self._device, self._dtype = network.device, network.dtype
        for part in (*TEXT_ENCODERS, "vae"):
            if getattr(pipe, part, None) is not None:
                getattr(pipe, part).requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @contextlib.contextmanager
    def gradient_checkpointing(self) -> Iterator[None]:
        self.network.enable_gradient_checkpointing()
        try:
            yield
        finally:
            self.network.disable_gradient_checkpointing()

    def offload_text_encoders(self) -> None:
        """Move the text encoders to the CPU once training has encoded its prompts (the reference kept
        SDXL's two encoders on the GPU for the whole run). encode() still works, on the CPU."""
        for part in TEXT_ENCODERS:
            if getattr(self.pipe, part, None) is not None:
                getattr(self.pipe, part).to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @torch.no_grad()
    def sample(self, cond: Cond, uncond: Cond | Sequence[Cond], *, guidance: float, steps: int,
               noise: torch.Tensor, slider_schedule: SliderSchedule | None = None,
               record: bool = False, generator: torch.Generator | None = None,
               progress: bool = False, callback: SampleCallback | None = None) -> Trajectory:
        """CFG sampling with the pipeline's scheduler (no CFG, and `uncond` unused, when `cfg_free`)."""
        scheduler = self.new_scheduler(steps, noise)
        timesteps = scheduler.timesteps
        per_step = not isinstance(uncond, Cond)
        if per_step and len(uncond) != len(timesteps):
            raise SliderError(f"{len(uncond)} unconditional embeddings for {len(timesteps)} steps")
        batch = noise.shape[0]
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        scale_input = getattr(scheduler, "scale_model_input", lambda x, t: x)  # flow schedulers have none
        x = noise.to(self.device).float() * getattr(scheduler, "init_noise_sigma", 1.0)  # flows start at the noise
        trajectory = Trajectory(final=x)
        for i, t in enumerate(tqdm(timesteps, desc="sampling", disable=not progress, leave=False)):
            if slider_schedule is not None:
                scales = slider_schedule(i, len(timesteps))
                if scales is not None:
                    self.sliders.set_scales(scales)
            x_in = scale_input(x, t)
            level = t.expand(batch)
            c = cond.for_batch(batch)
            if guidance == 1.0 or self.cfg_free:
                out = out_c = self.predict(x_in, level, c)
            else:
                u = (uncond[i] if per_step else uncond).for_batch(batch)
                both = self.predict(torch.cat([x_in, x_in]), torch.cat([level, level]), Cond.cat([u, c]))
                out_u, out_c = both.chunk(2)
                out = out_u + guidance * (out_c - out_u)
            if record:
                trajectory.states.append(x_in.detach().clone())
                trajectory.levels.append(level.detach().clone())
                trajectory.cond_outputs.append(out_c.detach().clone())
            x = scheduler.step(out.to(x.dtype), t, x, **step_kwargs).prev_sample
            if callback is not None:
                callback(i + 1, len(timesteps))
        trajectory.final = x
        return trajectory


    # -- images ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, H, W, 3] in 0..1 → the latents `decode` inverts (the VAE posterior mean, shifted and
        scaled as the pipeline does; pixel models: the image in −1..1)."""
        x = images[..., :3].permute(0, 3, 1, 2).float().to(self._device) * 2 - 1
        if self.vae is None:
            return x
        if x.shape[-1] % self.image_multiple or x.shape[-2] % self.image_multiple:
            raise SliderError(f"image size {tuple(x.shape[-2:])} must be a multiple of {self.image_multiple}")
        cfg = self.vae.config
        # a few images at a time: a VAE encoder at 1024² holds several GB of activations per image
        latents = torch.cat([self.vae.encode(chunk.to(self.vae.dtype)).latent_dist.mean for chunk in x.split(4)])
        return (latents.float() - (cfg.get("shift_factor") or 0.0)) * cfg.scaling_factor

    def decode(self, latents: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            if self.vae is not None:
                cfg = self.vae.config
                latents = latents.to(self.vae.dtype) / cfg.scaling_factor + (cfg.get("shift_factor") or 0.0)
                images = self.vae.decode(latents).sample
            else:
                images = latents
            images = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        return images if differentiable else images.cpu()


class DiffusersDenoiser(PipelineDenoiser):
    def __init__(self, pipe: StableDiffusionPipeline | StableDiffusionXLPipeline, family: str | None = None,
                 sample_defaults: dict | None = None):
        self.unet: UNet2DConditionModel = pipe.unet
        self.vae: AutoencoderKL | None = getattr(pipe, "vae", None)
        self.is_xl = isinstance(pipe, StableDiffusionXLPipeline)
        self._freeze(pipe, self.unet, sample_defaults)
        if self._device.type == "cpu":  # oneDNN convolutions run faster on NHWC weights (measured 3–20 % here)
            self.unet.to(memory_format=torch.channels_last)
        self.family = family or detect_family(self.unet, self.is_xl)
        self.sliders = PeftSliderHost(self.unet)
        self.naming = UnetNaming(self.sliders.lora_candidates(), dict(self.unet.config),
                                 weight_shapes=self.sliders.weight_shapes())
        self.latent_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        self.image_multiple = self.latent_factor
        self.default_resolution = int(self.unet.config.sample_size) * self.latent_factor

    # -- text -----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Cond:
        prompts = list(prompts)
        device = self.pipe.text_encoder.device  # may be offloaded (see offload_text_encoders)
        if self.is_xl:
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
            return Cond({"context": embeds.to(self.device), "text_embeds": pooled.to(self.device)})
        embeds, _ = self.pipe.encode_prompt(prompts, device, 1, False)
        return Cond({"context": embeds.to(self.device)})

    # -- model ----------------------------------------------------------------------------------
    def predict(self, x_t: torch.Tensor, level: torch.Tensor, cond: Cond) -> torch.Tensor:
        if len(cond) != x_t.shape[0] or level.shape != (x_t.shape[0],):
            raise ValueError(f"batch mismatch: x {tuple(x_t.shape)}, level {tuple(level.shape)}, cond {len(cond)}")
        kwargs = {}
        device, dtype = self._device, self._dtype
        if self.is_xl:
            h, w = (s * self.latent_factor for s in x_t.shape[-2:])
            # square training/sampling without crops: original = target size, crop (0, 0)
            time_ids = torch.tensor([h, w, 0, 0, h, w], device=device, dtype=dtype)
            kwargs["added_cond_kwargs"] = {"text_embeds": cond.tensors["text_embeds"].to(dtype),
                                           "time_ids": time_ids.expand(x_t.shape[0], 6)}
        self.forward_count += x_t.shape[0]
        out = self.unet(x_t.to(dtype), level.to(device),
                        encoder_hidden_states=cond.tensors["context"].to(dtype), **kwargs).sample
        return out.float()

    def initial_noise(self, batch: int, resolution: int, generator: torch.Generator) -> torch.Tensor:
        multiple = self.latent_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if resolution < multiple or resolution % multiple:
            raise SliderError(f"resolution {resolution} must be a positive multiple of {multiple} for this model")
        side = resolution // self.latent_factor
        shape = (batch, self.unet.config.in_channels, side, side)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)

    # -- training on given images ----------------------------------------------------------------
    # Discrete-time (DDPM-family) models: the UNet input is the variance-preserving x_t at timestep t
    # whatever sampler is used (scale_model_input maps Euler's σ-space back to it).
    def _alpha_bar(self, level: torch.Tensor) -> torch.Tensor:
        alphas = getattr(self.pipe.scheduler, "alphas_cumprod", None)
        if alphas is None:
            raise SliderError(f"{type(self.pipe.scheduler).__name__} has no discrete noise schedule; "
                              "training on images needs a DDPM-family scheduler")
        return alphas.to(self.device)[level.long().to(self.device)].float().view(-1, 1, 1, 1)

    def random_levels(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        steps = int(self.pipe.scheduler.config.num_train_timesteps)
        return torch.randint(0, steps, (batch,), generator=generator).to(self.device)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        a = self._alpha_bar(level)
        return a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        kind = self.pipe.scheduler.config.get("prediction_type", "epsilon")
        if kind == "epsilon":
            return noise.float()
        if kind == "v_prediction":
            a = self._alpha_bar(level)
            return a.sqrt() * noise.float() - (1 - a).sqrt() * x0.float()
        if kind == "sample":
            return x0.float()
        raise SliderError(f"unknown prediction_type {kind!r}")

    def new_scheduler(self, steps: int, noise: torch.Tensor | None = None) -> SchedulerMixin:
        scheduler = self.pipe.scheduler.__class__.from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(steps, device=self.device)
        return scheduler

    # -- deterministic sampling and its inversion ---------------------------------------------------
    def ddim_levels(self, steps: int) -> torch.Tensor:
        """DDIM timesteps with 'leading' spacing and the config's offset (the reference's: 981 … 1 for SD
        at 50 steps), then −1 for the clean end (ᾱ = 1, or ᾱ_0 when set_alpha_to_one = false, as DDIM).
        Not 'trailing': its first level t = 999 has ᾱ ≈ 0 on zero-terminal-SNR-like schedules (2.5e-6 on
        the shapes model's cosine), where a DDIM step divides by √ᾱ and inversion cannot come back."""
        if steps < 1:
            raise SliderError(f"steps must be ≥ 1, got {steps}")
        scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config, timestep_spacing="leading")
        scheduler.set_timesteps(steps)
        return torch.cat([scheduler.timesteps.long(), torch.tensor([-1])])

    def _ddim_alpha_bar(self, level: torch.Tensor) -> torch.Tensor:
        level = level.to(self._device).view(-1, 1, 1, 1)
        alphas = self._alpha_bar(level.clamp(min=0).flatten()).view(-1, 1, 1, 1)
        to_one = self.pipe.scheduler.config.get("set_alpha_to_one", True)
        clean = torch.ones_like(alphas) if to_one else self._alpha_bar(torch.zeros(1, dtype=torch.long))
        return torch.where(level < 0, clean, alphas)

    def state_at(self, x: torch.Tensor, level: torch.Tensor, new_level: torch.Tensor) -> torch.Tensor:
        return x  # the UNet input x_t is variance preserving at every level

    def ddim_step(self, x: torch.Tensor, output: torch.Tensor, level: torch.Tensor,
                  next_level: torch.Tensor) -> torch.Tensor:
        a, a_next = self._ddim_alpha_bar(level), self._ddim_alpha_bar(next_level)
        x, output = x.float(), output.float()
        kind = self.pipe.scheduler.config.get("prediction_type", "epsilon")
        if kind == "epsilon":
            eps, x0 = output, (x - (1 - a).sqrt() * output) / a.sqrt()
        elif kind == "v_prediction":
            eps, x0 = a.sqrt() * output + (1 - a).sqrt() * x, a.sqrt() * x - (1 - a).sqrt() * output
        elif kind == "sample":
            eps, x0 = (x - a.sqrt() * output) / (1 - a).sqrt(), output
        else:
            raise SliderError(f"unknown prediction_type {kind!r}")
        return a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps

    def model_signature(self) -> list[float]:
        return [float(self.unet.get_submodule(m).weight.detach().double().norm()) for m in ("conv_in", "conv_out")]


# ---------------------------------------------------------------------------------------------
# loading, strictly offline
# ---------------------------------------------------------------------------------------------
_REQUIRED = {
    "StableDiffusionPipeline": ("unet", "text_encoder", "tokenizer", "scheduler"),
    "StableDiffusionXLPipeline": ("unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
    # flow transformers (backends/flow_backend.py); SD3's T5 (text_encoder_3) is optional, as in diffusers
    "FluxPipeline": ("transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler", "vae"),
    "StableDiffusion3Pipeline": ("transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                                 "scheduler", "vae"),
}
_FLOW_PIPELINES = {"FluxPipeline": FluxPipeline, "StableDiffusion3Pipeline": StableDiffusion3Pipeline}


def load_diffusers_model(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                         config: str | Path | None = None, family: str | None = None):
    """A diffusers folder (model_index.json) or a single-file .safetensors/.ckpt checkpoint, offline →
    a DiffusersDenoiser (UNet families) or a FlowDenoiser (Flux, SD3 folders)."""
    path = Path(path)
    if not path.exists():
        raise SliderError(f"model not found: {path}")
    defaults = {}
    if path.is_dir():
        pipe = _load_folder(path, dtype)
        family_file = path / FAMILY_FILE
        if family_file.is_file():
            info = json.loads(family_file.read_text())
            family = family or info.get("family")
            defaults = {k: info[f"sample_{k}"] for k in ("steps", "guidance") if f"sample_{k}" in info}
    else:
        pipe = _load_single_file(path, dtype, config)
    if isinstance(pipe, tuple(_FLOW_PIPELINES.values())):
        from .flow_backend import FlowDenoiser

        return FlowDenoiser(pipe.to(device), family=family, sample_defaults=defaults)
    return DiffusersDenoiser(pipe.to(device), family=family, sample_defaults=defaults)


def _load_folder(path: Path, dtype: torch.dtype):
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise SliderError(f"{path} is not a diffusers model folder: model_index.json is missing")
    index = json.loads(index_file.read_text())
    class_name = index.get("_class_name")
    if class_name not in _REQUIRED:
        raise SliderError(f"{path}: pipeline {class_name!r} is not supported; "
                          f"expected one of {sorted(_REQUIRED)}")
    missing = [part for part in _REQUIRED[class_name] if not (path / part).is_dir()]
    if "vae" in index and index["vae"][0] is not None and not (path / "vae").is_dir():
        missing.append("vae")
    if missing:
        raise SliderError(f"{path}: the model folder is missing {missing}; copy the complete diffusers "
                          "folder (nothing can be downloaded)")
    cls = _FLOW_PIPELINES.get(class_name) or (
        StableDiffusionXLPipeline if class_name == "StableDiffusionXLPipeline" else StableDiffusionPipeline)
    extra = {"safety_checker": None, "requires_safety_checker": False} if cls is StableDiffusionPipeline else {}
    if class_name == "StableDiffusion3Pipeline" and index.get("text_encoder_3", [None])[0] is None:
        extra.update(text_encoder_3=None, tokenizer_3=None)
    if index.get("vae", [None])[0] is None:
        extra["vae"] = None  # pixel-space model (e.g. the shapes model): diffusers needs it passed explicitly
    try:
        return cls.from_pretrained(path, local_files_only=True, **_dtype_kwargs(dtype), **extra)
    except (OSError, ValueError) as exc:
        raise SliderError(f"{path}: could not load the model offline ({exc})") from exc


def _dtype_kwargs(dtype: torch.dtype) -> dict:
    # float32 is the default; the keyword is being renamed across diffusers versions, so pass it only when needed
    return {} if dtype == torch.float32 else {"torch_dtype": dtype}


def _load_single_file(path: Path, dtype: torch.dtype, config: str | Path | None):
    if path.suffix not in (".safetensors", ".ckpt"):
        raise SliderError(f"{path.name}: expected a diffusers folder or a .safetensors/.ckpt checkpoint")
    is_xl = _checkpoint_is_xl(path)
    cls = StableDiffusionXLPipeline if is_xl else StableDiffusionPipeline
    if config is None:
        raise SliderError(
            f"{path.name}: a single-file checkpoint needs the matching diffusers config offline; pass "
            f"config=<a local diffusers folder of the same architecture ({'SDXL' if is_xl else 'SD1/SD2'})>")
    try:
        return cls.from_single_file(str(path), config=str(config), local_files_only=True, **_dtype_kwargs(dtype))
    except Exception as exc:  # diffusers raises many types here; all mean the same to the user
        raise SliderError(f"{path.name}: could not load the checkpoint offline with config {config} ({exc})") from exc


def _checkpoint_is_xl(path: Path) -> bool:
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
        except Exception as exc:
            raise SliderError(f"{path.name}: corrupt or truncated checkpoint ({exc})") from exc
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        keys = list(state.get("state_dict", state))
    return any(k.startswith("conditioner.embedders.1") for k in keys)
