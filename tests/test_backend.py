import json
import shutil

import pytest
import torch
from conftest import random_slider

from sliders_core.backends.diffusers_backend import DiffusersDenoiser, load_diffusers_model
from sliders_core.errors import SliderError
from sliders_core.inference import delayed_schedule, generate
from sliders_core.tiny import tiny_sd1_pipeline


def test_model_folder_loads_offline_and_matches_the_in_memory_model(sd1_folder, sd1):
    loaded = load_diffusers_model(sd1_folder)
    assert loaded.family == sd1.family
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([321])
    with torch.no_grad():
        # equal weights, equal function; oneDNN may pick another kernel for a separately built model (±1e-6)
        torch.testing.assert_close(loaded.predict(x, t, loaded.encode(["a dog"])), sd1.predict(x, t, sd1.encode(["a dog"])),
                                   rtol=1e-5, atol=1e-5)


def test_family_file_in_a_model_folder_names_the_family(sd1_folder, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(sd1_folder, folder)
    (folder / "sliders_model.json").write_text(json.dumps({"family": "shapes"}))
    assert load_diffusers_model(folder).family == "shapes"


def test_model_folder_missing_parts_says_which(sd1_folder, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(sd1_folder, folder)
    shutil.rmtree(folder / "unet")
    shutil.rmtree(folder / "tokenizer")
    with pytest.raises(SliderError, match=r"missing \['unet', 'tokenizer'\]"):
        load_diffusers_model(folder)
    (folder / "model_index.json").unlink()
    with pytest.raises(SliderError, match="model_index.json"):
        load_diffusers_model(folder)
    with pytest.raises(SliderError, match="not found"):
        load_diffusers_model(tmp_path / "nowhere")


def test_single_file_checkpoint_needs_a_local_config(tmp_path):
    from safetensors.torch import save_file

    ckpt = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(ckpt))
    with pytest.raises(SliderError, match="needs the matching diffusers config"):
        load_diffusers_model(ckpt)
    ckpt.write_bytes(b"junk")
    with pytest.raises(SliderError, match="corrupt"):
        load_diffusers_model(ckpt)


def test_per_step_unconditionals_reduce_to_one_when_equal(sd1):
    cond, uncond = sd1.encode(["a cat"]), sd1.encode([""])
    noise = sd1.initial_noise(1, 32, torch.Generator().manual_seed(0))
    one = sd1.sample(cond, uncond, guidance=5.0, steps=6, noise=noise).final
    per_step = sd1.sample(cond, [uncond] * 6, guidance=5.0, steps=6, noise=noise).final
    assert torch.equal(one, per_step)
    other = sd1.encode(["a dog"])
    changed = sd1.sample(cond, [uncond] * 5 + [other], guidance=5.0, steps=6, noise=noise).final
    assert not torch.equal(one, changed)
    with pytest.raises(SliderError, match="5 unconditional embeddings for 6 steps"):
        sd1.sample(cond, [uncond] * 5, guidance=5.0, steps=6, noise=noise)


def test_delayed_slider_at_0_is_plain_application_and_at_1_is_the_base_model(sd1):
    random_slider(sd1, scale=0.05)
    kwargs = dict(seeds=[3], steps=5, guidance=4.0, resolution=32)
    base = generate(sd1, "a person", scales={}, **kwargs)
    full = generate(sd1, "a person", scales={"s": 1.5}, **kwargs)
    assert not torch.equal(base, full)
    assert torch.equal(generate(sd1, "a person", scales={"s": 1.5}, start=0.0, **kwargs), full)
    assert torch.equal(generate(sd1, "a person", scales={"s": 1.5}, start=1.0, **kwargs), base)
    mid = generate(sd1, "a person", scales={"s": 1.5}, start=0.4, **kwargs)
    assert not torch.equal(mid, base) and not torch.equal(mid, full)


def test_delayed_schedule_switches_at_the_right_step():
    schedule = delayed_schedule({"s": 2.0}, 0.4)
    assert [schedule(i, 10) for i in range(10)] == [{}] * 4 + [{"s": 2.0}] * 6
    with pytest.raises(SliderError):
        delayed_schedule({"s": 1.0}, 1.5)


def test_resolution_must_fit_the_unet(sd1):
    with pytest.raises(SliderError, match="multiple of 4"):
        sd1.initial_noise(1, 30, torch.Generator())


def test_ddpm_scheduler_sampling_is_seeded(sd1):
    from diffusers import DDPMScheduler

    sd1.pipe.scheduler = DDPMScheduler.from_config(sd1.pipe.scheduler.config)
    cond, uncond = sd1.encode(["a cat"]), sd1.encode([""])
    noise = sd1.initial_noise(1, 32, torch.Generator().manual_seed(0))
    a = sd1.sample(cond, uncond, guidance=2.0, steps=4, noise=noise, generator=torch.Generator().manual_seed(1)).final
    b = sd1.sample(cond, uncond, guidance=2.0, steps=4, noise=noise, generator=torch.Generator().manual_seed(1)).final
    assert torch.equal(a, b)


def test_family_detection_of_standard_layouts():
    from types import SimpleNamespace

    from sliders_core.backends.diffusers_backend import detect_family

    def unet(**cfg):
        base = dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, sample_size=64,
                    in_channels=4, addition_embed_type=None)
        base.update(cfg)
        return SimpleNamespace(config=SimpleNamespace(**base, get=lambda k, d=None: base.get(k, d)))

    assert detect_family(unet(), False) == "sd1"
    assert detect_family(unet(cross_attention_dim=1024, sample_size=96), False) == "sd2"
    assert detect_family(unet(block_out_channels=(320, 640, 1280), cross_attention_dim=2048, sample_size=128,
                              addition_embed_type="text_time"), True) == "sdxl"
    assert detect_family(unet(block_out_channels=(32, 64)), False).startswith("sd-custom")
    assert DiffusersDenoiser(tiny_sd1_pipeline()).family.startswith("sd-custom")


def test_training_on_images_noises_and_targets_like_the_scheduler(sd1):
    from diffusers import DDPMScheduler

    from sliders_core.denoiser import Denoiser, SliderHost

    assert isinstance(sd1, Denoiser) and isinstance(sd1.sliders, SliderHost)  # the whole interface

    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    level = sd1.random_levels(3, torch.Generator().manual_seed(1))
    assert level.shape == (3,) and int(level.min()) >= 0 and int(level.max()) < 1000
    assert torch.equal(level, sd1.random_levels(3, torch.Generator().manual_seed(1)))
    reference = DDPMScheduler.from_config(sd1.pipe.scheduler.config)
    torch.testing.assert_close(sd1.add_noise(x0, noise, level), reference.add_noise(x0, noise, level))
    assert torch.equal(sd1.training_target(x0, noise, level), noise)  # an ε model
    config = sd1.pipe.scheduler.config
    try:  # a v model: x0 = √ᾱ x_t − √(1−ᾱ) v
        sd1.pipe.scheduler.register_to_config(prediction_type="v_prediction")
        a = reference.alphas_cumprod[level].view(-1, 1, 1, 1)
        v = sd1.training_target(x0, noise, level)
        torch.testing.assert_close(a.sqrt() * sd1.add_noise(x0, noise, level) - (1 - a).sqrt() * v, x0)
    finally:
        sd1.pipe.scheduler.register_to_config(prediction_type=config["prediction_type"])
