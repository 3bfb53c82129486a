"""The shapes world's image–text encoder: a small CLIP-style contrastive model on shapes renders.

It gives the shapes world what CLIP gives real models: image embeddings for SliderSpace (principal
directions of what the model varies) and a CLIP-style score for the benchmark. Images and captions
map to unit vectors in one space; a caption may name any subset of size, colour and shape ("a red
shape"), and it is trained to match every image it describes.

- Image tower: three stride-2 convolutions (32 → 4 px, position is kept) and a linear layer.
- Text tower: a bag of word embeddings over the caption vocabulary (captions here are short and
  their word order carries nothing) and a linear layer.
- Training (`scripts/train_shapes_encoder.py`): fresh renders every step, lightly noised so model
  samples are in range; a caption's positives are all the images in the batch it describes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ..errors import SliderError
from ..formats import write_safetensors
from .data import caption_vocabulary

ENCODER_DIR = Path(__file__).resolve().parents[2] / "models" / "shapes-encoder-v1"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


class ShapesEncoder(torch.nn.Module):
    def __init__(self, dim: int = 128, width: int = 32, resolution: int = 32):
        super().__init__()
        self.config = {"dim": dim, "width": width, "resolution": resolution, "vocabulary": caption_vocabulary()}
        self.words = {w: i for i, w in enumerate(self.config["vocabulary"])}
        self.image_tower = torch.nn.Sequential(
            torch.nn.Conv2d(3, width, 3, stride=2, padding=1), torch.nn.GELU(),
            torch.nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), torch.nn.GELU(),
            torch.nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), torch.nn.GELU(),
            torch.nn.Flatten(), torch.nn.Linear(2 * width * (resolution // 8) ** 2, dim))
        self.word_embedding = torch.nn.EmbeddingBag(len(self.words), dim, mode="sum")
        self.text_tower = torch.nn.Sequential(torch.nn.GELU(), torch.nn.Linear(dim, dim))
        self.log_temperature = torch.nn.Parameter(torch.tensor(2.5))  # logits scale e^2.5 ≈ 12 at the start

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, H, W, 3] in 0..1 (the IMAGE layout) → unit embeddings [B, dim]; differentiable."""
        side = self.config["resolution"]
        if images.dim() != 4 or images.shape[-1] != 3 or tuple(images.shape[1:3]) != (side, side):
            raise SliderError(f"the shapes encoder takes images [B, {side}, {side}, 3], got {tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2).float() * 2 - 1
        return F.normalize(self.image_tower(x), dim=-1)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The SliderSpace ImageEmbedder interface: the image embeddings."""
        return self.encode_images(images)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Captions → unit embeddings [B, dim]; unknown words are refused (the vocabulary has 12)."""
        ids, offsets = [], []
        for text in texts:
            offsets.append(len(ids))
            words = text.lower().split()
            unknown = [w for w in words if w not in self.words]
            if unknown or not words:
                raise SliderError(f"the shapes encoder knows only {sorted(self.words)}; got {text!r}")
            ids += [self.words[w] for w in words]
        bag = self.word_embedding(torch.tensor(ids), torch.tensor(offsets))
        return F.normalize(self.text_tower(bag), dim=-1)

    def logits(self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        return self.log_temperature.exp() * image_embeddings @ text_embeddings.T

    @torch.no_grad()
    def score(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """CLIP-score style agreement of each image with its caption: 100 · cos(image, text), [B]."""
        return 100 * (self.encode_images(images) * self.encode_texts(texts)).sum(dim=1)

    @torch.no_grad()
    def classify(self, images: torch.Tensor, choices: list[str]) -> list[int]:
        """Index of the best-matching caption for each image (zero-shot classification)."""
        return self.logits(self.encode_images(images), self.encode_texts(choices)).argmax(dim=1).tolist()

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_safetensors(self.state_dict(), {"sliders.kind": "shapes-encoder"}, folder / WEIGHTS_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps(self.config, indent=1) + "\n", encoding="utf-8")


def load_shapes_encoder(folder: str | Path = ENCODER_DIR) -> ShapesEncoder:
    folder = Path(folder)
    if not (folder / WEIGHTS_FILE).is_file():
        raise SliderError(f"no shapes encoder in {folder}; train it with scripts/train_shapes_encoder.py")
    config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    if config["vocabulary"] != caption_vocabulary():
        raise SliderError(f"{folder}: the encoder was trained on another caption vocabulary")
    encoder = ShapesEncoder(config["dim"], config["width"], config["resolution"])
    encoder.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    return encoder.eval().requires_grad_(False)
