"""Image-pair sliders: data checks, shared noise and level, both signs trained, files."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sliders_core import pair_slider
from sliders_core.config import PairTrainConfig
from sliders_core.denoiser import Cond
from sliders_core.errors import SliderError, TrainingDivergedError
from sliders_core.formats import load_slider
from sliders_core.image_pairs import load_pair_folder, pair_folders, pairs_from_batches, prompts_per_pair
from sliders_core.pair_slider import train_pair_slider
from sliders_core.shapes.data import concept_pair_specs, pair_captions, render_concept_pairs
from sliders_core.shapes.metrics import measure_batch


def _write(folder, images, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        name = names[i] if names else f"{i:02d}.png"
        Image.fromarray((np.asarray(image) * 255).round().astype("uint8")).save(folder / name)


def _batch(n=4, side=32, seed=0):
    a, b = render_concept_pairs("size", n, seed, side)
    return torch.from_numpy(a), torch.from_numpy(b)


# -- shapes pairs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("balanced", [False, True])
@pytest.mark.parametrize("concept", ["size", "position"])
def test_shapes_pairs_differ_only_in_the_concept(concept, balanced):
    a, b = render_concept_pairs(concept, 12, seed=3, balanced=balanced)
    ma, mb = measure_batch(a), measure_batch(b)
    assert [m.color for m in ma] == [m.color for m in mb]
    assert [m.shape for m in ma] == [m.shape for m in mb]
    if concept == "size":
        assert all(x.area_fraction < 0.06 < 0.18 < y.area_fraction for x, y in zip(ma, mb))
        assert np.allclose([m.cx for m in ma], [m.cx for m in mb], atol=0.02)
    else:
        assert all(y.cx - x.cx > 0.15 for x, y in zip(ma, mb))
        assert np.allclose([m.area_fraction for m in ma], [m.area_fraction for m in mb], atol=0.01)
        assert np.allclose([m.cy for m in ma], [m.cy for m in mb], atol=1e-6)
    assert concept_pair_specs(concept, 5, 1) == concept_pair_specs(concept, 5, 1)


def test_balanced_pairs_take_every_colour_and_shape_in_turn_and_stay_in_frame():
    from sliders_core.shapes.data import COLORS, SHAPES

    specs = [a for a, _ in concept_pair_specs("size", 12, seed=0, balanced=True)]
    assert [s.color for s in specs] == [COLORS[i % 4] for i in range(12)]
    assert [s.shape for s in specs] == [SHAPES[i % 3] for i in range(12)]
    drawn = [a for a, _ in concept_pair_specs("size", 12, seed=0)]
    assert len({s.color for s in drawn[:6]}) < 4  # what balancing is for: 6 drawn pairs miss a colour
    a, b = render_concept_pairs("size", 12, seed=0, balanced=True)
    measured = measure_batch(a) + measure_batch(b)
    assert [m.shape for m in measured] == [s.shape for s in specs] * 2  # every shape whole, read back exactly


# -- data -----------------------------------------------------------------------------------------
def test_folder_layouts(tmp_path):
    a, b = _batch()
    _write(tmp_path / "plain" / "A", a)
    _write(tmp_path / "plain" / "B", b)
    pairs = load_pair_folder(tmp_path / "plain", 32)
    assert len(pairs) == 4 and pairs.strengths == [1.0] * 4
    assert torch.allclose(pairs.a, a, atol=1 / 255) and torch.allclose(pairs.b, b, atol=1 / 255)
    for level in ("1", "2"):
        _write(tmp_path / "levels" / level / "A", a[:2])
        _write(tmp_path / "levels" / level / "B", b[:2])
    assert sorted(e[0] for e in pair_folders(tmp_path / "levels")) == [1, 1, 2, 2]
    for scale, images in (("-2", a[:2]), ("-1", a[2:]), ("1", b[2:]), ("2", b[:2])):  # the official layout
        _write(tmp_path / "official" / scale, images)
    entries = pair_folders(tmp_path / "official")
    assert [(s, p.parent.name, q.parent.name) for s, _, p, q in entries][:1] == [(1.0, "-1", "1")]
    assert sorted(e[0] for e in entries) == [1, 1, 2, 2]


def test_other_sizes_are_resized_and_cropped_alike(tmp_path, caplog):
    a, b = _batch(2, side=64)
    wide = torch.cat([a, a[:, :, :16]], dim=2)  # 64 × 80
    pairs = pairs_from_batches(wide, b, resolution=32)
    assert pairs.a.shape == pairs.b.shape == (2, 32, 32, 3)
    assert "differ in size" in caplog.text
    assert torch.allclose(pairs.b, pairs_from_batches(b, b, 32).b)


@pytest.mark.parametrize("problem, message", [
    ("count", "3 image.*in A but 2 in B"),
    ("single", "1 image pair.*at least 2"),
    ("strengths", "3 strengths for 2 pairs"),
    ("negative", "positive numbers"),
])
def test_bad_batches(problem, message):
    a, b = _batch(3)
    kwargs = {}
    if problem == "count":
        b = b[:2]
    elif problem == "single":
        a, b = a[:1], b[:1]
    elif problem == "strengths":
        a, b, kwargs = a[:2], b[:2], {"strengths": [1, 2, 3]}
    else:
        kwargs = {"strengths": [-1]}
    with pytest.raises(SliderError, match=message):
        pairs_from_batches(a, b, 32, **kwargs)


def test_bad_folders_name_the_file(tmp_path):
    a, b = _batch(3)
    _write(tmp_path / "one_side" / "A", a)
    _write(tmp_path / "one_side" / "B", b[:2])
    with pytest.raises(SliderError, match=r"A/02\.png has no .*B/02"):
        load_pair_folder(tmp_path / "one_side", 32)
    _write(tmp_path / "broken" / "A", a)
    _write(tmp_path / "broken" / "B", b)
    (tmp_path / "broken" / "B" / "01.png").write_bytes(b"not a png")
    with pytest.raises(SliderError, match=r"cannot read image .*B/01\.png"):
        load_pair_folder(tmp_path / "broken", 32)
    (tmp_path / "no_b" / "A").mkdir(parents=True)
    with pytest.raises(SliderError, match="both an A/ and a B/"):
        load_pair_folder(tmp_path / "no_b", 32)
    with pytest.raises(SliderError, match="not found"):
        load_pair_folder(tmp_path / "missing", 32)


def test_captions_beside_the_pairs(tmp_path):
    from sliders_core.cli import main as cli_main

    cli_main(["make-pairs", "--concept", "size", "--count", "3", "--balanced", "--captions", "--out",
              str(tmp_path / "cap")])
    pairs = load_pair_folder(tmp_path / "cap", 32)
    assert pairs.prompts == pair_captions("size", 3, 0, balanced=True) == ["a red circle", "a green square",
                                                                           "a blue triangle"]
    assert load_pair_folder(tmp_path / "cap", 32).prompts == pairs.prompts  # stable order
    (tmp_path / "cap" / "A" / "001.txt").rename(tmp_path / "cap" / "B" / "001.txt")  # B's side is read too
    assert load_pair_folder(tmp_path / "cap", 32).prompts == pairs.prompts
    (tmp_path / "cap" / "A" / "001.txt").write_text("a blue  square\n")
    with pytest.raises(SliderError, match=r"captions .*A/001\.txt and .*B/001\.txt differ"):
        load_pair_folder(tmp_path / "cap", 32)
    (tmp_path / "cap" / "A" / "001.txt").unlink()
    (tmp_path / "cap" / "B" / "001.txt").unlink()
    with pytest.raises(SliderError, match=r"2 of 3 pairs have a caption.*A/001\.txt"):
        load_pair_folder(tmp_path / "cap", 32)


def test_a_prompt_box_gives_one_prompt_or_one_caption_per_pair():
    assert prompts_per_pair("", 3) == ("", None)
    assert prompts_per_pair("  a circle \n", 3) == ("a circle", None)
    assert prompts_per_pair("a red circle\n\na blue square\n a green triangle", 3) == (
        "", ["a red circle", "a blue square", "a green triangle"])
    with pytest.raises(SliderError, match="2 lines for 3 pairs"):
        prompts_per_pair("a\nb", 3)
    a, b = _batch(3)
    with pytest.raises(SliderError, match="2 captions for 3 pairs"):
        pairs_from_batches(a, b, 32, prompts=["a", "b"])


# -- training -------------------------------------------------------------------------------------
def _sd1_pairs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(3, 32, 32, 3, generator=gen) * 0.3
    return pairs_from_batches(a, (a + 0.5).clamp(0, 1), 32)


def test_a_and_b_share_noise_and_level(sd1, monkeypatch):
    seen = []
    original = sd1.add_noise

    def spy(x0, noise, level):
        seen.append((noise.clone(), level.clone()))
        return original(x0, noise, level)

    monkeypatch.setattr(sd1, "add_noise", spy)
    train_pair_slider(sd1, _sd1_pairs(), PairTrainConfig(iterations=4, rank=2), progress=False)
    assert len(seen) == 8
    for (noise_a, level_a), (noise_b, level_b) in zip(seen[0::2], seen[1::2]):
        assert torch.equal(noise_a, noise_b) and torch.equal(level_a, level_b)
    assert not torch.equal(seen[0][0], seen[2][0]) and not torch.equal(seen[0][1], seen[2][1])  # fresh each step


def test_each_pair_trains_on_its_own_caption(sd1, monkeypatch):
    pairs = _sd1_pairs()
    pairs.prompts = ["a red circle", "a blue square", "a red circle"]
    seen = []
    original = pair_slider.pair_losses

    def spy(denoiser, name, z_a, z_b, step, cond):
        seen.append((list(step.index), cond.tensors["context"].clone()))
        return original(denoiser, name, z_a, z_b, step, cond)

    monkeypatch.setattr(pair_slider, "pair_losses", spy)
    result = train_pair_slider(sd1, pairs, PairTrainConfig(iterations=6, rank=2, batch_size=2), progress=False)
    expected = {p: sd1.encode([p]).tensors["context"][0] for p in set(pairs.prompts)}
    assert {p: v.shape for p, v in expected.items()} and not torch.equal(*expected.values())
    for index, context in seen:
        assert len(index) == 2 and context.shape[0] == 2
        for i, row in zip(index, context):
            torch.testing.assert_close(row, expected[pairs.prompts[i]])
    assert json.loads(result.weights.metadata["sliders.captions"]) == pairs.prompts


def test_both_signs_are_trained_towards_their_side():
    """On the shapes model (a random model improves at every scale): after training, the slider at −1
    predicts A's noisy images better than at +1, and at +1 B's better than at −1."""
    from sliders_core.cli import load_model

    shapes = load_model("shapes")
    a, b = render_concept_pairs("size", 6, seed=0)
    pairs = pairs_from_batches(torch.from_numpy(a), torch.from_numpy(b), 32)
    result = train_pair_slider(shapes, pairs, PairTrainConfig(iterations=120, lr=2e-3, seed=0), name="p",
                               progress=False)
    assert np.mean(result.losses[-30:]) < np.mean(result.losses[:30])
    z_a, z_b = shapes.encode_images(pairs.a), shapes.encode_images(pairs.b)
    cond = shapes.encode([""]).repeat_each(len(pairs))
    for t in (300, 600):
        noise, level = torch.randn(z_a.shape, generator=torch.Generator().manual_seed(t)), torch.full((6,), t)

        def error(z, scale, noise=noise, level=level):
            shapes.sliders.set_scales({"p": scale})
            with torch.no_grad():
                out = shapes.predict(shapes.add_noise(z, noise, level), level, cond)
            return torch.nn.functional.mse_loss(out, shapes.training_target(z, noise, level)).item()

        assert error(z_a, -1.0) < error(z_a, 0.0) < error(z_a, 1.0), t
        assert error(z_b, 1.0) < error(z_b, 0.0) < error(z_b, -1.0), t


def test_pair_slider_file_resume_and_reproducibility(sd1, tmp_path):
    pairs = _sd1_pairs()
    config = PairTrainConfig(iterations=6, rank=2, save_every=3, seed=5)
    path = tmp_path / "p.safetensors"
    first = train_pair_slider(sd1, pairs, config, name="a", checkpoint_path=path, progress=False)
    saved = load_slider(path, sd1.naming, sd1.family)
    assert saved.metadata["sliders.kind"] == "pairs" and saved.metadata["sliders.steps"] == "6"
    again = train_pair_slider(sd1, pairs, config, name="b", progress=False)
    for p in first.weights.modules:
        assert torch.equal(first.weights.modules[p].up, again.weights.modules[p].up)
    half = PairTrainConfig(iterations=3, rank=2, seed=5)
    part = train_pair_slider(sd1, pairs, half, name="c", progress=False)
    resumed = train_pair_slider(sd1, pairs, config, name="d", resume=part.weights, progress=False)
    for p in first.weights.modules:
        torch.testing.assert_close(first.weights.modules[p].up, resumed.weights.modules[p].up, atol=1e-3, rtol=0.2)


def test_nan_guard_keeps_the_last_good_weights(sd1, tmp_path, monkeypatch):
    pairs = _sd1_pairs()
    calls = {"n": 0}
    original = pair_slider.pair_losses

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        a, b = original(*args, **kwargs)
        return (a * float("nan"), b) if calls["n"] == 3 else (a, b)

    monkeypatch.setattr(pair_slider, "pair_losses", poisoned)
    path = tmp_path / "nan.safetensors"
    with pytest.raises(TrainingDivergedError, match="diverged at step 3"):
        train_pair_slider(sd1, pairs, PairTrainConfig(iterations=5, rank=2), checkpoint_path=path, progress=False)
    assert load_slider(path, sd1.naming, sd1.family).metadata["sliders.steps"] == "2"


def test_encode_images_round_trips_on_pixel_models():
    from sliders_core.cli import load_model

    shapes = load_model("shapes")
    a, _ = _batch(2)
    assert torch.allclose(shapes.decode(shapes.encode_images(a)), a, atol=1e-6)


def test_sdxl_pair_slider_runs(sdxl):
    result = train_pair_slider(sdxl, _sd1_pairs(), PairTrainConfig(iterations=3, rank=2), progress=False)
    assert len(result.losses) == 3 and all(np.isfinite(result.losses))
    assert isinstance(sdxl.encode([""]), Cond)
