"""Null-text / negative-prompt / DDIM inversion and slider edits of inverted images (sliders_core.inversion)."""

import pytest
import torch
from conftest import random_slider

from sliders_core.errors import SliderError
from sliders_core.inversion import (
    InversionConfig,
    edit,
    invert,
    load_inversion,
    psnr,
    sample_inversion,
    save_inversion,
)

# random-weight tiny UNets are far from smooth: a larger lr lets the null-text fit show in few steps
TINY = dict(steps=8, guidance=7.5, inner_iterations=10, lr=0.1)


def _photo(denoiser, seed=0):
    side = denoiser.default_resolution
    return torch.rand(1, side, side, 3, generator=torch.Generator().manual_seed(seed))


def _latent_error(denoiser, inversion, images):
    return (sample_inversion(denoiser, inversion) - denoiser.encode_images(images)).pow(2).mean().sqrt().item()


@pytest.mark.parametrize("model", ["sd1", "sdxl"])
def test_null_text_reconstructs_far_better_than_plain_ddim(model, request):
    denoiser = request.getfixturevalue(model)
    photo = _photo(denoiser)
    errors = {method: _latent_error(denoiser, invert(denoiser, photo, "a red circle",
                                                     InversionConfig(method=method, **TINY)), photo)
              for method in ("ddim", "null-text")}
    assert errors["null-text"] < 0.5 * errors["ddim"], errors


def test_sdxl_null_text_optimises_every_unconditional_tensor(sdxl):
    inversion = invert(sdxl, _photo(sdxl), "a red circle", InversionConfig(**TINY))
    empty = sdxl.encode([""])
    assert set(inversion.unconds[0].tensors) == {"context", "text_embeds"}
    for key in ("context", "text_embeds"):  # both encoders' states and the pooled embedding move
        assert not torch.allclose(inversion.unconds[-1].tensors[key], empty.tensors[key])


@pytest.fixture(scope="module")
def shapes():
    from sliders_core.backends.diffusers_backend import load_diffusers_model
    from sliders_core.shapes.model import SHAPES_MODEL_DIR

    return load_diffusers_model(SHAPES_MODEL_DIR)


@pytest.fixture(scope="module")
def shapes_photo():
    from sliders_core.shapes.data import ShapeSpec, render

    return torch.from_numpy(render(ShapeSpec("medium", "red", "triangle", 0.47, 0.53), 32)).float()[None]


def test_shapes_null_text_is_faithful(shapes, shapes_photo):
    """The project's trained model: null-text ≥ 30 dB and well above the empty-prompt DDIM baseline."""
    scores, reports = {}, {}
    for method in ("ddim", "negative-prompt", "null-text"):
        inversion = invert(shapes, shapes_photo, "a medium red triangle", InversionConfig(steps=25, guidance=7.5,
                                                                                           method=method))
        scores[method] = psnr(shapes.decode(sample_inversion(shapes, inversion)), shapes_photo)
        reports[method] = inversion.report
    assert scores["null-text"] >= 30 and scores["null-text"] > scores["ddim"] + 5, scores
    # the inner loop stops early once converged, and negative-prompt needs no unconditional forwards
    assert reports["null-text"]["backward_passes"] < 25 * 10
    assert reports["negative-prompt"]["forwards"] == 25


def test_alpha_zero_edit_is_the_reconstruction_and_alpha_moves_it(sd1):
    photo = _photo(sd1)
    inversion = invert(sd1, photo, "a red circle", InversionConfig(method="negative-prompt", steps=6))
    reconstruction = sd1.decode(sample_inversion(sd1, inversion))
    random_slider(sd1, "s")
    assert torch.equal(edit(sd1, inversion, {"s": 0.0}, start=0.5), reconstruction)
    moved = edit(sd1, inversion, {"s": 2.0}, start=0.5)
    assert (moved - reconstruction).abs().max() > 1e-3
    # the slider is off for the first half: switching it on at the very end changes less
    late = edit(sd1, inversion, {"s": 2.0}, start=5 / 6)
    assert (late - reconstruction).abs().mean() < (moved - reconstruction).abs().mean()


def test_inversion_refuses_another_step_count_family_checkpoint_or_schedule(sd1, sdxl):
    from sliders_core.backends.diffusers_backend import DiffusersDenoiser
    from sliders_core.tiny import tiny_sd1_pipeline

    inversion = invert(sd1, _photo(sd1), "", InversionConfig(method="negative-prompt", steps=4))
    with pytest.raises(SliderError, match="4 steps, not 5"):
        inversion.check_fits(sd1, steps=5)
    with pytest.raises(SliderError, match="made on a"):
        sample_inversion(sdxl, inversion)
    with pytest.raises(SliderError, match="another checkpoint"):
        sample_inversion(DiffusersDenoiser(tiny_sd1_pipeline(seed=1)), inversion)
    inversion.levels = inversion.levels + 1
    with pytest.raises(SliderError, match="another noise schedule"):
        sample_inversion(sd1, inversion)


@pytest.mark.parametrize("method", ["null-text", "negative-prompt"])
def test_inversion_file_round_trip_is_exact(sd1, tmp_path, method):
    inversion = invert(sd1, _photo(sd1), "a red circle", InversionConfig(method=method, steps=4, inner_iterations=2))
    path = save_inversion(inversion, tmp_path / "photo.safetensors")
    loaded = load_inversion(path)
    assert (loaded.steps, loaded.method, loaded.guidance, loaded.prompt) == (4, method, 7.5, "a red circle")
    assert torch.equal(sample_inversion(sd1, loaded), sample_inversion(sd1, inversion))
    assert [p.name for p in tmp_path.iterdir()] == ["photo.safetensors"]  # no temp file left behind


def test_corrupt_or_foreign_inversion_files_error(sd1, tmp_path):
    from safetensors.torch import load_file, save_file

    path = save_inversion(invert(sd1, _photo(sd1), "", InversionConfig(method="null-text", steps=3,
                                                                        inner_iterations=1)),
                          tmp_path / "inv.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(SliderError, match="corrupt"):
        load_inversion(truncated)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    del tensors["uncond.1.context"]
    save_file(tensors, tmp_path / "missing.safetensors", metadata=metadata)
    with pytest.raises(SliderError, match="not a complete inversion"):
        load_inversion(tmp_path / "missing.safetensors")
    save_file({"x": torch.zeros(1)}, tmp_path / "lora.safetensors")
    with pytest.raises(SliderError, match="not an inversion file"):
        load_inversion(tmp_path / "lora.safetensors")
    with pytest.raises(SliderError, match="saved as .safetensors"):
        save_inversion(load_inversion(path), tmp_path / "inv.pt")


def test_callback_sees_every_model_call_and_can_cancel(sd1):
    calls = []

    def cancel_on_third(step, iteration, loss):
        calls.append((step, iteration))
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        invert(sd1, _photo(sd1), "", InversionConfig(steps=4, inner_iterations=5, lr=1e-6, early_stop=0.0,
                                                       early_stop_growth=0.0), callback=cancel_on_third)
    assert calls == [(0, 0), (0, 1), (0, 2)]


def test_bad_options_error(sd1):
    for bad in (dict(method="magic"), dict(steps=0), dict(guidance=0.5), dict(inner_iterations=-1)):
        with pytest.raises(SliderError):
            invert(sd1, _photo(sd1), "", InversionConfig(**bad))
