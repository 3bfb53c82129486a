"""A CLIP vision model from a local transformers folder as a SliderSpace image embedder.

The reference embeds with CLIP; any folder `CLIPVisionModelWithProjection.from_pretrained` reads
works (a full CLIP model folder too: its vision half and projection are used). Preprocessing is
CLIP's (resize the short side, centre-crop, normalise) in torch, so gradients reach the image;
the image processor's PIL path would cut them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import SliderError

# CLIP's published normalisation; a folder's preprocessor_config.json overrides it
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """IMAGE [B, H, W, 3] 0..1 → pixel values [B, 3, size, size]: short side to `size` (bicubic,
    antialiased), centre crop, normalise. Differentiable (no rounding to 8 bits)."""
    if images.dim() != 4 or images.shape[-1] < 3:
        raise SliderError(f"the image embedder takes images [B, H, W, 3], got {tuple(images.shape)}")
    x = images[..., :3].movedim(-1, 1).float()
    if x.shape[-2:] != (size, size):
        scale = size / min(x.shape[-2:])
        x = F.interpolate(x, size=(round(x.shape[-2] * scale), round(x.shape[-1] * scale)), mode="bicubic",
                          antialias=True)
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        x = x[..., top:top + size, left:left + size]
    x = x.clamp(0, 1)
    return (x - torch.tensor(mean, device=x.device).view(3, 1, 1)) / torch.tensor(std, device=x.device).view(3, 1, 1)


class TransformersClipEmbedder:
    """SliderSpace ImageEmbedder over `CLIPVisionModelWithProjection`: unit image embeddings."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import CLIPVisionModelWithProjection

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise SliderError(f"{folder} is not a transformers model folder (no config.json): give a local CLIP "
                              "folder such as one saved by save_pretrained (openai/clip-vit-large-patch14)")
        try:
            self.model = CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True,
                                                                       torch_dtype=dtype)
        except (OSError, ValueError, KeyError) as error:
            raise SliderError(f"{folder} does not hold a CLIP vision model: {error}") from error
        self.model.to(device).eval().requires_grad_(False)
        processor = folder / "preprocessor_config.json"
        settings = json.loads(processor.read_text(encoding="utf-8")) if processor.is_file() else {}
        self.mean, self.std = settings.get("image_mean", CLIP_MEAN), settings.get("image_std", CLIP_STD)
        self.size = self.model.config.image_size
        self.device, self.dtype = torch.device(device), dtype

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        pixels = clip_preprocess(images.to(self.device), self.size, self.mean, self.std).to(self.dtype)
        return F.normalize(self.model(pixel_values=pixels).image_embeds.float(), dim=-1)
