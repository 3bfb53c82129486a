"""The shipped shapes model: loads offline, obeys its prompts, and a short slider training works on it."""

import numpy as np
import pytest
import torch

from sliders_core.backends.diffusers_backend import load_diffusers_model
from sliders_core.config import TrainConfig
from sliders_core.inference import generate
from sliders_core.prompts import PromptPair
from sliders_core.shapes.data import COLORS, SHAPES, SIZES
from sliders_core.shapes.metrics import attribute_accuracy, measure_batch
from sliders_core.shapes.model import DEFAULT_GUIDANCE, DEFAULT_STEPS, SHAPES_MODEL_DIR, sample_images
from sliders_core.text_slider import train_text_slider

RENDER = dict(steps=DEFAULT_STEPS, guidance=DEFAULT_GUIDANCE, resolution=32)


@pytest.fixture(scope="module")
def shapes():
    return load_diffusers_model(SHAPES_MODEL_DIR)


def test_shipped_model_loads_offline_with_its_family(shapes):
    assert shapes.family == "shapes" and shapes.default_resolution == 32 and shapes.vae is None
    assert shapes.sample_defaults.get("steps", DEFAULT_STEPS) == DEFAULT_STEPS


def test_batched_sampler_of_the_training_script_is_the_backends_sampler(shapes):
    seeds = [3, 4, 5]
    plain = generate(shapes, "a red circle", scales={}, seeds=seeds, steps=8, guidance=4.0, resolution=32)
    unet = shapes.unet
    unet.conv_in.weight.requires_grad_(True)  # as in training: the flags survive sampling
    try:
        batched = sample_images(shapes.pipe, ["a red circle"] * 3, seeds, steps=8, guidance=4.0)
        assert unet.conv_in.weight.requires_grad and not unet.conv_out.weight.requires_grad
    finally:
        unet.conv_in.weight.requires_grad_(False)
    torch.testing.assert_close(batched, plain, rtol=0, atol=1e-6)
    mixed = sample_images(shapes.pipe, ["a red circle", "a blue square", "a red circle"], seeds, steps=8, guidance=4.0)
    torch.testing.assert_close(mixed[0], batched[0], rtol=0, atol=1e-5)  # other prompts in the batch do not leak in
    assert not torch.allclose(mixed[1], batched[1], atol=1e-2)  # the second prompt really differs


def test_prompt_accuracy_stays_above_a_floor(shapes):
    rng = np.random.default_rng(0)
    prompts = [(SIZES[i % 3], COLORS[i % 4], SHAPES[(i // 4) % 3]) for i in range(12)]
    images, wanted = [], []
    for size, color, shape in prompts:
        seeds = [int(s) for s in rng.integers(0, 10**6, size=2)]
        images.append(generate(shapes, f"a {size} {color} {shape}", scales={}, seeds=seeds, **RENDER))
        wanted += [{"size": size, "color": color, "shape": shape}] * 2
    accuracy = attribute_accuracy(torch.cat(images).numpy(), wanted)
    # 24 images (chance: size .33, colour .25, shape .33); the shipped model gives .92 / 1.0 / 1.0 here.
    # scripts/eval_shapes_model.py measures the real numbers on >= 256 samples (.94 / 1.0 / 1.0).
    assert accuracy["size"] >= 0.75 and accuracy["color"] >= 0.9 and accuracy["shape"] >= 0.8, accuracy


def test_a_short_size_slider_training_moves_size_the_right_way(shapes):
    pair = PromptPair(target="a circle", positive="a large circle", negative="a small circle", eta=2.0)
    train_text_slider(shapes, [pair], TrainConfig(iterations=60, lr=2e-3, resolution=32, seed=0), name="size",
                      progress=False)
    seeds = list(range(16))

    def mean_area(alpha):
        images = generate(shapes, "a circle", scales={"size": alpha}, seeds=seeds, **RENDER)
        return np.nanmean([m.area_fraction for m in measure_batch(images.numpy())])

    small, large = mean_area(-2.0), mean_area(2.0)
    assert large > small + 0.03, (small, large)


def test_noising_convention_matches_what_the_shipped_model_learned(shapes):
    from sliders_core.shapes.data import make_dataset

    images, _, _ = make_dataset(8, seed=3)
    x0 = torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1  # the model's pixel space
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    level = torch.full((8,), 300)
    x_t = shapes.add_noise(x0, noise, level)
    with torch.no_grad():
        out = shapes.predict(x_t, level, shapes.encode(["a circle"] * 8))
    target = shapes.training_target(x0, noise, level)
    # a trained model predicts its training target far better than chance (a wrong convention would not)
    assert ((out - target) ** 2).mean() < 0.1 * (target ** 2).mean()
