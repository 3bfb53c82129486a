"""The core's Denoiser and SliderHost over ComfyUI's own objects: a MODEL (ModelPatcher) and a CLIP.

The only module of the pack that knows ComfyUI internals. Sliders live on a clone of the graph's
ModelPatcher as weight wrappers (the host's `add_weight_wrapper` machinery, applied in
`comfy.ops.cast_bias_weight` on every forward), each with its own scale read from one shared dict,
so α changes per step without re-patching. Noise levels are ComfyUI sigmas; `predict` returns
(x − x0)/σ, which is ε for EPS/V models and the velocity for flow models — eq. 8 only ever combines
predictions at one (x_t, σ), so either works.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import comfy.model_management
import comfy.samplers
import comfy.utils
import torch
from comfy.weight_adapter.lora import LoraDiff

from ..sliders_core.config import classify_unet_module
from ..sliders_core.denoiser import Cond, SampleCallback, SliderSchedule, Trajectory
from ..sliders_core.errors import SliderError
from ..sliders_core.formats import UnetNaming
from ..sliders_core.slider_weights import LoraModule, SliderWeights, modules_to_attach

if TYPE_CHECKING:
    from ..sliders_core.inversion import Inversion

_FAMILIES = {"SD15": "sd1", "SD20": "sd2", "SD21UnclipL": "sd2", "SD21UnclipH": "sd2", "SDXL": "sdxl",
             "SDXLRefiner": "sdxl-refiner", "SSD1B": "sdxl-ssd1b", "Segmind_Vega": "sdxl-vega"}
_NATIVE_RESOLUTION = {"sd1": 512, "sd2": 768, "sdxl": 1024}


def model_family(patcher) -> str:
    name = type(patcher.model.model_config).__name__
    return _FAMILIES.get(name, name.lower())


def module_names(patcher) -> dict[str, str]:
    """diffusers module path → LDM module path for every slider-capable layer, from ComfyUI's own map."""
    unet_config = patcher.model.model_config.unet_config
    mapping = comfy.utils.unet_to_diffusers(unet_config)  # diffusers param → LDM param
    modules = dict(patcher.model.diffusion_model.named_modules())
    names = {}
    for diffusers_param, ldm_param in mapping.items():
        if not (diffusers_param.endswith(".weight") and ldm_param.endswith(".weight")):
            continue
        path, ldm = diffusers_param[: -len(".weight")], ldm_param[: -len(".weight")]
        module = modules.get(ldm)
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            names[path] = ldm
    return names


class SliderDiff(LoraDiff):
    """ComfyUI's trainable LoRA weight adapter with a slider multiplier looked up per forward."""

    def __init__(self, up: torch.Tensor, down: torch.Tensor, alpha: float, scales: dict, slider: str):
        super().__init__((up.flatten(1), down.flatten(1), alpha, None, None, None))
        self.scales = scales
        self.slider = slider
        self.down_shape = tuple(down.shape)
        self.up_shape = tuple(up.shape)

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        scale = self.scales.get(self.slider, 0.0)
        if scale == 0.0:
            return w
        diff = self.lora_up.weight @ self.lora_down.weight
        return (w + (scale * self.alpha / self.rank) * diff.reshape(w.shape).to(w.dtype)).to(w.dtype)


def _copy_weight(w: torch.Tensor) -> torch.Tensor:
    """Identity wrapper: its mere presence makes cast_bias_weight copy the (inference-mode) weight."""
    return w


class ComfySliderHost:
    def __init__(self, patcher, names: dict[str, str]):
        self.patcher = patcher
        self.names_map = names
        self._kinds = {p: classify_unet_module(p) for p in names}
        self.scales: dict[str, float] = {}
        self._adapters: dict[str, dict[str, SliderDiff]] = {}
        self.changed = True
        self._trainable: set[str] = set()
        self._identity_wrapped: set[str] = set()

    def lora_candidates(self) -> dict[str, str]:
        return dict(self._kinds)

    def names(self) -> list[str]:
        return list(self._adapters)

    def add(self, name: str, weights: SliderWeights | None = None, *, modules: Sequence[str] = (),
            rank: int = 4, alpha: float = 1.0, trainable: bool = False) -> None:
        modules = modules_to_attach(name, self._adapters, weights, modules, self.names_map)
        diffusion_model = self.patcher.model.diffusion_model
        adapters = {}
        for path in modules:
            ldm = self.names_map[path]
            base = diffusion_model.get_submodule(ldm).weight
            if weights is not None:
                lora = weights.modules[path]
                up, down, module_alpha = lora.up.float(), lora.down.float(), lora.alpha
                if up.shape[0] * down[0].numel() != base.numel():
                    raise SliderError(f"slider weight for {path} does not fit the model's {tuple(base.shape)}: "
                                      "it was made for another model")
            else:  # the peft/kohya initialisation: random down, zero up, so a new slider is a no-op
                down = torch.empty(rank, *base.shape[1:])
                torch.nn.init.kaiming_uniform_(down.view(rank, -1), a=math.sqrt(5))
                up = torch.zeros(base.shape[0], rank, *([1] * (base.dim() - 2)))
                module_alpha = alpha
            adapter = SliderDiff(up, down, module_alpha, self.scales, name).to(base.device)
            adapter.requires_grad_(False)
            for weight in (adapter.lora_up.weight, adapter.lora_down.weight):  # alpha stays fixed
                weight.requires_grad_(trainable)
            adapters[path] = adapter
            self.patcher.add_weight_wrapper(f"diffusion_model.{ldm}.weight", adapter)
        self._adapters[name] = adapters
        self.changed = True  # new weight wrappers take effect only when the patcher is (re)loaded
        if trainable:
            self._trainable.add(name)
            self._wrap_other_weights()

    def wrap_all_weights(self) -> None:
        """Make every weight safe for autograd (see _wrap_other_weights), e.g. for gradients w.r.t. inputs."""
        self._wrap_other_weights()
        self.changed = True

    def _wrap_other_weights(self) -> None:
        """Every other weight gets an identity wrapper so autograd never saves an inference-mode tensor
        (ComfyUI loads weights under inference mode; the wrapper makes cast_bias_weight copy them)."""
        skip = {f"diffusion_model.{self.names_map[p]}.weight" for a in self._adapters.values() for p in a}
        skip |= self._identity_wrapped
        for module_name, module in self.patcher.model.diffusion_model.named_modules():
            if not hasattr(module, "weight_function"):
                continue
            for kind in ("weight", "bias"):
                key = f"diffusion_model.{module_name}.{kind}"
                if getattr(module, kind, None) is not None and key not in skip:
                    self.patcher.add_weight_wrapper(key, _copy_weight)
                    self._identity_wrapped.add(key)

    def remove(self, name: str) -> None:
        if self._adapters.pop(name, None) is None:
            raise SliderError(f"no slider named {name!r}")
        self.scales.pop(name, None)  # its wrappers stay on this clone but multiply by 0
        self._trainable.discard(name)

    def set_scales(self, scales: dict[str, float]) -> None:
        unknown = set(scales) - set(self._adapters)
        if unknown:
            raise SliderError(f"unknown slider(s) {sorted(unknown)}; attached: {self.names()}")
        self.scales.clear()
        self.scales.update({k: float(v) for k, v in scales.items()})

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        saved = dict(self.scales)
        self.scales.clear()
        try:
            yield
        finally:
            self.scales.update(saved)

    def parameters(self, name: str) -> list[torch.nn.Parameter]:
        return [p for a in self._adapters[name].values() for p in (a.lora_down.weight, a.lora_up.weight)]

    def export(self, name: str) -> SliderWeights:
        if name not in self._adapters:
            raise SliderError(f"no slider named {name!r}")
        return SliderWeights({
            path: LoraModule(down=a.lora_down.weight.detach().reshape(a.down_shape).cpu().clone(),
                             up=a.lora_up.weight.detach().reshape(a.up_shape).cpu().clone(),
                             alpha=float(a.alpha))
            for path, a in self._adapters[name].items()})


class ComfyDenoiser:
    """Denoiser (sliders_core.denoiser) over a ComfyUI MODEL and CLIP. Works on a clone of the MODEL."""

    def __init__(self, model, clip=None, vae=None):
        self.patcher = model.clone()
        self.clip = clip
        self.vae = vae
        self.model = self.patcher.model
        self.family = model_family(self.patcher)
        names = module_names(self.patcher)
        self.sliders = ComfySliderHost(self.patcher, names)
        diffusion_model = self.model.diffusion_model
        shapes = {path: tuple(diffusion_model.get_submodule(ldm).weight.shape) for path, ldm in names.items()}
        self.naming = UnetNaming(names, ldm_names=names, weight_shapes=shapes)
        self.default_resolution = _NATIVE_RESOLUTION.get(self.family, 512)
        self.forward_count = 0
        self.ddim_scheduler = "normal"  # the host's sigma schedule for ddim_levels (inversion)
        self._grad_ready = False

    @property
    def device(self) -> torch.device:
        return comfy.model_management.get_torch_device()

    def load(self) -> None:
        """(Re)load the patched model so new weight wrappers take effect (ComfyUI memory management)."""
        comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)
        self.sliders.changed = False

    @contextlib.contextmanager
    def gradient_checkpointing(self) -> Iterator[None]:
        """The host's own activation checkpointing (the one its LoRA trainer uses)."""
        from comfy_extras.nodes_train import find_all_highest_child_module_with_forward, patch, unpatch

        modules = find_all_highest_child_module_with_forward(self.model.diffusion_model)
        for module in modules:
            patch(module)
        try:
            yield
        finally:
            for module in modules:
                unpatch(module)

    def encode(self, prompts: Sequence[str]) -> Cond:
        if self.clip is None:
            raise SliderError("a CLIP is needed to encode prompts")
        contexts, pooled = [], []
        for prompt in prompts:
            cond, pool = self.clip.encode_from_tokens(self.clip.tokenize(prompt), return_pooled=True)
            contexts.append(cond.detach().clone())
            pooled.append(pool.detach().clone() if pool is not None else torch.zeros(1, 1))
        length = math.lcm(*(c.shape[1] for c in contexts))  # long prompts come in 77-token chunks
        contexts = [c.repeat(1, length // c.shape[1], 1) for c in contexts]
        return Cond({"context": torch.cat(contexts), "pooled": torch.cat(pooled)})

    def predict(self, x_t: torch.Tensor, level: torch.Tensor, cond: Cond) -> torch.Tensor:
        if not self._grad_ready and torch.is_grad_enabled() and any(v.requires_grad for v in cond.tensors.values()):
            self.sliders.wrap_all_weights()  # gradients w.r.t. the condition (null-text inversion)
            self._grad_ready = True
        if self.sliders.changed:  # e.g. training on images calls predict() before any sample()
            self.load()
        device, dtype = self.device, self.model.get_dtype()
        x = x_t.to(device)
        sigma = level.to(device)
        kwargs = {}
        if self.model.adm_channels:
            h, w = x.shape[-2] * 8, x.shape[-1] * 8
            kwargs["y"] = self.model.encode_adm(pooled_output=cond.tensors["pooled"].to(device), width=w, height=h,
                                                target_width=w, target_height=h, device=device).to(dtype)
        self.forward_count += x.shape[0]
        x0 = self.model.apply_model(x, sigma, c_crossattn=cond.tensors["context"].to(device, dtype), **kwargs)
        return ((x - x0.float()) / sigma.view(-1, *[1] * (x.dim() - 1))).float()

    def initial_noise(self, batch: int, resolution: int, generator: torch.Generator) -> torch.Tensor:
        if resolution % 64:
            raise SliderError(f"resolution must be a multiple of 64, got {resolution}")
        channels = self.model.latent_format.latent_channels
        return torch.randn((batch, channels, resolution // 8, resolution // 8), generator=generator)

    # -- training on given images: the host's own noise schedule and noising ----------------------
    def random_levels(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        timesteps = torch.rand(batch, generator=generator) * 999  # ComfyUI's timestep range for every family
        return self.model.model_sampling.sigma(timesteps).float()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        return self.model.model_sampling.noise_scaling(level.float(), noise.float(), x0.float())

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        # predict() returns (x_t − x0)/σ for every parameterisation: noise for ε/v models, noise − x0 for flows
        x_t = self.add_noise(x0, noise, level)
        return (x_t - x0.float()) / level.float().view(-1, *[1] * (x0.dim() - 1))

    @torch.no_grad()
    def sample(self, cond: Cond, uncond: Cond | Sequence[Cond], *, guidance: float, steps: int,
               noise: torch.Tensor, slider_schedule: SliderSchedule | None = None, record: bool = False,
               generator: torch.Generator | None = None, progress: bool = False,
               callback: SampleCallback | None = None) -> Trajectory:
        """Deterministic Euler (DDIM-equivalent) sampling on the model's own sigma schedule."""
        self.load()
        sigmas = comfy.samplers.calculate_sigmas(self.model.model_sampling, "normal", steps).float()
        per_step = not isinstance(uncond, Cond)
        if per_step and len(uncond) != steps:
            raise SliderError(f"{len(uncond)} unconditional embeddings for {steps} steps")
        batch = noise.shape[0]
        x = self.model.model_sampling.noise_scaling(sigmas[0], noise.float(), torch.zeros_like(noise.float()),
                                                    max_denoise=True)  # as KSampler does from pure noise
        trajectory = Trajectory(final=x)
        c = cond.for_batch(batch)
        for i in range(steps):
            if slider_schedule is not None:
                scales = slider_schedule(i, steps)
                if scales is not None:
                    self.sliders.set_scales(scales)
            sigma = sigmas[i].expand(batch)
            u = (uncond[i] if per_step else uncond).for_batch(batch)
            if guidance == 1.0:
                eps = eps_c = self.predict(x, sigma, c)
            else:
                eps_u, eps_c = self.predict(torch.cat([x, x]), torch.cat([sigma, sigma]), Cond.cat([u, c])).chunk(2)
                eps = eps_u + guidance * (eps_c - eps_u)
            if record:
                trajectory.states.append(x.clone())
                trajectory.levels.append(sigma.clone())
                trajectory.cond_outputs.append(eps_c.clone())
            x = x + eps.to(x.device) * (sigmas[i + 1] - sigmas[i])
            if callback is not None:
                callback(i + 1, steps)
        trajectory.final = x
        return trajectory

    # -- deterministic sampling and its inversion: Euler on sigmas, which is DDIM for ε models ---------
    def ddim_levels(self, steps: int) -> torch.Tensor:
        if steps < 1:
            raise SliderError(f"steps must be ≥ 1, got {steps}")
        return comfy.samplers.calculate_sigmas(self.model.model_sampling, self.ddim_scheduler, steps).float().cpu()

    def ddim_step(self, x: torch.Tensor, output: torch.Tensor, level: torch.Tensor,
                  next_level: torch.Tensor) -> torch.Tensor:
        shape = (-1, *[1] * (x.dim() - 1))
        step = (next_level.float() - level.float()).to(x.device).view(shape)
        return x.float() + output.float().to(x.device) * step

    def model_signature(self) -> list[float]:
        modules = self.model.diffusion_model
        return [float(modules.get_submodule(self.sliders.names_map[m]).weight.detach().double().norm())
                for m in ("conv_in", "conv_out")]

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """IMAGE [B, H, W, C] 0..1 → model-space latents (the host's VAE, then its latent format)."""
        if self.vae is None:
            raise SliderError("a VAE is needed to encode images")
        return self.model.process_latent_in(self.vae.encode(images[..., :3]).float()).to(self.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            raise SliderError("a VAE is needed to decode images")
        return self.vae.decode(self.model.process_latent_out(latents)).float().cpu()


# ---------------------------------------------------------------------------------------------
# sampling an inversion with the host's own guider and Euler sampler
# ---------------------------------------------------------------------------------------------
def step_of(sigma: torch.Tensor, sample_sigmas: torch.Tensor) -> int:
    """Index of the sampling step a model call at `sigma` belongs to."""
    return int((sample_sigmas[:-1] > sigma.max().item() * (1 + 1e-5)).sum().item())


def cond_from_conditioning(conditioning) -> Cond:
    """A CONDITIONING (first entry) → the core's Cond (context + pooled, as ComfyDenoiser.encode gives)."""
    if not conditioning:
        raise SliderError("the CONDITIONING is empty")
    context, extras = conditioning[0][0], conditioning[0][1]
    pooled = extras.get("pooled_output")
    return Cond({"context": context.detach().clone().float(),
                 "pooled": pooled.detach().clone().float() if pooled is not None else torch.zeros(1, 1)})


def conditioning_from_cond(cond: Cond, width: int, height: int) -> list:
    """The core's Cond → a CONDITIONING whose size conditioning (SDXL) matches what predict() used."""
    extras = {"pooled_output": cond.tensors["pooled"], "width": width, "height": height,
              "target_width": width, "target_height": height}
    return [[cond.tensors["context"], extras]]


class InversionGuider(comfy.samplers.CFGGuider):
    """CFG with one unconditional per step (null-text inversion): the step comes from the sigma being
    sampled, read against the run's `sample_sigmas`."""

    def __init__(self, patcher, inversion: Inversion, width: int, height: int):
        super().__init__(patcher)
        distinct = list({id(u): u for u in inversion.unconds}.values())  # a shared unconditional once
        self.uncond_of_step = [next(j for j, u in enumerate(distinct) if u is s) for s in inversion.unconds]
        conds = {"positive": conditioning_from_cond(inversion.cond, width, height)}
        conds.update({f"uncond_{j}": conditioning_from_cond(u, width, height) for j, u in enumerate(distinct)})
        self.inner_set_conds(conds)
        # negative-prompt inversion: ∅ = c, so CFG is the conditional prediction itself (one forward, not two)
        self.set_cfg(1.0 if inversion.method == "negative-prompt" else inversion.guidance)

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (the host's signature)
        step = step_of(timestep, model_options["transformer_options"]["sample_sigmas"])
        uncond = self.conds[f"uncond_{self.uncond_of_step[min(step, len(self.uncond_of_step) - 1)]}"]
        return comfy.samplers.sampling_function(self.inner_model, x, timestep, uncond, self.conds["positive"],
                                                self.cfg, model_options=model_options, seed=seed)


class _FromGivenLatent(comfy.samplers.KSAMPLER):
    """Euler from a given x at sigmas[0] (the inverted latent), never re-scaled as fresh noise."""

    def max_denoise(self, model_wrap, sigmas):
        return False


def sample_inversion_in_host(patcher, inversion: Inversion, callback=None) -> torch.Tensor:
    """The inversion sampled back by the host (its guider, its Euler sampler, any model patches and
    slider wrappers on `patcher`) → LATENT samples."""
    import comfy.k_diffusion.sampling

    sigmas = inversion.levels.float()
    x_start = inversion.latent.float().cpu()
    height, width = x_start.shape[-2] * 8, x_start.shape[-1] * 8
    guider = InversionGuider(patcher, inversion, width, height)
    model_sampling = patcher.get_model_object("model_sampling")
    # the sampler starts at noise_scaling(σ_0, noise, 0): hand it the noise that lands exactly on x_start
    scale = model_sampling.noise_scaling(sigmas[:1], torch.ones_like(x_start), torch.zeros_like(x_start))
    sampler = _FromGivenLatent(comfy.k_diffusion.sampling.sample_euler)
    return guider.sample(x_start / scale, torch.zeros_like(x_start), sampler, sigmas, callback=callback,
                         disable_pbar=True, seed=0)


def ksample(patcher, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, *, denoise=1.0,
            progress=None, offset: int = 0) -> dict:
    """The stock KSampler (`nodes.common_ksampler`) reporting into a caller's ProgressBar at `offset`,
    so several runs (an α sweep) show one bar from start to end, with the host's latent previews."""
    import comfy.sample
    import latent_preview

    latent_image = comfy.sample.fix_empty_latent_channels(patcher, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    previewer = latent_preview.get_previewer(patcher.load_device, patcher.model.latent_format)

    def callback(step, x0, x, total_steps):
        if progress is not None:
            preview = previewer.decode_latent_to_preview_image("JPEG", x0) if previewer else None
            progress.update_absolute(offset + step + 1, None, preview)

    samples = comfy.sample.sample(patcher, noise, steps, cfg, sampler_name, scheduler, positive, negative,
                                  latent_image, denoise=denoise, noise_mask=latent.get("noise_mask"),
                                  callback=callback, disable_pbar=True, seed=seed)
    return {**latent, "samples": samples}
