"""Training time per iteration: the ComfyUI backend (the Train node's path) vs the diffusers backend.

Both backends get the same tiny SD1.5-shaped UNet (ComfyUI's model, and a diffusers twin with its
weights copied through ComfyUI's own name map), the same prompt embeddings and the same config, and
train side by side in one process. Needs ComfyUI:

    COMFYUI_DIR=/path/to/ComfyUI python benchmarks/backend_speed.py [--iterations 40]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import comfy_support  # noqa: E402


def load_pack():
    spec = importlib.util.spec_from_file_location("concept_sliders_pack", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class FakeClip:
    def tokenize(self, text):
        return text

    def encode_from_tokens(self, tokens, return_pooled=False):
        gen = torch.Generator().manual_seed(zlib.crc32(tokens.encode()))
        cond, pooled = torch.randn(1, 77, 768, generator=gen), torch.randn(1, 1280, generator=gen)
        return (cond, pooled) if return_pooled else cond


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    comfy_support.import_comfy()
    load_pack()
    from concept_sliders_pack.nodes.comfy_backend import ComfyDenoiser
    from concept_sliders_pack.sliders_core.backends.diffusers_backend import DiffusersDenoiser
    from concept_sliders_pack.sliders_core.config import TrainConfig
    from concept_sliders_pack.sliders_core.denoiser import Cond
    from concept_sliders_pack.sliders_core.prompts import PromptPair
    from concept_sliders_pack.sliders_core.text_slider import train_text_slider
    from concept_sliders_pack.sliders_core.tiny import tiny_sd1_pipeline
    from diffusers import UNet2DConditionModel

    patcher, clip = comfy_support.tiny_sd15_patcher(), FakeClip()
    unet_config = dict(patcher.model.model_config.unet_config)
    names = comfy_support.unet_diffusers_to_ldm_names(unet_config)
    ldm_state = patcher.model.diffusion_model.state_dict()
    twin = UNet2DConditionModel(**comfy_support.diffusers_config_for(unet_config, 8)).eval()
    twin.load_state_dict({k: ldm_state[names[k]] for k in twin.state_dict()})
    pipe = tiny_sd1_pipeline()
    pipe.register_modules(unet=twin)
    diffusers_backend = DiffusersDenoiser(pipe)
    diffusers_backend.encode = lambda prompts: Cond({"context": torch.cat([clip.encode_from_tokens(p) for p in prompts])})
    comfy_backend = ComfyDenoiser(patcher, clip)

    pair = PromptPair(target="a person", positive="a person, old", negative="a person, young", eta=2.0,
                      preservation=("male", "female"))
    rows = []
    for label, denoiser in (("diffusers backend (peft LoRA)", diffusers_backend),
                            ("ComfyUI backend (weight wrappers, Train node path)", comfy_backend)):
        config = TrainConfig(iterations=args.iterations, resolution=64, rank=4)
        with torch.inference_mode(False):
            train_text_slider(denoiser, [pair], TrainConfig(iterations=3, resolution=64), name="warmup", progress=False)
            result = train_text_slider(denoiser, [pair], config, name="timed", progress=False)
        rows.append((label, result.seconds / args.iterations, result.unet_samples_per_iteration,
                     result.losses[0], result.losses[-1]))
    base = rows[0][1]
    print(f"tiny SD1.5-shaped UNet (ComfyUI model + diffusers twin), 64² px, {args.iterations} iterations, "
          f"2 preservation prompts, torch {torch.__version__}, {torch.get_num_threads()} thread(s)\n")
    print("| backend | wall / iteration | vs diffusers | UNet forwards / iteration |")
    print("|---|---|---|---|")
    for label, seconds, forwards, _, _ in rows:
        print(f"| {label} | {seconds * 1000:.1f} ms | {seconds / base:.2f}× | {forwards:.1f} |")


if __name__ == "__main__":
    main()
