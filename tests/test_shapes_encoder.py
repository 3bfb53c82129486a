"""The shapes world's image–text encoder (sliders_core/shapes/encoder.py, shipped in models/shapes-encoder-v1)."""

import numpy as np
import pytest
import torch

from sliders_core.errors import SliderError
from sliders_core.shapes.data import COLORS, SHAPES, SIZES, random_specs, render_batch
from sliders_core.shapes.encoder import load_shapes_encoder
from sliders_core.shapes.metrics import measure_batch

ATTRIBUTES = {"size": SIZES, "color": COLORS, "shape": SHAPES}


@pytest.fixture(scope="module")
def encoder():
    return load_shapes_encoder()


def zero_shot(encoder, images, truth) -> dict[str, float]:
    scores = {}
    for attribute, values in ATTRIBUTES.items():
        prompts = [f"a {v}" if attribute == "shape" else f"a {v} shape" for v in values]
        chosen = encoder.classify(images, prompts)
        scores[attribute] = float(np.mean([values[c] == t[attribute] for c, t in zip(chosen, truth)]))
    return scores


def test_zero_shot_attribute_accuracy_on_fresh_renders(encoder):
    specs = random_specs(np.random.default_rng(2024), 300)
    truth = [{"size": s.size, "color": s.color, "shape": s.shape} for s in specs]
    scores = zero_shot(encoder, torch.from_numpy(render_batch(specs)), truth)
    assert min(scores.values()) >= 0.95, scores


def test_zero_shot_agrees_with_the_pixel_metrics_on_model_samples(encoder):
    """On the shapes model's own samples (what SliderSpace embeds), against what the exact metrics measure."""
    from sliders_core.cli import load_model
    from sliders_core.inference import generate

    model = load_model("shapes")
    prompts = ["a large red circle", "a small blue square", "a medium yellow triangle", "a large green square"]
    images = torch.cat([generate(model, p, scales={}, seeds=[0, 1, 2], steps=25, guidance=3.0) for p in prompts])
    measured = [m for m in measure_batch(images.numpy())]
    truth = [{"size": m.size, "color": m.color, "shape": m.shape} for m in measured]
    scores = zero_shot(encoder, images.float(), truth)
    assert min(scores.values()) >= 0.8, scores


def test_embeddings_are_unit_length_and_differentiable(encoder):
    images = torch.from_numpy(render_batch(random_specs(np.random.default_rng(0), 4))).requires_grad_(True)
    embeddings = encoder.encode_images(images)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(4))
    embeddings[:, 0].sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0  # SliderSpace trains through it
    texts = encoder.encode_texts(["a red shape", "a large blue circle"])
    torch.testing.assert_close(texts.norm(dim=1), torch.ones(2))


def test_bad_input_is_refused(encoder):
    with pytest.raises(SliderError, match=r"images \[B, 32, 32, 3\]"):
        encoder.encode_images(torch.zeros(1, 64, 64, 3))
    with pytest.raises(SliderError, match="knows only"):
        encoder.encode_texts(["a purple circle"])


def test_score_prefers_the_true_caption(encoder):
    specs = random_specs(np.random.default_rng(7), 50)
    images = torch.from_numpy(render_batch(specs))
    right = encoder.score(images, [f"a {s.size} {s.color} {s.shape}" for s in specs])
    other = {"red": "blue", "green": "yellow", "blue": "red", "yellow": "green"}
    wrong = encoder.score(images, [f"a {s.size} {other[s.color]} {s.shape}" for s in specs])
    assert (right > wrong).all() and float((right - wrong).mean()) > 10
