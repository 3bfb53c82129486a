"""Many sliders at once: folded into the weights for sampling, restored exactly afterwards."""

import contextlib

import pytest
import torch
from conftest import random_slider

from sliders_core.errors import SliderError
from sliders_core.inference import generate


def attach(denoiser, n, scale=0.05):
    names = [f"s{i}" for i in range(n)]
    for i, name in enumerate(names):
        random_slider(denoiser, name, seed=i, scale=scale)
    return names


def base_weights(denoiser):
    return {k: v.clone() for k, v in denoiser.unet.state_dict().items() if "base_layer" in k}


def live_only(denoiser):
    """The same host with folding switched off: every slider runs its own LoRA branch."""
    denoiser.sliders.merging = contextlib.nullcontext


def test_merged_sliders_predict_what_live_ones_do_and_the_weights_come_back_bit_for_bit(sd1):
    names = attach(sd1, 12)
    scales = {name: (-1) ** i * (0.3 + 0.1 * i) for i, name in enumerate(names)}
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    level, cond = torch.tensor([500, 500]), sd1.encode(["a photo", "a cat"])
    before = base_weights(sd1)
    with torch.no_grad():
        sd1.sliders.set_scales(scales)
        live = sd1.predict(x, level, cond)
        sd1.sliders.set_scales({})
        base = sd1.predict(x, level, cond)
        with sd1.sliders.merging():
            sd1.sliders.set_scales(scales)
            merged = sd1.predict(x, level, cond)
        after = sd1.predict(x, level, cond)
    assert (live - base).abs().max() > 1e-2  # the sliders do something
    assert torch.allclose(merged, live, atol=1e-5, rtol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in base_weights(sd1).items())
    assert torch.equal(after, base)  # every slider off again


def test_generate_with_merged_sliders_equals_live_composition_also_when_delayed(sd1):
    names = attach(sd1, 6)
    scales = {name: 0.7 for name in names}
    kwargs = dict(scales=scales, seeds=[0, 1], steps=6, guidance=3.0)
    before = base_weights(sd1)
    merged = [generate(sd1, "a cat", **kwargs), generate(sd1, "a cat", start=0.5, **kwargs)]
    assert all(torch.equal(before[k], v) for k, v in base_weights(sd1).items())
    live_only(sd1)
    live = [generate(sd1, "a cat", **kwargs), generate(sd1, "a cat", start=0.5, **kwargs)]
    for m, v in zip(merged, live):
        assert (m - v).abs().max() < 1e-3
    assert (merged[0] - merged[1]).abs().max() > 1e-2  # the switch-on step mattered


def test_a_slider_whose_scale_changes_leaves_the_fold_and_runs_live(sd1):
    names = attach(sd1, 3)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    level, cond = torch.tensor([300]), sd1.encode(["a cat"])
    host = sd1.sliders
    with torch.no_grad():
        expected = {}
        for ramp in (0.2, 0.9):
            host.set_scales({names[0]: 1.0, names[1]: -1.0, names[2]: ramp})
            expected[ramp] = sd1.predict(x, level, cond)
        with host.merging():
            host.set_scales({names[0]: 1.0, names[1]: -1.0, names[2]: 0.2})
            assert host._merge.live == set()
            first = sd1.predict(x, level, cond)
            host.set_scales({names[0]: 1.0, names[1]: -1.0, names[2]: 0.9})
            assert host._merge.live == {names[2]} and set(host._merge.merged) == set(names[:2])
            second = sd1.predict(x, level, cond)
    assert torch.allclose(first, expected[0.2], atol=1e-5, rtol=1e-4)
    assert torch.allclose(second, expected[0.9], atol=1e-5, rtol=1e-4)


def test_the_frozen_model_and_removal_are_refused_while_merged(sd1):
    attach(sd1, 1)
    with sd1.sliders.merging():
        sd1.sliders.set_scales({"s0": 1.0})
        with pytest.raises(SliderError, match="frozen model"):
            with sd1.sliders.disabled():
                pass
        with pytest.raises(SliderError, match="remove"):
            sd1.sliders.remove("s0")
        with pytest.raises(SliderError, match="already"):
            with sd1.sliders.merging():
                pass
