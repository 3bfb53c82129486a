"""Discover Sliders (SliderSpace, sliders_core.sliderspace) and Select Slider, on the graph's MODEL, CLIP, VAE and
CLIP_VISION."""

from __future__ import annotations

import math

import torch

from ..sliders_core.errors import SliderError
from ..sliders_core.formats import load_slider, safe_output_path
from ..sliders_core.inference import grid_image, slider_rows
from ..sliders_core.plots import bar_plot
from ..sliders_core.sliderspace import ROTATIONS, SliderSpaceConfig, check_concept, concept_slug, discover_sliders
from .common import CATEGORY, SLIDER, SliderFile, pil_to_image, sliders_dir

SLIDERS = "SLIDERS"  # a list of SliderFile: Select Slider picks one
PREVIEW_ALPHAS = (-2.0, -1.0, 0.0, 1.0, 2.0)


class DiscoverSliders:
    DESCRIPTION = ("SliderSpace: finds what the model varies for one concept prompt, with no labels. It generates "
                   "images of the concept, embeds them (CLIP vision, or the shapes model's own encoder), takes the "
                   "K main directions of the embeddings and trains one slider per direction. Saves "
                   "models/loras/sliders/<concept>/<concept>_<j>.safetensors, each a normal slider file.")
    CATEGORY = f"{CATEGORY}/train"
    RETURN_TYPES = (SLIDERS, "IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("sliders", "preview", "explained_variance", "report")
    OUTPUT_TOOLTIPS = ("The K discovered sliders; pick one with Select Slider.",
                       "One row per slider, the concept at α = −2, −1, 0, 1, 2 (one seed).",
                       "How much of the images' variation each direction explains.",
                       "What was found and what it cost.")
    FUNCTION = "discover"

    @classmethod
    def INPUT_TYPES(cls):
        defaults = SliderSpaceConfig()
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to explore (SD1.x, SD2, SDXL or the shapes model)."}),
            "clip": ("CLIP", {"tooltip": "The model's text encoder."}),
            "vae": ("VAE", {"tooltip": "The model's VAE: sliders are trained through the decoded images."}),
            "concept": ("STRING", {"default": "a shape", "tooltip": "The concept to explore, e.g. 'a dog'."}),
            "variations": ("STRING", {"default": "", "multiline": True, "tooltip":
                           "Optional prompt variations, one per line, cycled over the images (no LLM needed); "
                           "empty: the concept itself."}),
            "images": ("INT", {"default": 48, "min": 3, "max": 10000, "tooltip":
                       "Images of the concept to generate and embed (more: steadier directions)."}),
            "k": ("INT", {"default": 4, "min": 1, "max": 64, "tooltip": "Sliders (directions) to find."}),
            "rotation": (list(ROTATIONS), {"tooltip": "independent: the main directions rotated so each varies "
                         "independently of the others (one attribute per slider); pca: the principal axes, as "
                         "in the paper (they can mix attributes that vary equally)."}),
            "iterations": ("INT", {"default": defaults.iterations, "min": 1, "max": 100000,
                           "tooltip": "Training steps per slider."}),
            "lr": ("FLOAT", {"default": defaults.lr, "min": 1e-6, "max": 0.1, "step": 1e-4,
                   "tooltip": "AdamW learning rate (rank-1 sliders on cross-attention keys and values)."}),
            "steps": ("INT", {"default": 25, "min": 1, "max": 200, "tooltip": "Sampling steps per image."}),
            "resolution": ("INT", {"default": 0, "min": 0, "max": 2048, "step": 8, "tooltip":
                           "Image size; 0: the model's own (512 SD1.x, 768 SD2, 1024 SDXL, 32 shapes)."}),
            "cfg": ("FLOAT", {"default": 3.0, "min": 1.0, "max": 30.0, "step": 0.5, "tooltip":
                    "Guidance scale of the generated images (3 suits the shapes model, about 7 SD)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "control_after_generate": "fixed",
                     "tooltip": "Same seed, same images, directions and sliders."}),
            "resume": ("BOOLEAN", {"default": False, "tooltip": "Continue the sliders already in the concept's "
                       "folder (same concept and settings); finished ones are kept."}),
        }, "optional": {
            "clip_vision": ("CLIP_VISION", {"tooltip": "Image embedder (Load CLIP Vision). Leave it unconnected "
                            "on the shapes model: its own encoder, shipped with the pack, is used."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def discover(self, model, clip, vae, concept, variations, images, k, rotation, iterations, lr, steps, resolution,
                 cfg, seed, resume, clip_vision=None, unique_id=None):
        import comfy.model_management
        import comfy.utils

        from .comfy_backend import ClipVisionEmbedder, ComfyDenoiser, model_family, show_text

        check_concept(concept)  # before any folder or model is touched
        config = SliderSpaceConfig(lr=lr, iterations=iterations, seed=seed)
        config.validate()
        slug = concept_slug(concept)
        folder = safe_output_path(sliders_dir(), slug, suffix="")  # sliders/<concept>/
        paths = [folder / f"{slug}_{j}.safetensors" for j in range(k)]
        if clip_vision is None and model_family(model) != "shapes":
            raise SliderError("connect an image embedder to clip_vision (Load CLIP Vision): only the shapes model "
                              "has one built in")
        # one bar over the three phases: sampling the concept images (batches of 16), training, the preview
        sampling_calls = -(-images // 16) * steps
        progress = comfy.utils.ProgressBar(sampling_calls + k * iterations + k * len(PREVIEW_ALPHAS) * steps)
        calls = {"sampling": 0, "preview": 0}

        def sampled(_step, _total):  # one model call while generating the concept images
            comfy.model_management.throw_exception_if_processing_interrupted()
            calls["sampling"] += 1
            progress.update_absolute(calls["sampling"])

        def trained(step, total, loss):
            comfy.model_management.throw_exception_if_processing_interrupted()
            progress.update_absolute(sampling_calls + step)
            if not math.isnan(loss):
                show_text(unique_id, f"slider {min(step // iterations, k - 1) + 1}/{k} · step {step}/{total} · "
                                     f"loss {loss:.4g}")

        def previewed(_step, _total):
            comfy.model_management.throw_exception_if_processing_interrupted()
            calls["preview"] += 1
            progress.update_absolute(sampling_calls + k * iterations + calls["preview"])

        with torch.inference_mode(False):  # ComfyUI runs nodes under inference mode
            if clip_vision is not None:
                embedder = ClipVisionEmbedder(clip_vision)
            else:
                from ..sliders_core.shapes.encoder import load_shapes_encoder

                embedder = load_shapes_encoder().to(comfy.model_management.get_torch_device())
            denoiser = ComfyDenoiser(model, clip, vae)
            prior = [load_slider(p, denoiser.naming, denoiser.family) if resume and p.is_file() else None
                     for p in paths]
            folder.mkdir(parents=True, exist_ok=True)
            sampling = {"steps": steps, "guidance": cfg, "resolution": resolution or None}
            found = discover_sliders(denoiser, embedder, concept, config, count=images, k=k,
                                     variations=variations.splitlines(), rotation=rotation, name=slug, resume=prior,
                                     checkpoint_dir=folder, callback=trained, sample_callback=sampled, progress=False,
                                     **sampling)
            columns = slider_rows(denoiser, concept, found.names, PREVIEW_ALPHAS, seed=seed, callback=previewed,
                                  **sampling)
        explained = [float(v) for v in found.explained]
        sliders = [SliderFile.from_weights(r.weights, p.stem) for r, p in zip(found.results, paths)]
        report = (f"{k} sliders for {concept!r} from {images} images ({rotation} directions), saved in "
                  f"sliders/{slug}/; explained variance " + ", ".join(f"{v:.1%}" for v in explained)
                  + "; final loss " + ", ".join(f"{r.final_loss:.3f}" for r in found.results if r.losses))
        plot = bar_plot(explained, [f"slider {j}" for j in range(k)], f"explained variance, {concept!r}")
        grid = grid_image(columns, [f"alpha={a:g}" for a in PREVIEW_ALPHAS], cell=64)  # PIL's font has no α
        return {"ui": {"text": [report]}, "result": (sliders, pil_to_image(grid), pil_to_image(plot), report)}


class SelectSlider:
    DESCRIPTION = "Picks one slider out of the list Discover Sliders found."
    CATEGORY = CATEGORY
    RETURN_TYPES = (SLIDER,)
    OUTPUT_TOOLTIPS = ("The chosen slider, for Apply Slider, Slider Stack, the Delayed-LoRA Sampler or Slider Sweep.",)
    FUNCTION = "select"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "sliders": (SLIDERS, {"tooltip": "The sliders from Discover Sliders."}),
            "index": ("INT", {"default": 0, "min": 0, "max": 63, "tooltip": "Which one: 0 = the first direction "
                      "(the most variation)."}),
        }}

    def select(self, sliders, index):
        if index >= len(sliders):
            raise SliderError(f"there are {len(sliders)} sliders (indices 0–{len(sliders) - 1}); index {index} "
                              "does not exist")
        return (sliders[index],)
