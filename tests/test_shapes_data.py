"""Shapes world data and measurement: pure numpy, no torch."""
import math

import numpy as np
import pytest

from sliders_core.shapes import (
    COLORS,
    SHAPES,
    SIZE_AREA,
    SIZES,
    ShapeSpec,
    attribute_accuracy,
    caption_attributes,
    caption_vocabulary,
    make_dataset,
    measure,
    measure_batch,
    random_specs,
    render,
    render_batch,
)

RES = 32
TINTED = (0.15, 0.15, 0.25)  # grey-blue, like the backgrounds a model paints


@pytest.fixture(scope="module")
def specs() -> list[ShapeSpec]:
    return random_specs(np.random.default_rng(123), 500)


def _noisy(images: np.ndarray, seed: int, sigma: float = 0.05) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, sigma, images.shape)
    return np.clip(images + noise, 0.0, 1.0).astype(np.float32)


def _assert_exact(images: np.ndarray, specs: list[ShapeSpec]) -> None:
    for m, s in zip(measure_batch(images), specs):
        assert (m.size, m.color, m.shape) == (s.size, s.color, s.shape), (s, m)
    assert attribute_accuracy(images, specs) == {"size": 1.0, "color": 1.0, "shape": 1.0, "all": 1.0}


def test_specs_cover_every_attribute_value(specs):
    assert {s.size for s in specs} == set(SIZES)
    assert {s.color for s in specs} == set(COLORS)
    assert {s.shape for s in specs} == set(SHAPES)


def test_render_format():
    image = render(ShapeSpec("medium", "red", "circle", 0.5, 0.5))
    assert image.shape == (RES, RES, 3) and image.dtype == np.float32
    assert image.min() == 0.0 and image.max() == 1.0
    assert set(np.unique(image[..., 0])) == {0.0, 1.0}  # red only, on black
    assert image[..., 1:].max() == 0.0


def test_measurement_is_exact_on_clean_renders(specs):
    _assert_exact(render_batch(specs), specs)


@pytest.mark.parametrize("background", [(0.0, 0.0, 0.0), TINTED])
def test_measurement_is_exact_with_noise_and_tint(specs, background):
    _assert_exact(_noisy(render_batch(specs, background=background), seed=7), specs)


def test_centroid_within_one_pixel(specs):
    measured = measure_batch(_noisy(render_batch(specs, background=TINTED), seed=8))
    error_px = [max(abs(m.cx - s.cx), abs(m.cy - s.cy)) * RES for m, s in zip(measured, specs)]
    assert max(error_px) <= 1.0


def test_jitter_within_3px_and_inside_frame(specs):
    masks = render_batch(specs).max(axis=-1) > 0
    for mask in masks:
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        box_centre = np.array([rows[0] + rows[-1] + 1, cols[0] + cols[-1] + 1]) / 2
        assert np.abs(box_centre - RES / 2).max() <= 3.5  # +-3 px jitter, +-0.5 px raster
        assert rows[0] > 0 and cols[0] > 0 and rows[-1] < RES - 1 and cols[-1] < RES - 1


def test_equal_area_across_shape_types(specs):
    areas = {}
    for m, s in zip(measure_batch(render_batch(specs)), specs):
        areas.setdefault((s.size, s.shape), []).append(m.area_fraction)
    for (size, shape), values in areas.items():
        assert np.mean(values) == pytest.approx(SIZE_AREA[size], rel=0.06), (size, shape)


def test_size_levels_leave_room_both_ways():
    levels = [SIZE_AREA[s] for s in SIZES]
    ratios = np.array(levels[1:]) / np.array(levels[:-1])
    assert np.all(ratios >= 2.0)
    # A circle twice the large area still fits in the frame with the jitter.
    assert 2 * math.sqrt(2 * levels[-1] / math.pi) + 2 * 3 / RES < 1.0


def test_empty_image_does_not_crash():
    for image in (np.zeros((RES, RES, 3), np.float32),
                  _noisy(np.full((RES, RES, 3), TINTED, np.float32), seed=9)):
        m = measure(image)
        assert (m.size, m.color, m.shape) == ("none", "none", "none")
        assert m.area_fraction < 0.01 and math.isnan(m.cx)
    blank = np.zeros((2, RES, RES, 3), np.float32)
    result = attribute_accuracy(blank, [ShapeSpec("small", "red", "circle", 0.5, 0.5)] * 2)
    assert result == {"size": 0.0, "color": 0.0, "shape": 0.0, "all": 0.0}


def test_attribute_accuracy_counts_only_prompted_attributes():
    images = render_batch([ShapeSpec("small", "red", "circle", 0.5, 0.5)] * 2)
    targets = [{"size": "large", "color": None, "shape": "circle"},
               {"size": None, "color": None, "shape": "square"}]
    result = attribute_accuracy(images, targets)
    assert result["size"] == 0.0 and result["shape"] == 0.5 and math.isnan(result["color"])
    assert result["all"] == 0.0
    with pytest.raises(ValueError):
        attribute_accuracy(images, targets[:1])


def test_captions_follow_drop_rules():
    _, captions, specs = make_dataset(5000, seed=3)
    empty = [c == "" for c in captions]
    assert np.mean(empty) == pytest.approx(0.1, abs=0.015)
    named = {"size": [], "color": [], "shape": []}
    for text, spec in zip(captions, specs):
        if not text:
            continue
        words = text.split()
        assert words[0] == "a" and words[-1] in (spec.shape, "shape")
        assert words[1:-1] in ([], [spec.size], [spec.color], [spec.size, spec.color])
        for attribute, value in caption_attributes(text).items():
            assert value in (None, getattr(spec, attribute))
            named[attribute].append(value is not None)
    for attribute, kept in named.items():
        assert np.mean(kept) == pytest.approx(0.7, abs=0.03), attribute


@pytest.mark.parametrize("drop_prob,empty_prob,expected", [
    (0.0, 0.0, lambda s: f"a {s.size} {s.color} {s.shape}"),
    (1.0, 0.0, lambda s: "a shape"),
    (0.0, 1.0, lambda s: ""),
])
def test_caption_extremes(drop_prob, empty_prob, expected):
    _, captions, specs = make_dataset(50, seed=1, drop_prob=drop_prob, empty_prob=empty_prob)
    assert captions == [expected(s) for s in specs]


def test_deterministic_per_seed():
    images_a, captions_a, specs_a = make_dataset(300, seed=11)
    images_b, captions_b, specs_b = make_dataset(300, seed=11)
    images_c, captions_c, _ = make_dataset(300, seed=12)
    assert np.array_equal(images_a, images_b) and captions_a == captions_b and specs_a == specs_b
    assert not np.array_equal(images_a, images_c) and captions_a != captions_c


def test_dataset_images_match_specs():
    images, _, specs = make_dataset(64, seed=5, resolution=RES)
    assert images.shape == (64, RES, RES, 3) and images.dtype == np.float32
    assert np.array_equal(images, render_batch(specs))


def test_vocabulary_covers_every_caption_word():
    vocabulary = caption_vocabulary()
    assert vocabulary == sorted(set(vocabulary))
    _, captions, _ = make_dataset(2000, seed=4)
    seen = {word for text in captions for word in text.split()}
    assert seen == set(vocabulary)  # every caption word is known, every known word occurs
