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
import json
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.samplers
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models_base
import comfy.utils
import torch
from comfy.clip_model import CLIPEmbeddings, CLIPTextModel
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy.weight_adapter.lora import LoraDiff

from ..sliders_core.config import classify_dit_module, classify_unet_module, is_dit
from ..sliders_core.denoiser import Cond, SampleCallback, SliderSchedule, Trajectory
from ..sliders_core.errors import SliderError
from ..sliders_core.formats import UnetNaming
from ..sliders_core.slider_weights import LoraModule, SliderWeights, ends_of, modules_to_attach

if TYPE_CHECKING:
    from ..sliders_core.inversion import Inversion

_FAMILIES = {"SD15": "sd1", "SD20": "sd2", "SD21UnclipL": "sd2", "SD21UnclipH": "sd2", "SDXL": "sdxl",
             "SDXLRefiner": "sdxl-refiner", "SSD1B": "sdxl-ssd1b", "Segmind_Vega": "sdxl-vega", "Shapes": "shapes",
             "Flux": "flux", "FluxSchnell": "flux-schnell", "SD3": "sd3", "Chroma": "chroma", "QwenImage": "qwen-image"}
_NATIVE_RESOLUTION = {"sd1": 512, "sd2": 768, "sdxl": 1024, "shapes": 32, "flux": 1024, "flux-schnell": 1024,
                      "sd3": 1024, "chroma": 1024, "qwen-image": 1328}
FLUX_GUIDANCE = 3.5  # the distilled guidance Flux-dev runs at when no FluxGuidance node sets one (ComfyUI's default)
_LATENT_DOWNSCALE = {"shapes": 1}  # the shapes model is pixel space; the other families have an 8× VAE
# inversion levels: "normal" starts at t = 999, where the cosine schedule has ᾱ ≈ 2e-9 and DDIM
# divides by √ᾱ; ddim_uniform starts at t = 961 (the CLI's 'leading' spacing)
_DDIM_SCHEDULER = {"shapes": "ddim_uniform"}
MAX_INVERSION_SIGMA = 1000.0  # SD1.x/SDXL start at σ ≈ 14.6; the shapes model's t = 999 is σ ≈ 20291


def model_family(patcher) -> str:
    name = type(patcher.model.model_config).__name__
    return _FAMILIES.get(name, name.lower())


def latent_downscale(patcher) -> int:
    """Image pixels per latent pixel."""
    return _LATENT_DOWNSCALE.get(model_family(patcher), 8)


def module_names(patcher) -> dict[str, str]:
    """diffusers module path → LDM module path for every slider-capable layer, from ComfyUI's own map.
    Flow transformers (Flux, SD3) are named by the host's own module paths on both sides: they are what its
    `lora_unet_…` and `diffusion_model.…` keys name, and diffusers' split q/k/v have no module here."""
    modules = dict(patcher.model.diffusion_model.named_modules())
    if is_dit(modules):
        return {path: path for path, module in modules.items() if isinstance(module, torch.nn.Linear)}
    unet_config = patcher.model.model_config.unet_config
    mapping = comfy.utils.unet_to_diffusers(unet_config)  # diffusers param → LDM param
    names = {}
    for diffusers_param, ldm_param in mapping.items():
        if not (diffusers_param.endswith(".weight") and ldm_param.endswith(".weight")):
            continue
        path, ldm = diffusers_param[: -len(".weight")], ldm_param[: -len(".weight")]
        module = modules.get(ldm)
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            names[path] = ldm
    if isinstance(modules.get("label_emb"), TextTimeEmbedding):  # the shapes model keeps diffusers' names there
        names.update({"add_embedding." + ldm[len("label_emb."):]: ldm for ldm, module in modules.items()
                      if ldm.startswith("label_emb.") and isinstance(module, torch.nn.Linear)})
    return names


def module_naming(patcher, names: dict[str, str] | None = None) -> UnetNaming:
    """How LoRA keys name this MODEL's modules: ours (`module_names`), their LDM names, and, on flow
    transformers, the diffusers names from ComfyUI's own maps (whole modules, and the q/k/v pieces
    it fuses into one layer)."""
    names = names or module_names(patcher)
    diffusion_model = patcher.model.diffusion_model
    shapes = {path: tuple(diffusion_model.get_submodule(ldm).weight.shape) for path, ldm in names.items()}
    aliases, slices = {}, {}
    unet_config = patcher.model.model_config.unet_config
    mapping = {"flux": comfy.utils.flux_to_diffusers, "mmdit": comfy.utils.mmdit_to_diffusers}
    # Chroma keeps Flux's blocks and names (the host maps its LoRA keys with the Flux map too)
    kind = "flux" if unet_config.get("image_model") in ("flux", "chroma") else \
        "mmdit" if model_family(patcher) == "sd3" else None
    if kind is not None and is_dit(names):
        for diffusers_key, target in mapping[kind](unet_config).items():
            if not diffusers_key.endswith(".weight"):
                continue
            module = diffusers_key[: -len(".weight")]
            if isinstance(target, str):
                aliases[module] = target[: -len(".weight")]
            elif target[1] is not None and target[1][0] == 0:  # rows of the fused weight: (dim 0, first, rows)
                slices[module] = (target[0][: -len(".weight")], target[1][1], target[1][2])
            # (a target with a transform, e.g. the final layer's swapped scale/shift, has no LoRA meaning here)
    return UnetNaming(names, ldm_names=names, weight_shapes=shapes, aliases=aliases, slices=slices)


class SliderDiff(LoraDiff):
    """ComfyUI's trainable LoRA weight adapter with a slider multiplier looked up per forward. `end`: on a
    two-ended slider, the sign of α this LoRA serves (+1 or −1, acting at |α|); None: every α."""

    def __init__(self, up: torch.Tensor, down: torch.Tensor, alpha: float, scales: dict, slider: str,
                 end: float | None = None):
        super().__init__((up.flatten(1), down.flatten(1), alpha, None, None, None))
        self.scales = scales
        self.slider = slider
        self.end = end
        self.down_shape = tuple(down.shape)
        self.up_shape = tuple(up.shape)

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        scale = self.scales.get(self.slider, 0.0)
        if self.end is not None:
            scale = max(scale * self.end, 0.0)
        if scale == 0.0:
            return w
        diff = self.lora_up.weight @ self.lora_down.weight
        return (w + (scale * self.alpha / self.rank) * diff.reshape(w.shape).to(w.dtype)).to(w.dtype)


def _copy_weight(w: torch.Tensor) -> torch.Tensor:
    """Identity wrapper: its mere presence makes cast_bias_weight copy the (inference-mode) weight."""
    return w


def wrap_weights_for_autograd(patcher, root: torch.nn.Module, prefix: str = "", skip=frozenset()) -> set[str]:
    """An identity wrapper on every weight and bias of the host's ops under `root` (keys `prefix` + module
    path) not in `skip`, so autograd never saves an inference-mode tensor (ComfyUI loads weights under
    inference mode; the wrapper makes cast_bias_weight copy them). Returns the keys wrapped."""
    wrapped = set()
    for module_name, module in root.named_modules():
        if not hasattr(module, "weight_function"):
            continue
        for kind in ("weight", "bias"):
            key = f"{prefix}{module_name}.{kind}"
            if getattr(module, kind, None) is not None and key not in skip:
                patcher.add_weight_wrapper(key, _copy_weight)
                wrapped.add(key)
    return wrapped


class ComfySliderHost:
    def __init__(self, patcher, names: dict[str, str]):
        self.patcher = patcher
        self.names_map = names
        classify = classify_dit_module if is_dit(names) else classify_unet_module
        self._kinds = {p: classify(p) for p in names}
        self.scales: dict[str, float] = {}
        self._adapters: dict[str, dict[str, SliderDiff]] = {}
        self._negative_ends: dict[str, dict[str, SliderDiff]] = {}  # a two-ended slider's α < 0 LoRA
        self.changed = True
        self._trainable: set[str] = set()
        self._identity_wrapped: set[str] = set()

    def lora_candidates(self) -> dict[str, str]:
        return dict(self._kinds)

    def names(self) -> list[str]:
        return list(self._adapters)

    def add(self, name: str, weights: SliderWeights | None = None, *, modules: Sequence[str] = (),
            rank: int = 4, alpha: float = 1.0, trainable: bool = False, ends: int = 1) -> None:
        modules = modules_to_attach(name, self._adapters, weights, modules, self.names_map)
        two_ended = ends_of(weights, ends) == 2
        self._adapters[name] = self._wrap(name, modules, None if weights is None else weights.modules, rank, alpha,
                                          trainable, 1.0 if two_ended else None)
        if two_ended:
            negative = None if weights is None else weights.negative
            paths = modules_to_attach(name, (), None if negative is None else SliderWeights(negative), modules,
                                      self.names_map)
            self._negative_ends[name] = self._wrap(name, paths, negative, rank, alpha, trainable, -1.0)
        self.changed = True  # new weight wrappers take effect only when the patcher is (re)loaded
        if trainable:
            self._trainable.add(name)
            self._wrap_other_weights()

    def _wrap(self, name: str, modules: Sequence[str], weights: dict[str, LoraModule] | None, rank: int,
              alpha: float, trainable: bool, end: float | None) -> dict[str, SliderDiff]:
        """One SliderDiff weight wrapper per module: the given LoRA weights, or a fresh no-op LoRA."""
        diffusion_model = self.patcher.model.diffusion_model
        adapters = {}
        for path in modules:
            ldm = self.names_map[path]
            base = diffusion_model.get_submodule(ldm).weight
            if weights is not None:
                lora = weights[path]
                up, down, module_alpha = lora.up.float(), lora.down.float(), lora.alpha
                if up.shape[0] * down[0].numel() != base.numel():
                    raise SliderError(f"slider weight for {path} does not fit the model's {tuple(base.shape)}: "
                                      "it was made for another model")
            else:  # the peft/kohya initialisation: random down, zero up, so a new slider is a no-op
                down = torch.empty(rank, *base.shape[1:])
                torch.nn.init.kaiming_uniform_(down.view(rank, -1), a=math.sqrt(5))
                up = torch.zeros(base.shape[0], rank, *([1] * (base.dim() - 2)))
                module_alpha = alpha
            adapter = SliderDiff(up, down, module_alpha, self.scales, name, end).to(base.device)
            adapter.requires_grad_(False)
            for weight in (adapter.lora_up.weight, adapter.lora_down.weight):  # alpha stays fixed
                weight.requires_grad_(trainable)
            adapters[path] = adapter
            self.patcher.add_weight_wrapper(f"diffusion_model.{ldm}.weight", adapter)
        return adapters

    def wrap_all_weights(self) -> None:
        """Make every weight safe for autograd (see _wrap_other_weights), e.g. for gradients w.r.t. inputs."""
        self._wrap_other_weights()
        self.changed = True

    def _wrap_other_weights(self) -> None:
        """Every weight without a slider gets an identity wrapper (wrap_weights_for_autograd)."""
        skip = {f"diffusion_model.{self.names_map[p]}.weight"
                for a in (*self._adapters.values(), *self._negative_ends.values()) for p in a}
        self._identity_wrapped |= wrap_weights_for_autograd(self.patcher, self.patcher.model.diffusion_model,
                                                            "diffusion_model.", skip | self._identity_wrapped)

    def remove(self, name: str) -> None:
        if self._adapters.pop(name, None) is None:
            raise SliderError(f"no slider named {name!r}")
        self._negative_ends.pop(name, None)
        self.scales.pop(name, None)  # its wrappers stay on this clone but multiply by 0
        self._trainable.discard(name)

    def set_scales(self, scales: dict[str, float]) -> None:
        unknown = set(scales) - set(self._adapters)
        if unknown:
            raise SliderError(f"unknown slider(s) {sorted(unknown)}; attached: {self.names()}")
        self.scales.clear()
        self.scales.update({k: float(v) for k, v in scales.items()})

    @contextlib.contextmanager
    def merging(self) -> Iterator[None]:
        """Sliders stay live weight wrappers here: static composition in the graph goes through the host's
        own patches (Apply Slider, Slider Mixer), which ComfyUI folds into the weights itself. Every slider
        is off on exit, as on the other backend."""
        try:
            yield
        finally:
            self.set_scales({})

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        saved = dict(self.scales)
        self.scales.clear()
        try:
            yield
        finally:
            self.scales.update(saved)

    def parameters(self, name: str) -> list[torch.nn.Parameter]:
        """Every trainable weight of the slider (of both ends, for a two-ended one)."""
        adapters = [*self._adapters[name].values(), *self._negative_ends.get(name, {}).values()]
        return [p for a in adapters for p in (a.lora_down.weight, a.lora_up.weight)]

    def export(self, name: str) -> SliderWeights:
        if name not in self._adapters:
            raise SliderError(f"no slider named {name!r}")
        negative = self._negative_ends.get(name)
        return SliderWeights(self._export(self._adapters[name]), negative=None if negative is None else self._export(negative))

    @staticmethod
    def _export(adapters: dict[str, SliderDiff]) -> dict[str, LoraModule]:
        return {path: LoraModule(down=a.lora_down.weight.detach().reshape(a.down_shape).cpu().clone(),
                                 up=a.lora_up.weight.detach().reshape(a.up_shape).cpu().clone(),
                                 alpha=float(a.alpha))
                for path, a in adapters.items()}


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
        self.naming = module_naming(self.patcher, names)
        self.default_resolution = native_resolution(self.patcher)
        self.downscale = latent_downscale(self.patcher)
        self.forward_count = 0
        self.ddim_scheduler = _DDIM_SCHEDULER.get(self.family, "normal")  # the host's sigmas for ddim_levels
        self._grad_ready = False
        unet_config = self.model.model_config.unet_config
        self.dit = is_dit(names)
        # Flux is sampled without CFG: dev takes its (distilled) guidance as an input, schnell needs none;
        # Chroma (Flux's blocks, de-distilled) is sampled with CFG
        self.cfg_free = unet_config.get("image_model") == "flux"
        self.guidance_input = FLUX_GUIDANCE if unet_config.get("guidance_embed") else None
        if unet_config.get("image_model") == "chroma":
            self.guidance_input = 0.0  # its modulation network still takes a guidance value: the host's default
        self._residual_norms = [m for path, m in self.model.diffusion_model.named_modules()  # Flux's blocks
                                if path.startswith(("double_blocks.", "single_blocks."))
                                and isinstance(m, torch.nn.LayerNorm)]

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
        if self.model.adm_channels or self.dit:  # SDXL's size-and-pooled vector; Flux's pooled CLIP vector
            h, w = x.shape[-2] * self.downscale, x.shape[-1] * self.downscale
            adm = self.model.encode_adm(pooled_output=cond.tensors["pooled"].to(device), width=w, height=h,
                                        target_width=w, target_height=h, device=device)
            if adm is not None:  # families without a pooled vector (Qwen-Image) have none
                kwargs["y"] = adm.to(dtype)
        if self.guidance_input is not None:
            kwargs["guidance"] = torch.full((x.shape[0],), self.guidance_input, device=device)
        self.forward_count += x.shape[0]
        # Flux's blocks add residuals in place (txt += …, x += …) into tensors their norms keep for the
        # backward; with gradients, each norm gets its own copy of its input (hooks removed afterwards)
        norms = self._residual_norms if torch.is_grad_enabled() else []
        handles = [n.register_forward_pre_hook(_copy_input) for n in norms]
        try:
            x0 = self.model.apply_model(x, sigma, c_crossattn=cond.tensors["context"].to(device, dtype), **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        return ((x - x0.float()) / sigma.view(-1, *[1] * (x.dim() - 1))).float()

    def initial_noise(self, batch: int, resolution: int, generator: torch.Generator) -> torch.Tensor:
        unet_config = self.model.model_config.unet_config
        if self.dit:
            multiple = self.downscale * unet_config.get("patch_size", 2)
        else:
            multiple = self.downscale * 2 ** (len(unet_config.get("channel_mult", (1, 2, 4, 4))) - 1)
        if resolution < multiple or resolution % multiple:
            raise SliderError(f"resolution {resolution} must be a positive multiple of {multiple} for this model")
        channels = self.model.latent_format.latent_channels
        side = resolution // self.downscale
        # video-VAE latents (Qwen-Image's Wan VAE) carry a frame axis: one frame for an image
        frames = (1,) if getattr(self.model.latent_format, "latent_dimensions", 2) == 3 else ()
        return torch.randn((batch, channels, *frames, side, side), generator=generator)

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

    def _post_cfg(self, x: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor, eps_u: torch.Tensor,
                  eps_c: torch.Tensor) -> torch.Tensor:
        """The MODEL's post-CFG functions (`sampler_post_cfg_function`, e.g. the shapes model's x0 clamp)
        on the guided prediction, as the host's samplers apply them."""
        functions = self.patcher.model_options.get("sampler_post_cfg_function", [])
        if not functions:
            return eps
        eps, eps_u, eps_c = (e.to(x.device) for e in (eps, eps_u, eps_c))
        s = sigma.to(x.device).view(-1, *[1] * (x.dim() - 1))
        denoised = x - s * eps
        for function in functions:
            denoised = function({"denoised": denoised, "cond_denoised": x - s * eps_c,
                                 "uncond_denoised": x - s * eps_u, "model": self.model, "uncond": None,
                                 "cond": None, "sigma": sigma, "model_options": self.patcher.model_options,
                                 "input": x, "cond_scale": None})
        return (x - denoised) / s

    @torch.no_grad()
    def sample(self, cond: Cond, uncond: Cond | Sequence[Cond], *, guidance: float, steps: int,
               noise: torch.Tensor, slider_schedule: SliderSchedule | None = None, record: bool = False,
               generator: torch.Generator | None = None, progress: bool = False,
               callback: SampleCallback | None = None) -> Trajectory:
        """Deterministic Euler (DDIM-equivalent) sampling on the model's own sigma schedule, with the
        MODEL's post-CFG functions. Flux runs without CFG (`guidance` and `uncond` are not used): dev at
        its distilled guidance input."""
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
            if guidance == 1.0 or self.cfg_free:
                eps = eps_u = eps_c = self.predict(x, sigma, c)
            else:
                eps_u, eps_c = self.predict(torch.cat([x, x]), torch.cat([sigma, sigma]), Cond.cat([u, c])).chunk(2)
                eps = eps_u + guidance * (eps_c - eps_u)
            eps = self._post_cfg(x, sigma, eps, eps_u, eps_c)
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
        levels = comfy.samplers.calculate_sigmas(self.model.model_sampling, self.ddim_scheduler, steps).float().cpu()
        if float(levels[0]) > MAX_INVERSION_SIGMA:  # ᾱ < 1e-6: DDIM's step divides by √ᾱ there
            raise SliderError(f"the '{self.ddim_scheduler}' schedule starts at σ = {float(levels[0]):.0f} on this "
                              f"model, where deterministic inversion breaks down; use "
                              f"'{_DDIM_SCHEDULER.get(self.family, 'ddim_uniform')}'")
        return levels

    def state_at(self, x: torch.Tensor, level: torch.Tensor, new_level: torch.Tensor) -> torch.Tensor:
        """States here are x0 + σ·noise, and the model divides its input by √(σ² + 1) (calculate_input):
        the same image content at another σ is x rescaled by the ratio of those factors."""
        sampling = self.model.model_sampling
        ones = torch.ones(x.shape[0], *[1] * (x.dim() - 1))
        factor = sampling.calculate_input(level.float().cpu(), ones) / sampling.calculate_input(new_level.float().cpu(), ones)
        return x * factor.to(x.device, x.dtype)

    def ddim_step(self, x: torch.Tensor, output: torch.Tensor, level: torch.Tensor,
                  next_level: torch.Tensor) -> torch.Tensor:
        shape = (-1, *[1] * (x.dim() - 1))
        step = (next_level.float() - level.float()).to(x.device).view(shape)
        return x.float() + output.float().to(x.device) * step

    def model_signature(self) -> list[float]:
        modules = self.model.diffusion_model
        first = "img_in" if "img_in" in self.sliders.names_map else "context_embedder"  # Flux / SD3
        ends = (first, "final_layer.linear") if self.dit else ("conv_in", "conv_out")
        return [float(modules.get_submodule(self.sliders.names_map[m]).weight.detach().double().norm())
                for m in ends]

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """IMAGE [B, H, W, C] 0..1 → model-space latents (the host's VAE, then its latent format)."""
        if self.vae is None:
            raise SliderError("a VAE is needed to encode images")
        return self.model.process_latent_in(self.vae.encode(images[..., :3]).float()).to(self.device)

    def decode(self, latents: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
        if differentiable and self.downscale == 1:
            return ((latents.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)  # the pixel-space VAE's decode
        if self.vae is None:
            raise SliderError("a VAE is needed to decode images")
        if differentiable:  # the VAE's own model, loaded by the host: VAE.decode batches into a buffer for inference
            comfy.model_management.load_models_gpu([self.vae.patcher])
            z = self.model.process_latent_out(latents).to(self.vae.device, self.vae.vae_dtype)
            return self.vae.process_output(self.vae.first_stage_model.decode(z).float()).movedim(1, -1)
        with torch.no_grad():
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
        # the inversion was optimised for plain CFG: a post-CFG change (the shapes model's x0 clamp) would
        # move the reconstruction away from the photo (41.5 → 31.7 dB on a shapes photo)
        self.model_options = {**self.model_options, "sampler_post_cfg_function": []}
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
    height, width = (side * latent_downscale(patcher) for side in x_start.shape[-2:])
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


# ---------------------------------------------------------------------------------------------
# The shipped shapes model (models/shapes-v1, a diffusers folder) as a ComfyUI MODEL, CLIP and VAE,
# built from the host's own classes: its UNetModel, CLIP text model and tokenizer wrappers, model
# config and pixel-space VAE. docs/research/shapes_in_comfyui.md has the measured equivalence.
# ---------------------------------------------------------------------------------------------

def shapes_unet_config(config: dict) -> dict:
    """UNetModel kwargs for the shapes UNet2DConditionModel config (the features that model uses)."""
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    layers = config["layers_per_block"]
    layers = [layers] * len(down) if isinstance(layers, int) else list(layers)
    channels = list(config["block_out_channels"])
    unsupported = {
        "addition_embed_type": config.get("addition_embed_type") != "text",
        "resnet_time_scale_shift": config.get("resnet_time_scale_shift") != "scale_shift",
        "transformer_layers_per_block": config.get("transformer_layers_per_block", 1) != 1,
        "class_embed_type": config.get("class_embed_type") is not None,
        "mid_block_type": config.get("mid_block_type") != "UNetMidBlock2DCrossAttn",
        "attention_head_dim": not isinstance(config.get("num_attention_heads") or config["attention_head_dim"], int),
    }
    if any(unsupported.values()):
        raise SliderError(f"not a shapes-model UNet config: unsupported {[k for k, v in unsupported.items() if v]}")
    depth = [1 if "CrossAttn" in t else 0 for t in down]
    output_depth = []  # the host reads it from the end: the last entries are the first (deepest) output blocks
    for i, t in enumerate(up):
        output_depth = [1 if "CrossAttn" in t else 0] * (layers[::-1][i] + 1) + output_depth
    return {
        "image_size": config["sample_size"], "in_channels": config["in_channels"],
        "out_channels": config["out_channels"], "model_channels": channels[0],
        "channel_mult": [c // channels[0] for c in channels], "num_res_blocks": layers,
        "transformer_depth": depth, "transformer_depth_output": output_depth, "transformer_depth_middle": 1,
        "context_dim": config["cross_attention_dim"], "use_linear_in_transformer": config["use_linear_projection"],
        "use_spatial_transformer": True, "legacy": False, "use_scale_shift_norm": True,
        # diffusers' attention_head_dim without num_attention_heads is the number of heads
        "num_heads": config.get("num_attention_heads") or config["attention_head_dim"], "num_head_channels": -1,
        "adm_in_channels": None, "use_checkpoint": False, "use_temporal_attention": False,
        "use_temporal_resblock": False,
        "norm_num_groups": config["norm_num_groups"], "text_time_heads": config["addition_embed_type_num_heads"],
    }


class TextTimeEmbedding(torch.nn.Module):
    """diffusers' "text" addition embedding (attention pooling of the context into the time embedding),
    with diffusers' parameter names, on the host's ops (so casting and weight wrappers apply)."""

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

    def forward(self, context):
        x = self.norm1(context)
        batch, length, width = x.shape
        heads, head_dim = self.num_heads, width // self.num_heads
        position = comfy.model_management.cast_to_device(self.pool.positional_embedding, x.device, x.dtype)
        query_token = x.mean(dim=1, keepdim=True) + position
        tokens = torch.cat([query_token, x], dim=1)
        q = self.pool.q_proj(query_token).view(batch, 1, heads, head_dim).transpose(1, 2)
        k = self.pool.k_proj(tokens).view(batch, length + 1, heads, head_dim).transpose(1, 2)
        v = self.pool.v_proj(tokens).view(batch, length + 1, heads, head_dim).transpose(1, 2)
        weights = torch.softmax((q @ k.transpose(-1, -2)).float() / math.sqrt(head_dim), dim=-1).to(v.dtype)
        pooled = (weights @ v).transpose(1, 2).reshape(batch, width)
        return self.norm2(self.proj(pooled))


class ShapesUNet(UNetModel):
    """The host's UNetModel with the shapes model's text addition embedding as its label_emb (fed the
    context) and its GroupNorm group count (the host builds GroupNorm(32, ...))."""

    def __init__(self, norm_num_groups=32, text_time_heads=4, **kwargs):
        super().__init__(**kwargs)
        for module in self.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.num_groups = norm_num_groups
        self.num_classes = "text"  # UNetModel._forward then adds label_emb(y) to the time embedding
        self.label_emb = TextTimeEmbedding(kwargs["context_dim"], kwargs["model_channels"] * 4, text_time_heads,
                                           dtype=self.dtype, device=kwargs.get("device"),
                                           operations=kwargs["operations"])

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):  # noqa: B006
        return super().forward(x, timesteps, context, context if y is None else y, control, transformer_options,
                               **kwargs)


class ShapesLatent(comfy.latent_formats.LatentFormat):
    """Pixel space: a LATENT is the image itself in −1..1, 3 channels."""

    latent_channels = 3
    scale_factor = 1.0

    def __init__(self):
        self.latent_rgb_factors = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
        self.latent_rgb_factors_bias = [0.0, 0.0, 0.0]


class Shapes(comfy.supported_models_base.BASE):
    """The model config; its class name gives model_family() == "shapes", the CLI's family."""

    unet_config = {}  # never matched by checkpoint detection: only load_shapes builds it
    unet_extra_config = {}
    sampling_settings = {"beta_schedule": "cosine"}  # the host's name for diffusers' squaredcos_cap_v2
    latent_format = ShapesLatent
    memory_usage_factor = 0.05
    supported_inference_dtypes = [torch.float32]

    def get_model(self, state_dict, prefix="", device=None):
        return comfy.model_base.BaseModel(self, model_type=comfy.model_base.ModelType.EPS, device=device,
                                          unet_model=ShapesUNet)


class ShapesTextModel(CLIPTextModel):
    """The host's CLIP text model with the config's vocabulary size (the host assumes 49408)."""

    def __init__(self, config_dict, dtype, device, operations):
        super().__init__(config_dict, dtype, device, operations)
        self.text_model.embeddings = CLIPEmbeddings(
            config_dict["hidden_size"], vocab_size=config_dict["vocab_size"],
            num_positions=config_dict["max_position_embeddings"], dtype=dtype, device=device, operations=operations)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SliderError(f"cannot read {path}: {exc}") from exc


def shapes_clip_target(folder: Path):
    encoder = _read_json(folder / "text_encoder" / "config.json")
    tokenizer = _read_json(folder / "tokenizer" / "tokenizer_config.json")
    max_length = min(int(tokenizer["model_max_length"]), int(encoder["max_position_embeddings"]))
    special = {"start": encoder["bos_token_id"], "end": encoder["eos_token_id"], "pad": encoder["pad_token_id"]}
    tokenizer_path = str(folder / "tokenizer")

    class ShapesClipModel(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006 (the host's signature)
            super().__init__(device=device, dtype=dtype, max_length=max_length, layer="last",
                             textmodel_json_config=dict(encoder), model_class=ShapesTextModel,
                             special_tokens=special, return_projected_pooled=False, model_options=model_options)

    class ShapesWordTokenizer(comfy.sd1_clip.SDTokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):  # noqa: B006
            from transformers import PreTrainedTokenizerFast

            super().__init__(tokenizer_path, max_length=max_length, pad_with_end=False, pad_token=special["pad"],
                             end_token=special["end"], embedding_directory=embedding_directory,
                             embedding_size=encoder["hidden_size"], embedding_key="shapes",
                             tokenizer_class=PreTrainedTokenizerFast, has_start_token=True, has_end_token=True,
                             pad_to_max_length=True, tokenizer_data=tokenizer_data)
            # the host moves a word group shorter than max_word_length whole into the next chunk; with
            # 8-token chunks a 7-token group never fits and tokenizing never ends. 1: split at the edge.
            self.max_word_length = 1

        def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
            # the host splits long prompts into several chunks; the CLI (diffusers) truncates to one
            chunks = super().tokenize_with_weights(text, return_word_ids, **kwargs)
            if len(chunks) > 1:
                logging.warning("shapes model: prompt %r is longer than %d tokens; truncated", text, max_length)
            return chunks[:1]

    class ShapesTokenizer(comfy.sd1_clip.SD1Tokenizer):  # gives the {name: tokens} form CLIPTextEncode passes
        def __init__(self, embedding_directory=None, tokenizer_data={}):  # noqa: B006
            super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data,
                             name="shapes", tokenizer=ShapesWordTokenizer)

    class ShapesClip(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006
            super().__init__(device=device, dtype=dtype, model_options=model_options, name="shapes",
                             clip_model=ShapesClipModel)

    return comfy.supported_models_base.ClipTarget(ShapesTokenizer, ShapesClip)


def _load_weights(path: Path) -> dict:
    if not path.is_file():
        raise SliderError(f"the shapes model file {path} is missing; restore models/ from the pack's git "
                          "repository or retrain it with scripts/train_shapes_model.py")
    return comfy.utils.load_torch_file(str(path), safe_load=True)


def load_shapes(folder: str | Path, clamp: bool = True):
    """The shapes model folder → (MODEL, CLIP, VAE) that the stock nodes and this pack's nodes accept.

    clamp: clip the predicted x0 to [−1, 1] after CFG at every step (the host's post-CFG hook), as the
    CLI's scheduler does (thresholding); without it, samplers that start at σ_max ≈ 20291 return noise.
    """
    folder = Path(folder)
    config = Shapes(shapes_unet_config(_read_json(folder / "unet" / "config.json")))
    config.set_inference_dtype(torch.float32, None)  # 1.5 M parameters: fp32 everywhere
    offload_device = comfy.model_management.unet_offload_device()
    base = config.get_model({}, device=offload_device)
    mapping = comfy.utils.unet_to_diffusers(config.unet_config)  # diffusers name → the host's name
    weights = {}
    for key, value in _load_weights(folder / "unet" / "diffusion_pytorch_model.safetensors").items():
        if key.startswith("add_embedding."):
            weights["label_emb." + key[len("add_embedding."):]] = value
        elif key in mapping:
            weights[mapping[key]] = value
        else:
            raise SliderError(f"{folder}: UNet weight {key} has no place in the shapes model")
    missing, unexpected = base.diffusion_model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise SliderError(f"{folder}: the UNet weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                             offload_device=offload_device)
    if clamp:
        model.set_model_sampler_post_cfg_function(lambda args: args["denoised"].clamp(-1.0, 1.0))

    # the host keeps text encoders in fp16 by default, which moves this model's conditioning by ~2e-3
    clip = comfy.sd.CLIP(shapes_clip_target(folder), model_options={"dtype": torch.float32})
    text = _load_weights(folder / "text_encoder" / "model.safetensors")
    if not any(k.startswith("text_model.") for k in text):  # transformers 5 saves CLIPTextModel without it
        text = {"text_model." + k: v for k, v in text.items()}
    missing, _ = clip.load_sd(text)
    if [k for k in missing if k != "text_projection.weight"]:  # the projection is unused (layer "last")
        raise SliderError(f"{folder}: the text encoder weights do not fit (missing {missing[:3]})")
    projection = clip.cond_stage_model.shapes.transformer.text_projection.weight
    with torch.no_grad():  # the host leaves unloaded weights uninitialised
        projection.copy_(torch.eye(projection.shape[0], dtype=projection.dtype))

    vae = comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})  # the host's own identity "VAE"
    return model, clip, vae


def preview_image(patcher, latents: torch.Tensor, min_height: int = 128):
    """Latents [1, C, H, W] → a progress preview ("JPEG", PIL image, max size) the UI draws on the node:
    the host's previewer (TAESD or Latent2RGB, as the user set it), else Latent2RGB. Small images are
    enlarged without smoothing so a 32-px strip stays readable."""
    import latent_preview
    from PIL import Image

    latent_format = patcher.model.latent_format
    previewer = latent_preview.get_previewer(patcher.load_device, latent_format) or \
        latent_preview.Latent2RGBPreviewer(latent_format.latent_rgb_factors, latent_format.latent_rgb_factors_bias)
    image = previewer.decode_latent_to_preview(latents.to(patcher.load_device))
    if image.height < min_height:
        factor = -(-min_height // image.height)
        image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    return ("JPEG", image, latent_preview.MAX_PREVIEW_RESOLUTION)


class ClipVisionEmbedder:
    """SliderSpace ImageEmbedder over the graph's CLIP_VISION. The host's `encode_image` rounds pixels to
    8 bits, which stops gradients, so the same preprocessing runs here without the rounding; a clone of its
    patcher gets identity weight wrappers, as the UNet does, so autograd never saves an inference tensor."""

    def __init__(self, clip_vision):
        from comfy.clip_model import CLIPVisionModelProjection

        if not isinstance(clip_vision.model, CLIPVisionModelProjection):
            raise SliderError(f"SliderSpace needs a CLIP or SigLIP vision model, got "
                              f"{type(clip_vision.model).__name__}: load a CLIP vision checkpoint")
        self.vision = clip_vision
        self.patcher = clip_vision.patcher.clone()
        wrap_weights_for_autograd(self.patcher, self.patcher.model)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        from comfy.clip_model import CLIPLayer

        from ..sliders_core.backends.clip_vision import clip_preprocess

        vision = self.vision
        comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)
        pixels = clip_preprocess(images.to(vision.load_device), vision.image_size, vision.image_mean, vision.image_std)
        # the host's layers add their residuals in place (x += attn(norm(x))) while the norm keeps x for its
        # backward; giving each norm its own copy of x keeps the graph valid (hooks removed afterwards)
        norms = [n for m in self.patcher.model.modules() if isinstance(m, CLIPLayer) for n in (m.layer_norm1, m.layer_norm2)]
        handles = [n.register_forward_pre_hook(_copy_input) for n in norms] if torch.is_grad_enabled() else []
        try:
            embeds = self.patcher.model(pixel_values=pixels, intermediate_output=-2)[2]
        finally:
            for handle in handles:
                handle.remove()
        return torch.nn.functional.normalize(embeds.float(), dim=-1)


def _copy_input(_module, args):
    return (args[0].clone(), *args[1:])


def native_resolution(patcher) -> int:
    return _NATIVE_RESOLUTION.get(model_family(patcher), 512)


def runs_on_cpu() -> bool:
    return comfy.model_management.get_torch_device().type == "cpu"


def show_text(node_id, text: str) -> None:
    """A line of text under the node while it runs (the host's progress text)."""
    import sys

    server = sys.modules.get("server")  # only inside a running ComfyUI server
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if node_id is not None and instance is not None:
        instance.send_progress_text(text, node_id)
