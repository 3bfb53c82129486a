"""SliderHost for diffusers UNets and transformers: each slider is one named peft LoRA adapter with its own scale."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from ..config import classify_unet_module
from ..errors import SliderError
from ..slider_weights import LoraModule, SliderWeights, ends_of, modules_to_attach


@dataclass
class _Merge:
    """What `PeftSliderHost.merging` has folded into the base weights, and which sliders run live."""

    merged: dict[str, float] = field(default_factory=dict)  # slider → the scale its weights are folded in at
    live: set[str] = field(default_factory=set)  # sliders whose scale changed inside the block: live from then on
    originals: dict[str, torch.Tensor] = field(default_factory=dict)  # base weights before any fold, on the CPU

    def split(self, scales: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
        """scales → (to fold into the weights, to run live). A folded slider whose scale changes (or that
        is switched off) goes live: a per-step schedule re-folds nothing, only its own sliders stay live."""
        for name, scale in self.merged.items():
            if scales.get(name) != scale:
                self.live.add(name)
        folded = {n: a for n, a in scales.items() if n not in self.live}
        return folded, {n: a for n, a in scales.items() if n in self.live}


class PeftSliderHost:
    def __init__(self, unet: torch.nn.Module, classify: Callable[[str], str] = classify_unet_module):
        """`unet`: the denoiser (a UNet, or a flow transformer with its own `classify`)."""
        self.unet = unet
        self._merge: _Merge | None = None
        self._trainable: set[str] = set()
        self._names: list[str] = []
        self._negative_ends: dict[str, str] = {}  # two-ended slider → the peft adapter of its α < 0 end
        # the peft layers, and the adapter set they were last switched to: found once per add/remove,
        # not by walking the UNet on every call (set_scales runs several times per training step)
        self._layer_cache: list[tuple[str, LoraLayer]] | None = None
        self._active: tuple[str, ...] | None = None
        layers = {path: module for path, module in unet.named_modules()
                  if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}
        self._candidates = {path: classify(path) for path in layers}
        self._shapes = {path: tuple(module.weight.shape) for path, module in layers.items()}

    # -- SliderHost -----------------------------------------------------------------------------
    def lora_candidates(self) -> dict[str, str]:
        return dict(self._candidates)

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Base weight shape of every candidate (for formats.UnetNaming's fit check)."""
        return dict(self._shapes)

    def names(self) -> list[str]:
        return list(self._names)

    def add(self, name: str, weights: SliderWeights | None = None, *, modules: Sequence[str] = (),
            rank: int = 4, alpha: float = 1.0, trainable: bool = False, ends: int = 1) -> None:
        modules = modules_to_attach(name, self._names, weights, modules, self._candidates)
        if not name.isidentifier():  # peft adapter names become attribute names
            raise SliderError(f"slider adapter name {name!r} must be an identifier")
        self._add_adapter(name, modules, None if weights is None else weights.modules, rank, alpha)
        if ends_of(weights, ends) == 2:
            negative_end = f"{name}__negative_end"
            negative = None if weights is None else weights.negative
            self._add_adapter(negative_end, modules_to_attach(negative_end, self._names, None if negative is None else
                                                              SliderWeights(negative), modules, self._candidates),
                              negative, rank, alpha)
            self._negative_ends[name] = negative_end
        self._names.append(name)
        if trainable:
            self._trainable.add(name)
        self.set_scales({})

    def _add_adapter(self, adapter: str, modules: Sequence[str], weights: dict[str, LoraModule] | None,
                     rank: int, alpha: float) -> None:
        if weights is not None:
            ranks = {p: m.rank for p, m in weights.items()}
            alphas = {p: m.alpha for p, m in weights.items()}
            rank, alpha = ranks[modules[0]], alphas[modules[0]]
        else:
            ranks, alphas = {}, {}
        config = LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=list(modules), init_lora_weights=True,
            # exact module paths as patterns, so varying ranks of foreign files load as they are
            rank_pattern={f"^{p}$": r for p, r in ranks.items() if r != rank},
            alpha_pattern={f"^{p}$": a for p, a in alphas.items() if a != alpha},
        )
        with warnings.catch_warnings():  # several adapters on one UNet is the point of composing sliders
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            self.unet.add_adapter(config, adapter_name=adapter)
        self._layer_cache, self._active = None, None
        if weights is not None:
            self._write(adapter, weights)

    def remove(self, name: str) -> None:
        if self._merge is not None:
            raise SliderError("cannot remove a slider while sliders are merged into the weights")
        if name not in self._names:
            raise SliderError(f"no slider named {name!r}")
        self.unet.delete_adapters(name)
        if name in self._negative_ends:
            self.unet.delete_adapters(self._negative_ends.pop(name))
        self._layer_cache, self._active = None, None
        self._names.remove(name)
        self._trainable.discard(name)

    def set_scales(self, scales: dict[str, float]) -> None:
        unknown = set(scales) - set(self._names)
        if unknown:
            raise SliderError(f"unknown slider(s) {sorted(unknown)}; attached: {self._names}")
        scales = self._adapter_scales(scales)
        if self._merge is not None:
            folded, scales = self._merge.split(scales)
            self._fold(folded)
        active = tuple(scales)
        layers = self._layers()
        if active != self._active:  # switching adapters is the costly part: only when the set changes
            for layer in layers:
                layer.enable_adapters(bool(active))
                if active:
                    layer.set_adapter(list(active), inference_mode=True)
            for name in self._trainable:  # enable/set_adapter touched requires_grad
                for p in self.parameters(name):
                    p.requires_grad_(True)
            self._active = active
        for layer in layers:
            for name, scale in scales.items():
                layer.set_scale(name, float(scale))  # a no-op on layers the slider does not cover

    def _adapter_scales(self, scales: dict[str, float]) -> dict[str, float]:
        """Slider scales → peft adapter scales: a two-ended slider at α < 0 runs its negative end at |α|."""
        routed = {}
        for name, alpha in scales.items():
            if alpha < 0 and name in self._negative_ends:
                routed[self._negative_ends[name]] = -alpha
            else:
                routed[name] = alpha
        return routed

    @contextlib.contextmanager
    def merging(self) -> Iterator[None]:
        """Inside the block, set_scales folds the sliders into the base weights (peft's delta weights,
        summed in float32) instead of running one LoRA branch per slider in every forward: sampling
        costs the same with fifty sliders as with one. A slider whose scale then changes (a per-step
        schedule) leaves the fold and runs live. On exit the base weights are copied back bit for bit
        and every slider is off. The copy of each touched weight is kept on the CPU meanwhile."""
        if self._merge is not None:
            raise SliderError("sliders are already being merged")
        self.set_scales({})
        self._merge = _Merge()
        try:
            yield
        finally:
            merge, self._merge = self._merge, None
            with torch.no_grad():
                for path, layer in self._named_layers():
                    if path in merge.originals:
                        layer.get_base_layer().weight.copy_(merge.originals[path])
            self.set_scales({})

    @torch.no_grad()
    def _fold(self, folded: dict[str, float]) -> None:
        """Base weights = originals + Σ scale · ΔW over `folded`, recomputed from the originals (no drift)."""
        merge = self._merge
        if folded == merge.merged:
            return
        touched = set(folded) | set(merge.merged)
        for path, layer in self._named_layers():
            names = [n for n in touched if n in layer.lora_A]
            if not names:
                continue
            weight = layer.get_base_layer().weight
            original = merge.originals.setdefault(path, weight.detach().to("cpu", copy=True))
            total = original.to(weight.device, torch.float32, copy=True)  # never the original itself
            for name in names:
                if name in folded:
                    layer.set_scale(name, float(folded[name]))
                    total += layer.get_delta_weight(name).float()
            weight.copy_(total.to(weight.dtype))
        merge.merged = dict(folded)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        if self._merge is not None:  # the weights hold merged sliders: they are not the frozen model's
            raise SliderError("the frozen model is not available while sliders are merged into the weights")
        layers = self._layers()
        was_disabled = [layer.disable_adapters for layer in layers]
        for layer in layers:
            layer._disable_adapters = True  # a flag only: enable_adapters() would also touch requires_grad
        try:
            yield
        finally:
            for layer, flag in zip(layers, was_disabled):
                layer._disable_adapters = flag

    def parameters(self, name: str) -> list[torch.nn.Parameter]:
        """Every trainable weight of the slider (of both ends, for a two-ended one)."""
        params = []
        for adapter in (name, self._negative_ends.get(name)):
            for layer in self._layers():
                if adapter in layer.lora_A:
                    params += [layer.lora_A[adapter].weight, layer.lora_B[adapter].weight]
        return params

    def export(self, name: str) -> SliderWeights:
        if name not in self._names:
            raise SliderError(f"no slider named {name!r}")
        negative = self._negative_ends.get(name)
        return SliderWeights(modules=self._export(name), negative=None if negative is None else self._export(negative))

    def _export(self, adapter: str) -> dict[str, LoraModule]:
        return {path: LoraModule(down=layer.lora_A[adapter].weight.detach().clone(),
                                 up=layer.lora_B[adapter].weight.detach().clone(),
                                 alpha=float(layer.lora_alpha[adapter]))
                for path, layer in self._named_layers() if adapter in layer.lora_A}

    # -- internals ------------------------------------------------------------------------------
    def _named_layers(self) -> list[tuple[str, LoraLayer]]:
        if self._layer_cache is None:
            self._layer_cache = [(p, m) for p, m in self.unet.named_modules() if isinstance(m, LoraLayer)]
        return self._layer_cache

    def _layers(self) -> list[LoraLayer]:
        return [m for _, m in self._named_layers()]

    @torch.no_grad()
    def _write(self, name: str, weights: dict[str, LoraModule]) -> None:
        layers = dict(self._named_layers())
        for path, module in weights.items():
            layer = layers[path]
            for target, value in ((layer.lora_A[name].weight, module.down), (layer.lora_B[name].weight, module.up)):
                if value.numel() != target.numel():
                    raise SliderError(
                        f"slider weight for {path} has shape {tuple(value.shape)}, the model needs "
                        f"{tuple(target.shape)}: the slider was made for another model")
                # kohya stores 1×1 convs and linears interchangeably; the element order is the same
                target.copy_(value.reshape(target.shape).to(target.dtype))
