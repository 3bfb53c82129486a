"""Write official-format slider files and the official LoRA's outputs for the tests, from the real code.

    python scripts/make_official_fixtures.py --official /path/to/sliders-checkout

For each model the tests build (tiny-sd1, tiny-sdxl, the shipped shapes model) and each official
training method, the official `LoRANetwork` is created on the UNet, its LoRA weights are set to
seeded random values (rounded to bfloat16, the official save precision), and
- its own `save_weights` writes `tests/fixtures/official/<model>-<method>-<network>.pt`;
- `expected.safetensors` stores a fixed input and the official UNet output at two strengths;
- `module_sets.json` lists the LoRA names each method wraps on each model.
tests/test_official_files.py then loads the files through `sliders_core.formats` and checks the
outputs and the presets against them, without needing the checkout.

Flux (`flux-sliders/utils/lora.py`, the official Flux notebook's network): on the tiny Flux
transformer the tests build, its `LoRANetwork` ("full": every attention projection of both block
kinds) with seeded weights writes `tiny-flux-full.pt` and `flux-expected.safetensors` (a fixed
input, the official output at two strengths). The one patch: its module filter names diffusers'
old `Attention` class, which diffusers ≥ 0.35 calls `FluxAttention` on Flux.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from official_harness import import_official, set_network_type  # noqa: E402

from sliders_core.config import OFFICIAL_METHODS  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "official"
STRENGTHS = (0.7, -1.3)


def fixture_models() -> dict:
    """The UNets of the three models exactly as the tests build them."""
    from sliders_core.backends.diffusers_backend import DiffusersDenoiser, load_diffusers_model
    from sliders_core.tiny import tiny_sd1_pipeline, tiny_sdxl_pipeline

    return {"tiny-sd1": DiffusersDenoiser(tiny_sd1_pipeline(seed=0)),
            "tiny-sdxl": DiffusersDenoiser(tiny_sdxl_pipeline(seed=0)),
            "shapes": load_diffusers_model(ROOT / "models" / "shapes-v1")}


def fixture_inputs(denoiser, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    side = int(denoiser.unet.config.sample_size)
    inputs = {"x": torch.randn(1, denoiser.unet.config.in_channels, side, side, generator=gen),
              "level": torch.tensor([500]),
              "context": torch.randn(1, 8, denoiser.unet.config.cross_attention_dim, generator=gen)}
    if denoiser.is_xl:
        pooled = denoiser.pipe.text_encoder_2.config.projection_dim
        inputs["text_embeds"] = torch.randn(1, pooled, generator=gen)
    return inputs


def unet_output(denoiser, unet, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The UNet call our backend's predict() makes (SDXL time ids: square, no crop)."""
    kwargs = {}
    if denoiser.is_xl:
        h = inputs["x"].shape[-1] * denoiser.latent_factor
        kwargs["added_cond_kwargs"] = {"text_embeds": inputs["text_embeds"],
                                       "time_ids": torch.tensor([[h, h, 0, 0, h, h]], dtype=torch.float32)}
    with torch.no_grad():
        return unet(inputs["x"], inputs["level"], encoder_hidden_states=inputs["context"], **kwargs).sample


def flux_fixtures(checkout: str) -> None:
    import importlib.util

    from sliders_core.backends.flow_backend import FlowDenoiser
    from sliders_core.denoiser import Cond
    from sliders_core.tiny import tiny_flux_pipeline

    source = Path(checkout).resolve() / "flux-sliders" / "utils" / "lora.py"
    spec = importlib.util.spec_from_file_location("official_flux_lora", source)
    lora = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lora)
    lora.DEFAULT_TARGET_REPLACE[:] = ["FluxAttention"]  # diffusers' current name of the class it targets
    denoiser = FlowDenoiser(tiny_flux_pipeline(seed=0))
    gen = torch.Generator().manual_seed(0)
    cfg = denoiser.transformer.config
    inputs = {"x": torch.randn(1, 16, 16, 16, generator=gen), "level": torch.tensor([500.0]),
              "context": torch.randn(1, 8, cfg.joint_attention_dim, generator=gen),
              "pooled": torch.randn(1, cfg.pooled_projection_dim, generator=gen)}
    cond = Cond({"context": inputs["context"], "pooled": inputs["pooled"]})
    network = lora.LoRANetwork(denoiser.transformer, rank=2, multiplier=1.0, alpha=1.0, train_method="full")
    with torch.no_grad():
        for m in network.unet_loras:
            for weight in (m.lora_down.weight, m.lora_up.weight):
                weight.copy_((torch.randn(weight.shape, generator=gen) * 0.2).bfloat16().float())
    expected = {f"input/{k}": v for k, v in inputs.items()}
    with torch.no_grad():
        for strength in STRENGTHS:
            network.set_lora_slider(strength)
            with network:
                expected[f"tiny-flux-full/{strength}"] = denoiser.predict(inputs["x"], inputs["level"], cond)
        expected["tiny-flux-full/0"] = denoiser.predict(inputs["x"], inputs["level"], cond)
    network.save_weights(OUT / "tiny-flux-full.pt", dtype=torch.bfloat16)
    save_file(expected, OUT / "flux-expected.safetensors")
    print(f"tiny-flux-full: {len(network.unet_loras)} modules")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", required=True, help="a checkout of rohitgandikota/sliders")
    parser.add_argument("--only", choices=("unet", "flux"), help="write only the UNet or only the Flux fixtures")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.only != "unet":
        flux_fixtures(args.official)
    if args.only == "flux":
        return
    lora = import_official(args.official)["lora"]
    OUT.mkdir(parents=True, exist_ok=True)
    expected: dict[str, torch.Tensor] = {}
    module_sets: dict[str, dict[str, list[str]]] = {}
    cases = [(m, "c3lier") for m in OFFICIAL_METHODS] + [("full", "lierla")]
    for model_name, denoiser in fixture_models().items():
        inputs = fixture_inputs(denoiser)
        for key, value in inputs.items():
            expected[f"{model_name}/input/{key}"] = value
        for number, (method, network) in enumerate(cases):
            set_network_type(lora, network)
            unet = copy.deepcopy(denoiser.unet)
            network_module = lora.LoRANetwork(unet, rank=2, multiplier=1.0, alpha=1.0, train_method=method)
            case = f"{model_name}-{method}-{network}"
            module_sets.setdefault(model_name, {})[f"{method}-{network}"] = sorted(
                m.lora_name for m in network_module.unet_loras)
            if not network_module.unet_loras:
                continue
            gen = torch.Generator().manual_seed(number)
            with torch.no_grad():
                for m in network_module.unet_loras:
                    for weight in (m.lora_down.weight, m.lora_up.weight):
                        weight.copy_((torch.randn(weight.shape, generator=gen) * 0.2).bfloat16().float())
            for strength in STRENGTHS:
                network_module.set_lora_slider(strength)
                with network_module:
                    expected[f"{case}/{strength}"] = unet_output(denoiser, unet, inputs)
            expected[f"{case}/0"] = unet_output(denoiser, unet, inputs)  # outside `with`: multiplier 0
            network_module.save_weights(OUT / f"{case}.pt", dtype=torch.bfloat16)
            print(f"{case}: {len(network_module.unet_loras)} modules")
    save_file(expected, OUT / "expected.safetensors")
    (OUT / "module_sets.json").write_text(json.dumps(module_sets, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
