"""ComfyUI tier, in-process: the pack's nodes and backend on tiny ComfyUI models (needs COMFYUI_DIR)."""

import zlib
from pathlib import Path

import comfy_support
import pytest
import torch

if comfy_support.comfyui_dir() is None:
    pytest.skip("COMFYUI_DIR not set: the ComfyUI tier needs a ComfyUI checkout (see README)", allow_module_level=True)
try:
    C = comfy_support.import_comfy()
except comfy_support.ComfyUnavailable as exc:
    pytest.skip(f"ComfyUI not importable here: {exc}", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]


PACK = comfy_support.load_pack()
from concept_sliders_pack.nodes import NODE_CLASS_MAPPINGS  # noqa: E402
from concept_sliders_pack.nodes.comfy_backend import ComfyDenoiser  # noqa: E402
from concept_sliders_pack.nodes.common import SliderFile  # noqa: E402
from concept_sliders_pack.sliders_core.errors import FamilyMismatchError, SliderError  # noqa: E402


class FakeClip:
    """Deterministic stand-in for a CLIP: each prompt maps to fixed random embeddings."""

    def __init__(self, dim=768, pooled_dim=1280):
        self.dim, self.pooled_dim = dim, pooled_dim

    def tokenize(self, text):
        return text

    def encode_from_tokens(self, tokens, return_pooled=False):
        gen = torch.Generator().manual_seed(zlib.crc32(tokens.encode()))
        cond = torch.randn(1, 77, self.dim, generator=gen)
        pooled = torch.randn(1, self.pooled_dim, generator=gen)
        return (cond, pooled) if return_pooled else cond

    def conditioning(self, text):
        cond, pooled = self.encode_from_tokens(text, return_pooled=True)
        return [[cond, {"pooled_output": pooled}]]

    encode_from_tokens_scheduled = conditioning  # what the stock CLIPTextEncode calls


@pytest.fixture
def loras(tmp_path, monkeypatch):
    folder_paths = C["folder_paths"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(tmp_path)], {".safetensors", ".pt"}))
    folder_paths.filename_list_cache.clear() if hasattr(folder_paths, "filename_list_cache") else None
    return tmp_path


def train(model, clip, name="age", iterations=6, **overrides):
    args = dict(model=model, clip=clip, target="a person", positive="a person, old", negative="a person, young",
                preservation="male\nfemale", action="enhance", eta=2.0, rank=2, alpha=1.0, layers="noxattn",
                iterations=iterations, lr=3e-3, resolution=64, seed=0, slider_name=name, save_every=0,
                resume_from="none")
    args.update(overrides)
    with torch.inference_mode():  # as ComfyUI runs every node
        return NODE_CLASS_MAPPINGS["ConceptSlidersTrainText"]().train(**args)["result"]


def forward(patcher, clip, alpha_model=None):
    gen = torch.Generator().manual_seed(5)
    x, sigma = torch.randn(1, 4, 8, 8, generator=gen), torch.tensor([3.0])
    context = clip.encode_from_tokens("a person")
    return comfy_support.patcher_forward(patcher, x, sigma, context)


def test_denoiser_predicts_eps_from_the_hosts_denoised_output():
    patcher, clip = comfy_support.tiny_sd15_patcher(), FakeClip()
    denoiser = ComfyDenoiser(patcher, clip)
    assert denoiser.family == "sd1"
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([2.0, 0.5])
    cond = denoiser.encode(["a", "b"])
    denoiser.load()
    with torch.no_grad():
        eps = denoiser.predict(x, sigma, cond)
        x0 = patcher.model.apply_model(x, sigma, c_crossattn=cond.tensors["context"])
    assert torch.allclose(eps, (x - x0) / sigma.view(-1, 1, 1, 1), atol=1e-5)


def test_comfy_sampler_takes_one_unconditional_per_step_for_null_text_inversion():
    from concept_sliders_pack.sliders_core.errors import SliderError

    denoiser = ComfyDenoiser(comfy_support.tiny_sd15_patcher(), FakeClip())
    cond, uncond, other = denoiser.encode(["a cat"]), denoiser.encode([""]), denoiser.encode(["a dog"])
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        one = denoiser.sample(cond, uncond, guidance=5.0, steps=4, noise=noise).final
        per_step = denoiser.sample(cond, [uncond] * 4, guidance=5.0, steps=4, noise=noise).final
        changed = denoiser.sample(cond, [uncond] * 3 + [other], guidance=5.0, steps=4, noise=noise).final
    assert torch.equal(one, per_step)
    assert not torch.allclose(one, changed)  # the last step's unconditional is really the one used
    with pytest.raises(SliderError, match="3 unconditional embeddings for 4 steps"):
        denoiser.sample(cond, [uncond] * 3, guidance=5.0, steps=4, noise=noise)


def test_comfy_training_on_images_uses_the_hosts_noise_schedule():
    patcher = comfy_support.tiny_sd15_patcher()
    denoiser = ComfyDenoiser(patcher, FakeClip())
    from concept_sliders_pack.sliders_core.denoiser import Denoiser, SliderHost

    assert isinstance(denoiser, Denoiser) and isinstance(denoiser.sliders, SliderHost)  # the whole interface
    sampling = patcher.model.model_sampling
    level = denoiser.random_levels(4, torch.Generator().manual_seed(0))
    assert torch.equal(level, denoiser.random_levels(4, torch.Generator().manual_seed(0)))
    assert float(level.min()) >= float(sampling.sigma_min) and float(level.max()) <= float(sampling.sigma_max)
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 4, 8, 8, generator=gen)
    x_t = denoiser.add_noise(x0, noise, level)
    torch.testing.assert_close(x_t, x0 + level.view(-1, 1, 1, 1) * noise)  # k-diffusion form of an ε model
    torch.testing.assert_close(denoiser.training_target(x0, noise, level), noise)


def assert_stock_loader_equals_apply(patcher, slider, state, run, strength=1.5):
    """The file's state dict in ComfyUI's stock LoRA loader: no unloaded key, and the same output as Apply
    Slider at the same strength (which differs from the base model's)."""
    stock, unloaded = comfy_support.load_lora_into(patcher, state, strength)
    assert unloaded == []
    with torch.inference_mode():
        ours = NODE_CLASS_MAPPINGS["ConceptSlidersApply"]().apply(patcher, slider, strength)[0]
    out_stock, out_ours, out_base = run(stock), run(ours), run(patcher)
    assert torch.equal(out_stock, out_ours)
    assert not torch.allclose(out_ours, out_base)


def test_train_node_saves_a_slider_the_stock_loader_reads_and_apply_matches(loras):
    patcher, clip = comfy_support.tiny_sd15_patcher(), FakeClip()
    slider, plot, report = train(patcher, clip, iterations=8)
    path = loras / "sliders" / "age.safetensors"
    assert path.is_file() and plot.shape[0] == 1 and plot.shape[-1] == 3
    assert report.startswith("8 steps") and "of its training target's push" in report
    from safetensors.torch import load_file

    state = load_file(str(path))
    assert all(k.startswith("lora_unet_") for k in state)
    assert_stock_loader_equals_apply(patcher, slider, state, lambda p: forward(p, clip))
    # the trained slider is the one that came out of training: loading the file gives the same tensors
    loaded = NODE_CLASS_MAPPINGS["ConceptSlidersLoad"]().load("sliders/age.safetensors")[0]
    assert set(loaded.tensors) == set(slider.tensors)
    assert all(torch.equal(loaded.tensors[k], slider.tensors[k]) for k in slider.tensors)


def test_a_two_ended_slider_applies_each_end_by_the_sign_of_alpha(loras):
    from safetensors.torch import load_file

    import nodes as comfy_nodes

    patcher, clip = comfy_support.tiny_sd15_patcher(), FakeClip()
    slider, _, report = train(patcher, clip, iterations=4, lr=3e-2, signs="separate", contrast="ends")
    assert report.startswith("4 steps")  # 2 per end
    state, prefix = load_file(str(loras / "sliders" / "age.safetensors")), "negative_end."
    positive = {k: v for k, v in state.items() if not k.startswith(prefix)}
    negative = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    assert positive and set(negative) == set(positive)

    def run(p):
        return forward(p, clip)

    # Apply at α < 0 is the negative end at |α|: what the stock loader makes of that end's own keys
    for alpha, keys in ((1.5, positive), (-1.5, negative)):
        stock, unloaded = comfy_support.load_lora_into(patcher, keys, abs(alpha))
        assert unloaded == []
        with torch.inference_mode():
            ours = NODE_CLASS_MAPPINGS["ConceptSlidersApply"]().apply(patcher, slider, alpha)[0]
        assert torch.equal(run(stock), run(ours)), alpha
    # the whole file in the stock loader: the positive end, the negative end's keys reported unloaded
    stock, unloaded = comfy_support.load_lora_into(patcher, state, 1.5)
    assert set(unloaded) == {k for k in state if k.startswith(prefix)} and torch.equal(
        run(stock), run(comfy_support.load_lora_into(patcher, positive, 1.5)[0]))
    # the delayed sampler's live weight wrappers pick the same end as Apply
    latent, pos, neg = {"samples": torch.zeros(1, 4, 8, 8)}, clip.conditioning("a person"), clip.conditioning("")
    with torch.inference_mode():
        applied = NODE_CLASS_MAPPINGS["ConceptSlidersApply"]().apply(patcher, slider, -2.0)[0]
        plain = _sample(comfy_nodes.common_ksampler(applied, 7, 4, 3.0, "euler", "normal", pos, neg, latent))
        at0 = _sample(NODE_CLASS_MAPPINGS["ConceptSlidersDelayedSampler"]().sample(
            patcher, slider, -2.0, 0, seed=7, steps=4, cfg=3.0, sampler_name="euler", scheduler="normal",
            positive=pos, negative=neg, latent_image=latent, denoise=1.0))
    assert torch.allclose(at0, plain, atol=1e-4, rtol=1e-4)


def test_training_loss_falls_on_the_comfy_backend(loras):
    from concept_sliders_pack.sliders_core.config import TrainConfig
    from concept_sliders_pack.sliders_core.prompts import PromptPair
    from concept_sliders_pack.sliders_core.text_slider import train_text_slider

    denoiser = ComfyDenoiser(comfy_support.tiny_sd15_patcher(), FakeClip())
    pair = PromptPair(target="a person", positive="a person, old", negative="a person, young", eta=2.0)
    config = TrainConfig(iterations=30, lr=3e-3, resolution=64, trajectory_steps=2, trajectory_reuse=1000, rank=2)
    with torch.inference_mode(False):
        result = train_text_slider(denoiser, [pair], config, progress=False)
    assert result.losses[-1] < 0.3 * result.losses[0]
    assert result.unet_samples_per_iteration <= 8


def _sample(node_output):
    return node_output[0]["samples"]


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_delayed_sampler_at_step_0_is_plain_application_and_at_the_end_is_the_base_model(loras, family):
    import nodes as comfy_nodes

    clip = FakeClip()
    if family == "flux":  # sampled at cfg 1, as Flux is
        patcher, channels, cfg = comfy_support.tiny_flux_patcher(), 16, 1.0
        slider, _, _ = train(patcher, clip, iterations=6, lr=3e-2, layers="dit-attn", resolution=64)
    else:
        patcher, channels, cfg = comfy_support.tiny_sd15_patcher(), 4, 3.0
        slider, _, _ = train(patcher, clip, iterations=6, lr=3e-2)
    latent = {"samples": torch.zeros(1, channels, 8, 8)}
    pos, neg = clip.conditioning("a person"), clip.conditioning("")
    common = dict(seed=7, steps=4, cfg=cfg, positive=pos, negative=neg, latent_image=latent)
    delayed = NODE_CLASS_MAPPINGS["ConceptSlidersDelayedSampler"]()
    for sampler_name in ("euler", "euler_ancestral"):
        with torch.inference_mode():
            applied = NODE_CLASS_MAPPINGS["ConceptSlidersApply"]().apply(patcher, slider, 2.0)[0]
            plain = _sample(comfy_nodes.common_ksampler(applied, 7, 4, cfg, sampler_name, "normal", pos, neg, latent))
            base = _sample(comfy_nodes.common_ksampler(patcher, 7, 4, cfg, sampler_name, "normal", pos, neg, latent))
            at0 = _sample(delayed.sample(patcher, slider, 2.0, 0, sampler_name=sampler_name, scheduler="normal",
                                         denoise=1.0, **common))
            at_end = _sample(delayed.sample(patcher, slider, 2.0, 4, sampler_name=sampler_name, scheduler="normal",
                                            denoise=1.0, **common))
            mid = _sample(delayed.sample(patcher, slider, 2.0, 2, sampler_name=sampler_name, scheduler="normal",
                                         denoise=1.0, **common))
        assert not torch.allclose(plain, base, atol=1e-4)
        assert torch.allclose(at0, plain, atol=1e-4, rtol=1e-4), sampler_name
        assert torch.equal(at_end, base), sampler_name
        assert not torch.allclose(mid, plain, atol=1e-4) and not torch.allclose(mid, base, atol=1e-4)


def test_sweep_node_returns_a_grid_with_one_column_per_alpha(loras):
    patcher, clip = comfy_support.tiny_sd15_patcher(), FakeClip()
    slider, _, _ = train(patcher, clip, iterations=2)

    class IdentityVae:
        def decode(self, samples):
            return samples[:, :3].permute(0, 2, 3, 1).clamp(0, 1)

    reports = []
    utils = C["utils"]
    previous_hook = utils.PROGRESS_BAR_HOOK
    utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: reports.append((value, total)))
    try:
        with torch.inference_mode():
            (grid,) = NODE_CLASS_MAPPINGS["ConceptSlidersSweep"]().sweep(
                patcher, slider, IdentityVae(), "-1, 0, 1", 0, 0, 2, 3.0, "euler", "normal",
                clip.conditioning("a person"), clip.conditioning(""), {"samples": torch.zeros(1, 4, 8, 8)})
    finally:
        utils.set_progress_bar_global_hook(previous_hook)
    assert grid.shape == (1, 16 + 128, 3 * 128, 3)  # cells of at least 128 px, so small images stay visible
    # one progress bar over the whole sweep: 3 α × 2 steps, counting up once, never restarting
    assert reports == [(i, 6) for i in range(1, 7)]


def test_bad_inputs_give_clear_errors(loras):
    patcher, clip = comfy_support.tiny_sd15_patcher(), FakeClip()
    with pytest.raises(SliderError, match="path separators"):
        train(patcher, clip, name="../evil")
    with pytest.raises(SliderError, match="identical"):
        train(patcher, clip, positive="same", negative="same")
    with pytest.raises(SliderError, match="non-empty"):
        train(patcher, clip, positive="")
    slider, _, _ = train(patcher, clip, iterations=1)
    with pytest.raises(ValueError, match="outside"):
        NODE_CLASS_MAPPINGS["ConceptSlidersApply"]().apply(patcher, slider, 100.0)
    with pytest.raises(ValueError, match="beyond the step count"):
        NODE_CLASS_MAPPINGS["ConceptSlidersDelayedSampler"]().sample(
            patcher, slider, 1.0, 9, 0, 4, 3.0, "euler", "normal", clip.conditioning("a"), clip.conditioning(""),
            {"samples": torch.zeros(1, 4, 8, 8)}, 1.0)
    xl = comfy_support.tiny_sdxl_patcher()
    with pytest.raises(FamilyMismatchError, match="base family 'sd1'"):
        NODE_CLASS_MAPPINGS["ConceptSlidersApply"]().apply(xl, slider, 1.0)
    (loras / "sliders" / "corrupt.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(SliderError, match="corrupt"):
        NODE_CLASS_MAPPINGS["ConceptSlidersLoad"]().load("sliders/corrupt.safetensors")
    no_meta = SliderFile(slider.tensors, {}, "bare")
    with pytest.raises(SliderError):
        NODE_CLASS_MAPPINGS["ConceptSlidersApply"]().apply(xl, no_meta, 1.0)


def test_cancel_stops_training_and_leaves_no_file(loras):
    patcher, clip = comfy_support.tiny_sd15_patcher(), FakeClip()
    mm = C["model_management"]
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            train(patcher, clip, name="cancelled", iterations=50, save_every=1)
    finally:
        mm.interrupt_current_processing(False)
    assert not (loras / "sliders" / "cancelled.safetensors").exists()


def test_cancel_during_the_frozen_trajectory_acts_within_one_model_call(loras):
    """The UI's cancel, set while the trajectory before step 1 is sampled, stops it after one more model call."""
    patcher, clip = comfy_support.tiny_sd15_patcher(), FakeClip()
    mm = C["model_management"]
    forwards = []
    original = ComfyDenoiser.predict

    def counting_predict(self, *args, **kwargs):
        forwards.append(1)
        if len(forwards) == 2:
            mm.interrupt_current_processing(True)  # pressed during the second trajectory step
        return original(self, *args, **kwargs)

    ComfyDenoiser.predict = counting_predict
    try:
        with pytest.raises(mm.InterruptProcessingException):
            train(patcher, clip, name="cancelled_early", iterations=50)
    finally:
        ComfyDenoiser.predict = original
        mm.interrupt_current_processing(False)
    assert len(forwards) == 2  # the trajectory has 30 steps: it stopped right after the call in flight
    assert not (loras / "sliders" / "cancelled_early.safetensors").exists()


def test_cancelled_retrain_keeps_the_earlier_slider(loras):
    patcher, clip = comfy_support.tiny_sd15_patcher(), FakeClip()
    train(patcher, clip, name="kept", iterations=2)
    path = loras / "sliders" / "kept.safetensors"
    before = path.read_bytes()
    mm = C["model_management"]
    real_update = C["utils"].ProgressBar.update_absolute

    def cancel_at_step_3(self, value, total=None, preview=None):
        real_update(self, value, total, preview)
        if value == 3:
            mm.interrupt_current_processing(True)

    C["utils"].ProgressBar.update_absolute = cancel_at_step_3
    try:
        with pytest.raises(mm.InterruptProcessingException):
            train(patcher, clip, name="kept", iterations=50, save_every=1, seed=1)
    finally:
        C["utils"].ProgressBar.update_absolute = real_update
        mm.interrupt_current_processing(False)
    assert path.read_bytes() == before


def test_gradient_checkpointing_option_trains_the_same_slider(loras):
    clip = FakeClip()
    plain, _, _ = train(comfy_support.tiny_sd15_patcher(), clip, name="a", iterations=3)
    checkpointed, _, _ = train(comfy_support.tiny_sd15_patcher(), clip, name="b", iterations=3,
                            gradient_checkpointing=True)
    for key, value in plain.tensors.items():
        assert torch.allclose(value, checkpointed.tensors[key], atol=1e-6), key


# -- image pairs ------------------------------------------------------------------------------------
def _pair_images(n=3, side=64):
    gen = torch.Generator().manual_seed(4)
    a = torch.rand(n, side, side, 3, generator=gen) * 0.4
    return a, (a + 0.5).clamp(0, 1)


def train_pairs(model, clip, vae, name="pairs", iterations=4, **overrides):
    a, b = overrides.pop("images", None) or _pair_images()
    args = dict(model=model, clip=clip, vae=vae, images_a=a, images_b=b, prompt="", strengths="1", rank=2,
                alpha=1.0, layers="noxattn", iterations=iterations, lr=3e-3, resolution=64, seed=0, slider_name=name,
                save_every=0, resume_from="none")
    args.update(overrides)
    with torch.inference_mode():
        return NODE_CLASS_MAPPINGS["ConceptSlidersTrainPairs"]().train(**args)["result"]


def test_pair_node_trains_a_slider_the_stock_loader_reads(loras):
    patcher, clip, vae = comfy_support.tiny_sd15_patcher(), FakeClip(), comfy_support.tiny_vae()
    slider, plot, _ = train_pairs(patcher, clip, vae, iterations=6, lr=5e-2)
    path = loras / "sliders" / "pairs.safetensors"
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        assert f.metadata()["sliders.kind"] == "pairs"
    stock, unloaded = comfy_support.load_lora_into(patcher, load_file(str(path)), 1.0)
    assert unloaded == []
    with torch.inference_mode():
        ours = NODE_CLASS_MAPPINGS["ConceptSlidersApply"]().apply(patcher, slider, 1.0)[0]
    assert torch.equal(forward(stock, clip), forward(ours, clip))
    assert not torch.allclose(forward(ours, clip), forward(patcher, clip))
    assert plot.shape[0] == 1


def test_pair_node_trains_each_pair_on_its_caption_line(loras):
    import json

    from safetensors import safe_open

    patcher, clip, vae = comfy_support.tiny_sd15_patcher(), FakeClip(), comfy_support.tiny_vae()
    captions = ["a red face", "a blue face", "a green face"]
    train_pairs(patcher, clip, vae, name="captioned", prompt="\n".join(captions) + "\n")
    with safe_open(str(loras / "sliders" / "captioned.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["sliders.captions"]) == captions


def test_pair_training_runs_on_the_comfy_backend_with_its_vae(loras):
    from concept_sliders_pack.sliders_core.config import PairTrainConfig
    from concept_sliders_pack.sliders_core.image_pairs import pairs_from_batches
    from concept_sliders_pack.sliders_core.pair_slider import train_pair_slider

    denoiser = ComfyDenoiser(comfy_support.tiny_sd15_patcher(), FakeClip(), comfy_support.tiny_vae())
    pairs = pairs_from_batches(*_pair_images(), 64)
    with torch.inference_mode(False):
        result = train_pair_slider(denoiser, pairs, PairTrainConfig(iterations=40, lr=1e-2, rank=4, layers="all"),
                                   progress=False)
        z_a, z_b = denoiser.encode_images(pairs.a), denoiser.encode_images(pairs.b)
        assert z_a.shape == (3, 4, 8, 8)
        noise = torch.randn(z_a.shape, generator=torch.Generator().manual_seed(9))
        level = denoiser.random_levels(3, torch.Generator().manual_seed(9))
        cond = denoiser.encode([""]).repeat_each(3)

        def error(z, scale):
            denoiser.sliders.set_scales({"slider": scale})
            with torch.no_grad():
                out = denoiser.predict(denoiser.add_noise(z, noise, level), level, cond)
            return torch.nn.functional.mse_loss(out, denoiser.training_target(z, noise, level)).item()

        # the direction itself is tested on the shapes model (tests/test_pair_slider.py); here: both signs act
        assert error(z_a, -1.0) != error(z_a, 0.0) and error(z_b, 1.0) != error(z_b, 0.0)
    assert len(result.losses) == 40 and all(torch.isfinite(torch.tensor(result.losses)))


def test_pair_node_bad_inputs(loras):
    patcher, clip, vae = comfy_support.tiny_sd15_patcher(), FakeClip(), comfy_support.tiny_vae()
    a, b = _pair_images()
    with pytest.raises(SliderError, match="3 image.*in A but 2 in B"):
        train_pairs(patcher, clip, vae, images=(a, b[:2]))
    with pytest.raises(SliderError, match="2 strengths for 3 pairs"):
        train_pairs(patcher, clip, vae, strengths="1, 2")
    with pytest.raises(SliderError, match="path separators"):
        train_pairs(patcher, clip, vae, name="../x")
    with pytest.raises(SliderError, match="2 lines for 3 pairs"):
        train_pairs(patcher, clip, vae, prompt="a face\na smiling face")


def test_load_image_pairs_node_reads_a_folder_under_input(tmp_path, monkeypatch):
    from PIL import Image

    folder_paths = C["folder_paths"]
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(tmp_path))
    a, b = _pair_images(2, side=48)
    for side, images in (("A", a), ("B", b)):
        (tmp_path / "faces" / side).mkdir(parents=True)
        for i, image in enumerate(images):
            Image.fromarray((image.numpy() * 255).round().astype("uint8")).save(tmp_path / "faces" / side / f"{i}.png")
    (tmp_path / "not_pairs").mkdir()
    node = NODE_CLASS_MAPPINGS["ConceptSlidersLoadImagePairs"]
    assert node.INPUT_TYPES()["required"]["folder"][0] == ["faces"]
    images_a, images_b, strengths, captions = node().load("faces", 32)
    assert images_a.shape == images_b.shape == (2, 32, 32, 3) and strengths == "1, 1" and captions == ""
    for i, caption in enumerate(("a red face", "a blue face")):
        (tmp_path / "faces" / "A" / f"{i}.txt").write_text(caption)
    assert node().load("faces", 32)[3] == "a red face\na blue face"
    with pytest.raises(SliderError, match="directly under the input directory"):
        node().load("../faces", 32)


# -- null-text inversion ----------------------------------------------------------------------------
def _photo(side=64, seed=3):
    return torch.rand(1, side, side, 3, generator=torch.Generator().manual_seed(seed))


def invert_node(model, clip, vae, image=None, **overrides):
    args = dict(model=model, vae=vae, image=_photo() if image is None else image, source_prompt="a person",
                steps=4, cfg=7.5, method="null-text", inner_iterations=3, scheduler="normal", clip=clip)
    args.update(overrides)
    with torch.inference_mode():
        return NODE_CLASS_MAPPINGS["ConceptSlidersNullTextInvert"]().invert(**args)["result"]


def inversion_sample(model, inversion, slider=None, alpha=0.0, start_at=0.5):
    with torch.inference_mode():
        return NODE_CLASS_MAPPINGS["ConceptSlidersInversionSampler"]().sample(model, inversion, alpha, start_at,
                                                                              slider)[0]["samples"]


def test_invert_node_alpha_zero_edit_is_its_reconstruction_exactly(loras):
    patcher, clip, vae = comfy_support.tiny_sd15_patcher(), FakeClip(), comfy_support.tiny_vae()
    inversion, reconstruction, score, report = invert_node(patcher, clip, vae)
    assert reconstruction.shape == (1, 64, 64, 3) and "PSNR" in report and score == pytest.approx(
        float(report.split("PSNR ")[1].split(" dB")[0]), abs=0.01)
    slider, _, _ = train(patcher, clip, iterations=3, lr=0.05)
    at_zero = vae.decode(inversion_sample(patcher, inversion, slider, 0.0)).float()
    assert torch.equal(at_zero, reconstruction)
    edited = vae.decode(inversion_sample(patcher, inversion, slider, 3.0, start_at=0.25)).float()
    assert not torch.allclose(edited, reconstruction)


def test_host_guider_samples_what_the_core_samples():
    """The node's sampling path (host guider + Euler, one unconditional per step) equals the core's loop."""
    from concept_sliders_pack.nodes.comfy_backend import sample_inversion_in_host
    from concept_sliders_pack.sliders_core.inversion import InversionConfig, invert, sample_inversion

    patcher = comfy_support.tiny_sd15_patcher()
    denoiser = ComfyDenoiser(patcher, FakeClip(), comfy_support.tiny_vae())
    with torch.inference_mode(False):
        inversion = invert(denoiser, _photo(), "a person", InversionConfig(steps=4, inner_iterations=2, lr=0.1))
        core = patcher.model.process_latent_out(sample_inversion(denoiser, inversion))
    host = sample_inversion_in_host(patcher, inversion)
    torch.testing.assert_close(host, core.cpu(), rtol=2e-3, atol=2e-3)  # CFG on x0 vs on ε: rounding only


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_null_text_beats_plain_ddim_on_the_comfy_backend(kind):
    from concept_sliders_pack.sliders_core.inversion import InversionConfig, invert, sample_inversion

    patcher = getattr(comfy_support, f"tiny_{kind}_patcher")()
    clip = FakeClip(dim=768 if kind == "sd15" else 2048)
    denoiser = ComfyDenoiser(patcher, clip, comfy_support.tiny_vae())
    photo = _photo()
    errors = {}
    with torch.inference_mode(False):
        x_clean = denoiser.encode_images(photo)
        for method in ("ddim", "null-text"):
            inversion = invert(denoiser, photo, "a person", InversionConfig(steps=6, method=method, lr=0.1))
            errors[method] = (sample_inversion(denoiser, inversion) - x_clean).pow(2).mean().item()
    assert errors["null-text"] < 0.5 * errors["ddim"], errors
    if kind == "sdxl":  # the pooled embedding of the unconditional branch is optimised too
        assert not torch.equal(inversion.unconds[-1].tensors["pooled"], denoiser.encode([""]).tensors["pooled"])


def test_inversion_nodes_refuse_another_model_or_schedule_and_bad_input(loras):
    patcher, clip, vae = comfy_support.tiny_sd15_patcher(), FakeClip(), comfy_support.tiny_vae()
    inversion = invert_node(patcher, clip, vae, method="negative-prompt")[0]
    with pytest.raises(SliderError, match="made on a 'sd1' model"):
        inversion_sample(comfy_support.tiny_sdxl_patcher(), inversion)
    with pytest.raises(SliderError, match="another checkpoint"):
        inversion_sample(comfy_support.tiny_sd15_patcher(seed=7), inversion)
    inversion.scheduler = "karras"
    with pytest.raises(SliderError, match="another noise schedule"):
        inversion_sample(patcher, inversion)
    with pytest.raises(SliderError, match="multiples of 8"):
        invert_node(patcher, clip, vae, image=_photo(side=60))
    with pytest.raises(SliderError, match="connect a CLIP"):
        invert_node(patcher, None, vae)


def test_invert_node_takes_a_conditioning_instead_of_clip(loras):
    patcher, vae = comfy_support.tiny_sd15_patcher(), comfy_support.tiny_vae()
    inversion = invert_node(patcher, None, vae, conditioning=FakeClip().conditioning("a person"), inner_iterations=1)[0]
    assert torch.equal(inversion.cond.tensors["context"], FakeClip().conditioning("a person")[0][0])


def test_save_and_load_inversion_nodes(tmp_path, monkeypatch, loras):
    folder_paths = C["folder_paths"]
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path))
    patcher, clip, vae = comfy_support.tiny_sd15_patcher(), FakeClip(), comfy_support.tiny_vae()
    inversion = invert_node(patcher, clip, vae, inner_iterations=1)[0]
    NODE_CLASS_MAPPINGS["ConceptSlidersSaveInversion"]().save(inversion, "photo")
    load = NODE_CLASS_MAPPINGS["ConceptSlidersLoadInversion"]
    assert load.INPUT_TYPES()["required"]["name"][0] == ["photo.safetensors"]
    loaded = load().load("photo.safetensors")[0]
    assert torch.equal(inversion_sample(patcher, loaded), inversion_sample(patcher, inversion))
    with pytest.raises(SliderError, match="path separators"):
        load().load("../photo.safetensors")
    (tmp_path / "inversions" / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(SliderError, match="corrupt"):
        load().load("bad.safetensors")


def test_cancel_stops_inversion_within_one_model_call(loras, monkeypatch):
    model_management = C["model_management"]
    calls = []

    def interrupt():
        calls.append(1)
        if len(calls) == 2:
            raise model_management.InterruptProcessingException()

    monkeypatch.setattr(model_management, "throw_exception_if_processing_interrupted", interrupt)
    patcher, clip, vae = comfy_support.tiny_sd15_patcher(), FakeClip(), comfy_support.tiny_vae()
    with pytest.raises(model_management.InterruptProcessingException):
        invert_node(patcher, clip, vae, inner_iterations=5)
    assert len(calls) == 2


# ---------------------------------------------------------------------------------------------
# the embedded shapes model as ComfyUI MODEL / CLIP / VAE
# ---------------------------------------------------------------------------------------------
SHAPES_DIR = ROOT / "models" / "shapes-v1"


@pytest.fixture(scope="module")
def shapes():
    with torch.inference_mode():
        return NODE_CLASS_MAPPINGS["ConceptSlidersLoadShapesModel"]().load("shapes-v1", True)


@pytest.fixture(scope="module")
def shapes_cli():
    from concept_sliders_pack.sliders_core.backends.diffusers_backend import load_diffusers_model

    return load_diffusers_model(SHAPES_DIR)


def test_shapes_model_in_comfy_predicts_what_the_cli_predicts(shapes, shapes_cli):
    model, clip, vae = shapes
    denoiser = ComfyDenoiser(model, clip, vae)
    assert (denoiser.family, denoiser.default_resolution, denoiser.downscale) == ("shapes", 32, 1)
    prompts = ["a large red circle", "", "a small blue triangle"]
    comfy_cond, cli_cond = denoiser.encode(prompts), shapes_cli.encode(prompts)
    torch.testing.assert_close(comfy_cond.tensors["context"], cli_cond.tensors["context"].cpu(), atol=1e-5, rtol=0)
    # the same ε at the same ᾱ: ComfyUI takes x in its σ scale, diffusers the variance-preserving x_t
    sampling = model.model.model_sampling
    gen = torch.Generator().manual_seed(0)
    x_vp, t = torch.randn(3, 3, 32, 32, generator=gen), torch.tensor([900, 500, 50])
    sigma = sampling.sigma(t.float()).float()
    with torch.no_grad():
        eps_comfy = denoiser.predict(x_vp * (sigma**2 + 1).sqrt().view(-1, 1, 1, 1), sigma, comfy_cond)
        eps_cli = shapes_cli.unet(x_vp, t, encoder_hidden_states=cli_cond.tensors["context"]).sample
    torch.testing.assert_close(eps_comfy, eps_cli.float(), atol=1e-4, rtol=0)
    assert set(denoiser.sliders.lora_candidates()) == set(shapes_cli.sliders.lora_candidates())


def test_shapes_model_samples_shapes_through_the_stock_nodes(shapes):
    from concept_sliders_pack.sliders_core.shapes.metrics import measure_batch

    import nodes

    model, clip, vae = shapes
    with torch.inference_mode():
        positive = nodes.CLIPTextEncode().encode(clip, "a large red circle")[0]
        negative = nodes.CLIPTextEncode().encode(clip, "")[0]
        latent = {"samples": torch.zeros(2, 3, 32, 32)}
        samples = nodes.common_ksampler(model, 0, 25, 3.0, "euler", "normal", positive, negative, latent)[0]
        images = nodes.VAEDecode().decode(vae, samples)[0]
    assert images.shape == (2, 32, 32, 3)
    measured = measure_batch(images.numpy())
    assert [(m.color, m.shape, m.size) for m in measured] == [("red", "circle", "large")] * 2, measured


def test_slider_trained_on_shapes_in_comfy_loads_in_the_cli_with_the_same_effect(shapes, shapes_cli, loras):
    from concept_sliders_pack.sliders_core.formats import load_slider

    model, clip, vae = shapes
    train(model, clip, name="shapes_cross", iterations=3, lr=1e-2, resolution=0, target="a circle",
          positive="a large circle", negative="a small circle", preservation="")
    path = loras / "sliders" / "shapes_cross.safetensors"
    weights = load_slider(path, shapes_cli.naming, family="shapes")  # the family check passes too
    shapes_cli.sliders.add("cross", weights)
    denoiser = ComfyDenoiser(model, clip, vae)
    denoiser.sliders.add("cross", weights)
    cond = denoiser.encode(["a circle"]).repeat_each(2)
    gen = torch.Generator().manual_seed(3)
    x_vp, t = torch.randn(2, 3, 32, 32, generator=gen), torch.tensor([700, 300])
    sigma = model.model.model_sampling.sigma(t.float()).float()
    x_comfy = x_vp * (sigma**2 + 1).sqrt().view(-1, 1, 1, 1)
    with torch.no_grad():
        eps_base = denoiser.predict(x_comfy, sigma, cond)
        denoiser.sliders.set_scales({"cross": 1.0})
        eps_comfy = denoiser.predict(x_comfy, sigma, cond)
        shapes_cli.sliders.set_scales({"cross": 1.0})
        context = shapes_cli.encode(["a circle"]).repeat_each(2).tensors["context"]
        eps_cli = shapes_cli.unet(x_vp, t, encoder_hidden_states=context).sample.float()
        shapes_cli.sliders.set_scales({})
    assert float((eps_comfy - eps_base).abs().max()) > 1e-3  # the slider does something ...
    torch.testing.assert_close(eps_comfy, eps_cli, atol=1e-4, rtol=0)  # ... and the same thing in both
    shapes_cli.sliders.remove("cross")


def test_training_on_shapes_shows_live_previews_and_a_measured_effect(shapes, loras):
    import comfy.utils

    model, clip, _ = shapes
    previews = []
    comfy.utils.set_progress_bar_global_hook(
        lambda value, total, preview, node_id=None: previews.append(preview) if preview is not None else None)
    try:
        _, _, report = train(model, clip, name="shapes_preview", iterations=4, lr=1e-2, resolution=0,
                             target="a circle", positive="a large circle", negative="a small circle",
                             preservation="", preview_every=2)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert len(previews) == 2  # steps 2 and 4
    kind, image, _ = previews[-1]
    assert kind == "JPEG" and image.width == 3 * image.height >= 3 * 128  # α = −1 / 0 / +1 side by side
    assert "delivers" in report


def test_shipped_sliders_are_listed_and_never_leave_their_folder(loras):
    from concept_sliders_pack.nodes.common import SHIPPED_PREFIX, lora_files, lora_path

    shipped = [f for f in lora_files() if f.startswith(SHIPPED_PREFIX)]
    assert f"{SHIPPED_PREFIX}shapes_size.safetensors" in shipped
    assert f"{SHIPPED_PREFIX}shapes_colour.safetensors" in shipped
    assert lora_path(shipped[0]).is_file()
    with pytest.raises(FileNotFoundError):
        lora_path(SHIPPED_PREFIX + "../../shapes-v1/unet/diffusion_pytorch_model.safetensors")


def test_shapes_loader_refuses_a_model_that_is_not_shipped():
    with pytest.raises(SliderError, match="no shipped model"):
        NODE_CLASS_MAPPINGS["ConceptSlidersLoadShapesModel"]().load("../shapes-v1", True)


def test_inversion_on_shapes_refuses_a_schedule_that_starts_at_pure_noise(shapes):
    model, clip, vae = shapes
    photo = torch.zeros(1, 32, 32, 3)
    with pytest.raises(SliderError, match="use 'ddim_uniform'"):
        NODE_CLASS_MAPPINGS["ConceptSlidersNullTextInvert"]().invert(
            model, vae, photo, "a red circle", 5, 3.0, "ddim", 0, "normal", clip=clip)
    out = NODE_CLASS_MAPPINGS["ConceptSlidersNullTextInvert"]().invert(
        model, vae, photo, "a red circle", 5, 3.0, "ddim", 0, "ddim_uniform", clip=clip)
    assert out["result"][0].levels[0] < 1000


def test_inversion_on_shapes_matches_the_cli_and_reconstructs_the_photo(shapes, shapes_cli):
    """DDIM inversion evaluates the model at the next level on the current state; in ComfyUI's σ scale that
    state must be rescaled first (state_at), or the inverted states drift away from the CLI's (by 40 % at
    t 961 before the fix). Null-text then reconstructs the photo, also with the x0 clamp on."""
    from concept_sliders_pack.sliders_core.inversion import ddim_invert
    from concept_sliders_pack.sliders_core.shapes.data import render_concept_pairs

    model, clip, vae = shapes
    photo = torch.from_numpy(render_concept_pairs("size", 1, seed=0)[1][:1]).float()
    with torch.inference_mode(False):
        denoiser = ComfyDenoiser(model, clip, vae)
        with torch.no_grad():
            levels_comfy, levels_cli = denoiser.ddim_levels(10), shapes_cli.ddim_levels(10)
            states_comfy = ddim_invert(denoiser, denoiser.encode_images(photo), denoiser.encode(["a circle"]),
                                       levels_comfy)
            states_cli = ddim_invert(shapes_cli, shapes_cli.encode_images(photo), shapes_cli.encode(["a circle"]),
                                     levels_cli)
    sigma = levels_comfy[0]
    as_comfy = states_cli[0].cpu() * (sigma**2 + 1).sqrt()  # the CLI's variance-preserving state in σ scale
    assert float((states_comfy[0].cpu() - as_comfy).abs().max()) < 1e-3 * float(as_comfy.abs().max())
    out = NODE_CLASS_MAPPINGS["ConceptSlidersNullTextInvert"]().invert(
        model, vae, photo, "a large circle", 10, 3.0, "null-text", 10, "ddim_uniform", clip=clip)
    assert out["result"][2] > 30, out["result"][3]  # 35 dB here at 10 steps; 41.5 dB at 25 on a sampled photo


# ---------------------------------------------------------------------------------------------
# SliderSpace: Discover Sliders, Select Slider, the CLIP_VISION embedder, gradients through the VAE
# ---------------------------------------------------------------------------------------------
def discover(model, clip, vae, **overrides):
    args = dict(model=model, clip=clip, vae=vae, concept="a shape", variations="", images=12, k=2,
                rotation="independent", iterations=5, lr=1e-2, steps=10, resolution=0, cfg=3.0, seed=0, resume=False)
    args.update(overrides)
    with torch.inference_mode():
        return NODE_CLASS_MAPPINGS["ConceptSlidersDiscover"]().discover(**args)


def test_discover_node_on_shapes_saves_sliders_the_stock_loader_reads(shapes, loras):
    from safetensors import safe_open
    from safetensors.torch import load_file

    model, clip, vae = shapes
    out = discover(model, clip, vae)
    sliders, preview, plot, report = out["result"]
    assert len(sliders) == 2 and "2 sliders for 'a shape'" in report and out["ui"]["text"] == [report]
    assert tuple(preview.shape) == (1, 16 + 2 * 64, 5 * 64, 3) and plot.shape[0] == 1  # a row per slider
    for j in range(2):
        path = loras / "sliders" / "a_shape" / f"a_shape_{j}.safetensors"
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        assert (meta["sliders.kind"], meta["sliders.direction"], meta["sliders.base_family"]) == ("sliderspace", str(j),
                                                                                              "shapes")
        stock, unloaded = comfy_support.load_lora_into(model, load_file(str(path)), 1.0)
        assert unloaded == []
        with torch.inference_mode():
            picked = NODE_CLASS_MAPPINGS["ConceptSlidersSelect"]().select(sliders, j)[0]
            ours = NODE_CLASS_MAPPINGS["ConceptSlidersApply"]().apply(model, picked, 1.0)[0]
        x, sigma = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(j)), torch.tensor([3.0])
        context = clip.encode_from_tokens(clip.tokenize("a shape"))
        assert torch.equal(comfy_support.patcher_forward(stock, x, sigma, context),
                           comfy_support.patcher_forward(ours, x, sigma, context))
    with pytest.raises(SliderError, match="there are 2 sliders"):
        NODE_CLASS_MAPPINGS["ConceptSlidersSelect"]().select(sliders, 2)
    # resume: both sliders are complete, so they are kept as they are
    before = (loras / "sliders" / "a_shape" / "a_shape_0.safetensors").read_bytes()
    discover(model, clip, vae, resume=True)
    assert (loras / "sliders" / "a_shape" / "a_shape_0.safetensors").read_bytes() == before


def test_discover_node_bad_inputs(shapes, loras):
    model, clip, vae = shapes
    with pytest.raises(SliderError, match="concept prompt is empty"):
        discover(model, clip, vae, concept="  ")
    with pytest.raises(SliderError, match="K = 12 sliders need more than K images"):
        discover(model, clip, vae, k=12)
    with pytest.raises(SliderError, match="connect an image embedder"):
        discover(comfy_support.tiny_sd15_patcher(), FakeClip(), comfy_support.tiny_vae())


def _tiny_clip_vision(tmp_path):
    """The same random tiny CLIP vision model as a transformers folder and as the host's CLIP_VISION."""
    import json

    from test_sliderspace import tiny_clip_folder

    folder = tiny_clip_folder(tmp_path / "clip")
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "vision.json").write_text(json.dumps({**config, "model_type": "clip_vision_model"}))
    import comfy.clip_vision

    vision = comfy.clip_vision.ClipVisionModel(str(tmp_path / "vision.json"))
    from safetensors.torch import load_file

    vision.load_sd(load_file(str(folder / "model.safetensors")))
    return folder, vision


def test_clip_vision_embedder_matches_transformers_and_passes_gradients(tmp_path):
    from concept_sliders_pack.nodes.comfy_backend import ClipVisionEmbedder
    from concept_sliders_pack.sliders_core.backends.clip_vision import TransformersClipEmbedder

    folder, vision = _tiny_clip_vision(tmp_path)
    images = torch.rand(2, 40, 48, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    with torch.inference_mode(False):
        ours = ClipVisionEmbedder(vision).embed(images)
        reference = TransformersClipEmbedder(folder).embed(images)
        # the same model: the host stores CLIP vision weights in fp16 (computing in fp32), hence 1e-3
        torch.testing.assert_close(ours, reference, atol=1e-3, rtol=0)
        ours[:, 0].sum().backward()
    assert images.grad is not None and float(images.grad.abs().sum()) > 0


def test_discover_node_with_clip_vision_on_an_sd_model(tmp_path, loras):
    _, vision = _tiny_clip_vision(tmp_path)
    out = discover(comfy_support.tiny_sd15_patcher(), FakeClip(), comfy_support.tiny_vae(), images=6, k=2,
                   iterations=2, steps=3, resolution=64, concept="a dog", clip_vision=vision)
    assert len(out["result"][0]) == 2 and (loras / "sliders" / "a_dog" / "a_dog_1.safetensors").is_file()


def test_decoding_through_the_hosts_vae_is_differentiable_and_equals_its_decode():
    denoiser = ComfyDenoiser(comfy_support.tiny_sd15_patcher(), FakeClip(), comfy_support.tiny_vae())
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    with torch.inference_mode(False):
        images = denoiser.decode(latents, differentiable=True)
        torch.testing.assert_close(images.detach().cpu(), denoiser.decode(latents.detach()), atol=1e-5, rtol=0)
        images.mean().backward()
    assert float(latents.grad.abs().sum()) > 0


def test_cancel_in_discover_acts_within_one_step_and_keeps_the_finished_sliders(shapes, loras):
    model, clip, vae = shapes
    mm = C["model_management"]
    original = ComfyDenoiser.predict
    forwards = []

    def cancel_when(condition):
        def counting_predict(self, *args, **kwargs):
            forwards.append(1)
            if condition(self):
                mm.interrupt_current_processing(True)
            return original(self, *args, **kwargs)
        return counting_predict

    ComfyDenoiser.predict = cancel_when(lambda _: len(forwards) == 3)  # while the concept images are sampled
    try:
        with pytest.raises(mm.InterruptProcessingException):
            discover(model, clip, vae)
        assert len(forwards) <= 4  # the step in flight (cond and uncond) finishes, then it stops
        assert not list((loras / "sliders").rglob("*.safetensors"))
        forwards.clear()
        ComfyDenoiser.predict = cancel_when(lambda d: d.sliders.scales.get("a_shape_1"))  # training slider 1
        with pytest.raises(mm.InterruptProcessingException):
            discover(model, clip, vae)
    finally:
        ComfyDenoiser.predict = original
        mm.interrupt_current_processing(False)
    folder = loras / "sliders" / "a_shape"
    assert (folder / "a_shape_0.safetensors").is_file() and not (folder / "a_shape_1.safetensors").exists()


def _random_slider_file(patcher, name, seed, scale=0.05):
    """A slider with random weights on every noxattn module of this MODEL, as a SliderFile."""
    from concept_sliders_pack.nodes.comfy_backend import ComfySliderHost, module_names
    from concept_sliders_pack.sliders_core.config import preset_modules

    host = ComfySliderHost(patcher.clone(), module_names(patcher))
    host.add(name, modules=preset_modules(host.lora_candidates(), "noxattn"), rank=2, alpha=1.0)
    gen = torch.Generator().manual_seed(seed)
    weights = host.export(name)
    for module in weights.modules.values():
        module.down.copy_(torch.randn(module.down.shape, generator=gen) * scale)
        module.up.copy_(torch.randn(module.up.shape, generator=gen) * scale)
    weights.metadata = {"sliders.family": "sd1"}
    return SliderFile.from_weights(weights, name)


def test_slider_mixer_equals_chained_apply_nodes_from_text_and_from_a_list(loras):
    from safetensors.torch import save_file

    patcher, clip = comfy_support.tiny_sd15_patcher(), FakeClip()
    sliders = [_random_slider_file(patcher, f"m{i}", seed=i) for i in range(5)]
    (loras / "sliders").mkdir()
    for s in sliders[:3]:
        save_file(s.tensors, str(loras / "sliders" / f"{s.name}.safetensors"), metadata=s.metadata)
    C["folder_paths"].filename_list_cache.clear()
    alphas = [1.5, -0.5, 2.0, 0.75, -1.0]
    mixer = NODE_CLASS_MAPPINGS["ConceptSlidersMixer"]()
    with torch.inference_mode():
        chained = patcher
        for s, a in zip(sliders, alphas):
            chained = NODE_CLASS_MAPPINGS["ConceptSlidersApply"]().apply(chained, s, a)[0]
        mixed, report = mixer.apply(patcher, "sliders/m0.safetensors: 1.5\n# a comment\nsliders/m1: -0.5\n\nm2:2",
                                    sliders=sliders[3:4], alphas="0.75", slider=sliders[4], alpha=-1.0)
    assert report.splitlines()[0] == "5 sliders" and "m1: -0.5" in report and "m4: -1" in report
    out_chained, out_mixed, out_base = forward(chained, clip), forward(mixed, clip), forward(patcher, clip)
    assert torch.allclose(out_mixed, out_chained, atol=1e-6)
    assert not torch.allclose(out_mixed, out_base)
    # one α for the whole list
    with torch.inference_mode():
        all_one = mixer.apply(patcher, "", sliders=sliders[3:], alphas="0.75")[0]
        chained = NODE_CLASS_MAPPINGS["ConceptSlidersApply"]().apply(patcher, sliders[3], 0.75)[0]
        chained = NODE_CLASS_MAPPINGS["ConceptSlidersApply"]().apply(chained, sliders[4], 0.75)[0]
    assert torch.allclose(forward(all_one, clip), forward(chained, clip), atol=1e-6)


def test_slider_mixer_bad_input_names_the_line_or_the_file(loras):
    patcher = comfy_support.tiny_sd15_patcher()
    mixer = NODE_CLASS_MAPPINGS["ConceptSlidersMixer"]()
    slider = _random_slider_file(patcher, "x", seed=0)
    with pytest.raises(SliderError, match="line 2"):
        mixer.apply(patcher, "concept-sliders-pack/shapes_size: 1\nage: lots")
    with pytest.raises(SliderError, match="no slider file '../../etc/passwd'"):
        mixer.apply(patcher, "../../etc/passwd: 1")
    with pytest.raises(SliderError, match="empty"):
        mixer.apply(patcher, "# nothing\n")
    with pytest.raises(SliderError, match="3 alphas for 1 sliders"):
        mixer.apply(patcher, "", sliders=[slider], alphas="1, 2, 3")
    with pytest.raises(ValueError, match="outside"):
        mixer.apply(patcher, "", sliders=[slider], alphas="50")
    with pytest.raises(FamilyMismatchError):  # a shapes slider on an SD1.5 MODEL
        mixer.apply(patcher, "concept-sliders-pack/shapes_size: 1")


def test_generate_on_the_comfy_backend_leaves_every_slider_off():
    from concept_sliders_pack.sliders_core.inference import generate

    patcher, clip = comfy_support.tiny_sd15_patcher(), FakeClip()
    denoiser = ComfyDenoiser(patcher, clip, comfy_support.tiny_vae())
    denoiser.sliders.add("g", _random_slider_file(patcher, "g", seed=1).resolve(patcher))
    with torch.inference_mode():
        generate(denoiser, "a person", scales={"g": 1.0}, seeds=[0], steps=2, guidance=2.0, resolution=64)
    assert denoiser.sliders.scales == {}



# -- flow transformers: Flux ---------------------------------------------------------------------------
def flux_forward(patcher, clip, seed=5):
    gen = torch.Generator().manual_seed(seed)
    x, sigma = torch.randn(1, 16, 8, 8, generator=gen), torch.tensor([0.6])
    context, pooled = clip.encode_from_tokens("a person", return_pooled=True)
    mm = C["model_management"]
    mm.load_models_gpu([patcher])
    with torch.no_grad():
        return patcher.model.apply_model(x, sigma, c_crossattn=context, y=pooled, guidance=torch.tensor([3.5]))


def test_flux_train_node_saves_a_slider_the_stock_loader_reads_with_equal_output(loras):
    patcher, clip = comfy_support.tiny_flux_patcher(), FakeClip()
    slider, _, report = train(patcher, clip, name="flux_age", iterations=8, layers="dit-attn", resolution=64)
    from safetensors.torch import load_file

    state = load_file(str(loras / "sliders" / "flux_age.safetensors"))
    assert state and all(k.startswith("lora_unet_double_blocks_") for k in state)
    assert {k.split(".")[0].split("_attn_")[1] for k in state} == {"qkv", "proj"}  # attention only
    assert_stock_loader_equals_apply(patcher, slider, state, lambda p: flux_forward(p, clip))
    assert "8 steps" in report


def train_age_slider(denoiser, layers: str):
    """30 quick steps of an age slider through the core's trainer on a ComfyDenoiser (trajectory drawn once)."""
    from concept_sliders_pack.sliders_core.config import TrainConfig
    from concept_sliders_pack.sliders_core.prompts import PromptPair
    from concept_sliders_pack.sliders_core.text_slider import train_text_slider

    pair = PromptPair(target="a person", positive="a person, old", negative="a person, young", eta=2.0)
    config = TrainConfig(iterations=30, lr=2e-2, rank=4, layers=layers, resolution=64, trajectory_steps=2,
                         trajectory_reuse=1000, seed=0)
    with torch.inference_mode(False):
        return train_text_slider(denoiser, [pair], config, name="age", progress=False)


def test_flux_training_loss_falls_and_samples_without_cfg(loras):
    patcher, clip = comfy_support.tiny_flux_patcher(), FakeClip()
    denoiser = ComfyDenoiser(patcher, clip)
    assert denoiser.family == "flux" and denoiser.cfg_free and denoiser.guidance_input == 3.5
    calls = []
    original = denoiser.predict
    denoiser.predict = lambda x, *a, **k: calls.append(x.shape[0]) or original(x, *a, **k)
    with torch.inference_mode():
        noise = denoiser.initial_noise(1, 64, torch.Generator().manual_seed(0))
        denoiser.sample(denoiser.encode(["a person"]), denoiser.encode([""]), guidance=3.0, steps=4, noise=noise)
    assert noise.shape == (1, 16, 8, 8) and calls == [1] * 4  # one sample per step: no CFG doubling
    denoiser.predict = original
    result = train_age_slider(denoiser, "dit-attn")
    assert result.losses[-1] < 0.6 * result.losses[0], result.losses  # attention-only LoRA on a random model
    assert result.unet_samples_per_iteration <= 4  # no CFG doubling in the trajectory either


def test_unet_presets_on_flux_name_the_transformer_presets():
    from concept_sliders_pack.nodes.comfy_backend import ComfySliderHost, module_names
    from concept_sliders_pack.sliders_core.config import preset_modules

    patcher = comfy_support.tiny_flux_patcher()
    candidates = ComfySliderHost(patcher, module_names(patcher)).lora_candidates()
    with pytest.raises(SliderError, match="dit-attn"):
        preset_modules(candidates, "noxattn")
    attn = preset_modules(candidates, "dit-attn")
    assert attn == sorted(f"double_blocks.{i}.{s}_attn.{p}" for i in (0, 1) for s in ("img", "txt") for p in ("qkv", "proj"))
    assert set(preset_modules(candidates, "dit-attn-single")) - set(attn) == {
        f"single_blocks.{i}.linear{j}" for i in (0, 1) for j in (1, 2)}


def test_a_flux_slider_is_refused_on_an_sd_model_and_the_other_way(loras):
    flux, sd = comfy_support.tiny_flux_patcher(), comfy_support.tiny_sd15_patcher()
    clip = FakeClip()
    flux_slider = train(flux, clip, name="f", iterations=2, layers="dit-attn", resolution=64)[0]
    sd_slider = train(sd, clip, name="s", iterations=2)[0]
    with pytest.raises(FamilyMismatchError, match="'flux'"):
        NODE_CLASS_MAPPINGS["ConceptSlidersApply"]().apply(sd, flux_slider, 1.0)
    with pytest.raises(FamilyMismatchError, match="'sd1'"):
        NODE_CLASS_MAPPINGS["ConceptSlidersApply"]().apply(flux, sd_slider, 1.0)


def test_flux_schnell_has_no_guidance_input_and_predicts():
    denoiser = ComfyDenoiser(comfy_support.tiny_flux_patcher(schnell=True), FakeClip())
    assert denoiser.family == "flux-schnell" and denoiser.cfg_free and denoiser.guidance_input is None
    with torch.inference_mode():
        x = denoiser.initial_noise(2, 64, torch.Generator().manual_seed(0))
        out = denoiser.predict(x, torch.tensor([0.5, 0.9]), denoiser.encode(["a person", "a dog"]))
    assert out.shape == x.shape and torch.isfinite(out).all()



# -- flow transformers: SD3 (MMDiT) ------------------------------------------------------------------
def sd3_forward(patcher, clip, seed=5):
    gen = torch.Generator().manual_seed(seed)
    x, sigma = torch.randn(1, 16, 8, 8, generator=gen), torch.tensor([0.6])
    context, pooled = clip.encode_from_tokens("a person", return_pooled=True)
    C["model_management"].load_models_gpu([patcher])
    with torch.no_grad():
        return patcher.model.apply_model(x, sigma, c_crossattn=context, y=pooled)


def test_sd3_train_node_saves_a_slider_the_stock_loader_reads_with_equal_output(loras):
    from safetensors.torch import load_file

    patcher, clip = comfy_support.tiny_sd3_patcher(), FakeClip()
    slider, _, report = train(patcher, clip, name="sd3_age", iterations=8, layers="dit-attn", resolution=64)
    state = load_file(str(loras / "sliders" / "sd3_age.safetensors"))
    assert state and all(k.startswith("lora_unet_joint_blocks_") and "_attn_" in k for k in state)
    assert_stock_loader_equals_apply(patcher, slider, state, lambda p: sd3_forward(p, clip))
    assert "8 steps" in report


def test_sd3_presets_sampling_with_cfg_and_training(loras):
    from concept_sliders_pack.sliders_core.config import preset_modules

    denoiser = ComfyDenoiser(comfy_support.tiny_sd3_patcher(), FakeClip())
    assert denoiser.family == "sd3" and denoiser.dit and not denoiser.cfg_free and denoiser.guidance_input is None
    attn = preset_modules(denoiser.sliders.lora_candidates(), "dit-attn")
    # the last joint block's context stream is pre-only: q/k/v and no output projection
    assert attn == sorted([f"joint_blocks.{i}.x_block.attn.{p}" for i in (0, 1) for p in ("qkv", "proj")]
                          + ["joint_blocks.0.context_block.attn.qkv", "joint_blocks.0.context_block.attn.proj",
                             "joint_blocks.1.context_block.attn.qkv"])
    assert {"joint_blocks.0.x_block.mlp.fc1", "joint_blocks.0.context_block.mlp.fc2"} <= set(
        preset_modules(denoiser.sliders.lora_candidates(), "dit-all"))
    result = train_age_slider(denoiser, "dit-attn")
    assert result.losses[-1] < 0.6 * result.losses[0], result.losses
    calls, original = [], denoiser.predict
    denoiser.predict = lambda x, *a, **k: calls.append(x.shape[0]) or original(x, *a, **k)
    with torch.inference_mode():
        noise = denoiser.initial_noise(1, 64, torch.Generator().manual_seed(0))
        denoiser.sample(denoiser.encode(["a person"]), denoiser.encode([""]), guidance=3.0, steps=3, noise=noise)
    assert calls == [2] * 3  # SD3 is sampled with CFG: conditional and unconditional in one batch


def test_sd3_and_flux_sliders_are_refused_on_each_other(loras):
    clip = FakeClip()
    flux, sd3 = comfy_support.tiny_flux_patcher(), comfy_support.tiny_sd3_patcher()
    flux_slider = train(flux, clip, name="f", iterations=2, layers="dit-attn", resolution=64)[0]
    sd3_slider = train(sd3, clip, name="t", iterations=2, layers="dit-attn", resolution=64)[0]
    with pytest.raises(FamilyMismatchError, match="'flux'"):
        NODE_CLASS_MAPPINGS["ConceptSlidersApply"]().apply(sd3, flux_slider, 1.0)
    with pytest.raises(FamilyMismatchError, match="'sd3'"):
        NODE_CLASS_MAPPINGS["ConceptSlidersApply"]().apply(flux, sd3_slider, 1.0)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_diffusers_form_dit_loras_load_with_qkv_fused_as_the_stock_loader_does(loras, family):
    """transformer.* keys name q, k and v apart (and Flux's single blocks' MLP input); the host fuses them
    into one layer. A file in that form gives what the stock loader gives."""
    patcher = comfy_support.tiny_flux_patcher() if family == "flux" else comfy_support.tiny_sd3_patcher()
    clip, hidden = FakeClip(), 64 if family == "flux" else 128
    gen = torch.Generator().manual_seed(3)
    modules = {"transformer_blocks.0.attn.to_q": (hidden, hidden), "transformer_blocks.0.attn.to_k": (hidden, hidden),
               "transformer_blocks.0.attn.to_v": (hidden, hidden), "transformer_blocks.0.attn.add_q_proj": (hidden, hidden),
               "transformer_blocks.0.attn.to_out.0": (hidden, hidden)}
    if family == "flux":
        modules.update({"single_transformer_blocks.1.attn.to_k": (hidden, hidden),
                        "single_transformer_blocks.1.proj_mlp": (4 * hidden, hidden),
                        "single_transformer_blocks.1.proj_out": (hidden, 5 * hidden)})
    state = {}
    for module, (out_features, in_features) in modules.items():
        rank = 2 + len(state) % 3  # pieces of one layer with different ranks
        state[f"transformer.{module}.lora_A.weight"] = torch.randn(rank, in_features, generator=gen) * 0.1
        state[f"transformer.{module}.lora_B.weight"] = torch.randn(out_features, rank, generator=gen) * 0.1
    slider = SliderFile(state, {}, "diffusers_form")
    weights = slider.resolve(patcher)
    prefix = "double_blocks.0.img_attn" if family == "flux" else "joint_blocks.0.x_block.attn"
    assert f"{prefix}.qkv" in weights.modules and weights.modules[f"{prefix}.qkv"].down.shape[0] == 2 + 3 + 4
    run = (lambda p: flux_forward(p, clip)) if family == "flux" else (lambda p: sd3_forward(p, clip))
    stock, unloaded = comfy_support.load_lora_into(patcher, state, 1.5)
    assert unloaded == []
    with torch.inference_mode():
        ours = NODE_CLASS_MAPPINGS["ConceptSlidersApply"]().apply(patcher, slider, 1.5)[0]
    out_stock, out_ours, out_base = run(stock), run(ours), run(patcher)
    assert not torch.allclose(out_ours, out_base)
    assert torch.allclose(out_stock, out_ours, atol=1e-5, rtol=1e-4)


# -- flow transformers: the layers default, image pairs and SliderSpace -------------------------------
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_the_auto_layers_default_trains_joint_attention_on_flow_transformers(loras, family):
    from safetensors import safe_open

    patcher = comfy_support.tiny_flux_patcher() if family == "flux" else comfy_support.tiny_sd3_patcher()
    slider, _, _ = train(patcher, FakeClip(), name=f"{family}_auto", iterations=2, layers="auto")
    with safe_open(str(loras / "sliders" / f"{family}_auto.safetensors"), "pt") as f:
        assert f.metadata()["sliders.layers"] == "dit-attn"
    assert all("attn" in k for k in slider.tensors)
    sd_slider, _, _ = train(comfy_support.tiny_sd15_patcher(), FakeClip(), name="sd_auto", iterations=1, layers="auto")
    with safe_open(str(loras / "sliders" / "sd_auto.safetensors"), "pt") as f:
        assert f.metadata()["sliders.layers"] == "noxattn"


@pytest.mark.parametrize("family", ["flux", "sd3", "chroma"])
def test_pair_node_on_flow_transformers_saves_a_slider_the_stock_loader_reads(loras, family):
    from safetensors.torch import load_file

    patcher = {"flux": comfy_support.tiny_flux_patcher, "sd3": comfy_support.tiny_sd3_patcher,
               "chroma": comfy_support.tiny_chroma_patcher}[family]()
    clip, vae = FakeClip(), comfy_support.tiny_vae(latent_channels=16)
    slider, _, report = train_pairs(patcher, clip, vae, name=f"{family}_pairs", iterations=6, lr=5e-2, layers="auto")
    state = load_file(str(loras / "sliders" / f"{family}_pairs.safetensors"))
    stock, unloaded = comfy_support.load_lora_into(patcher, state, 1.0)
    assert unloaded == []
    run = {"flux": lambda p: flux_forward(p, clip), "sd3": lambda p: sd3_forward(p, clip),
           "chroma": lambda p: dit_forward(p, clip)}[family]
    with torch.inference_mode():
        ours = NODE_CLASS_MAPPINGS["ConceptSlidersApply"]().apply(patcher, slider, 1.0)[0]
    out_ours = run(ours)
    assert torch.allclose(run(stock), out_ours, atol=1e-6) and not torch.allclose(out_ours, run(patcher))


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_discover_node_on_flow_transformers(tmp_path, loras, family):
    _, vision = _tiny_clip_vision(tmp_path)
    model = comfy_support.tiny_flux_patcher() if family == "flux" else comfy_support.tiny_sd3_patcher()
    out = discover(model, FakeClip(), comfy_support.tiny_vae(latent_channels=16),
                   images=6, k=2, iterations=2, steps=3, resolution=64, concept="a person", clip_vision=vision)
    sliders = out["result"][0]
    assert len(sliders) == 2 and (loras / "sliders" / "a_person" / "a_person_1.safetensors").is_file()
    assert sliders[0].metadata["sliders.layers"] == "dit-attn" and sliders[0].family == family


# -- more DiT families: Chroma (Flux's blocks, CFG, no pooled vector) and Qwen-Image (diffusers names) --
FLOW_FAMILIES = {"chroma": comfy_support.tiny_chroma_patcher, "qwen-image": comfy_support.tiny_qwen_image_patcher}


def dit_forward(patcher, clip, seed=5):
    """The host's prediction on the family's own latent shape (Qwen-Image's has a frame axis)."""
    denoiser = ComfyDenoiser(patcher, clip)
    x, sigma = denoiser.initial_noise(1, 64, torch.Generator().manual_seed(seed)), torch.tensor([0.6])
    context, _ = clip.encode_from_tokens("a person", return_pooled=True)
    kwargs = {"guidance": torch.tensor([0.0])} if denoiser.guidance_input is not None else {}
    C["model_management"].load_models_gpu([patcher])
    with torch.no_grad():
        return patcher.model.apply_model(x, sigma, c_crossattn=context, **kwargs)


@pytest.mark.parametrize("family", sorted(FLOW_FAMILIES))
def test_more_dit_families_train_with_cfg_and_save_sliders_the_stock_loader_reads(loras, family):
    from safetensors.torch import load_file

    patcher, clip = FLOW_FAMILIES[family](), FakeClip()
    denoiser = ComfyDenoiser(patcher, clip)
    assert denoiser.family == family and denoiser.dit and not denoiser.cfg_free
    result = train_age_slider(denoiser, "auto")
    assert result.losses[-1] < 0.6 * result.losses[0], result.losses
    assert result.weights.metadata["sliders.layers"] == "dit-attn"
    noise = denoiser.initial_noise(1, 64, torch.Generator().manual_seed(0))
    cond, uncond = denoiser.encode(["a person"]), denoiser.encode([""])
    with torch.inference_mode():  # CFG acts: these families are not guidance distilled
        plain, guided = (denoiser.sample(cond, uncond, guidance=g, steps=2, noise=noise).final for g in (1.0, 5.0))
    assert not torch.allclose(plain, guided)
    slider, _, _ = train(FLOW_FAMILIES[family](), clip, name=f"{family}_node", iterations=3, lr=5e-2, layers="auto")
    stock, unloaded = comfy_support.load_lora_into(patcher, load_file(str(loras / "sliders" / f"{family}_node.safetensors")), 1.0)
    assert unloaded == []
    with torch.inference_mode():
        ours = NODE_CLASS_MAPPINGS["ConceptSlidersApply"]().apply(patcher, slider, 1.0)[0]
    out_ours = dit_forward(ours, clip)
    assert torch.allclose(dit_forward(stock, clip), out_ours, atol=1e-6) and not torch.allclose(out_ours, dit_forward(patcher, clip))


def test_a_chroma_slider_is_refused_on_flux_though_the_names_match(loras):
    chroma, flux, clip = comfy_support.tiny_chroma_patcher(), comfy_support.tiny_flux_patcher(), FakeClip()
    slider = train(chroma, clip, name="c", iterations=1, layers="auto")[0]
    with pytest.raises(FamilyMismatchError, match="'chroma'"):
        NODE_CLASS_MAPPINGS["ConceptSlidersApply"]().apply(flux, slider, 1.0)


# -- the Flux and SD3.5 workflows, run in-process with tiny models in place of their loaders -------------
def run_api_workflow(api: dict, substitutes: dict) -> dict:
    """Execute an API-format workflow node by node (ComfyUI's own node classes and ours); node ids in
    `substitutes` give their outputs instead of running (the model loaders); SaveImage just returns its
    images. Returns every node's outputs."""
    import comfy_extras.nodes_flux
    import comfy_extras.nodes_sd3

    import nodes as core_nodes

    classes = {**core_nodes.NODE_CLASS_MAPPINGS, **NODE_CLASS_MAPPINGS, "FluxGuidance": comfy_extras.nodes_flux.FluxGuidance,
               "EmptySD3LatentImage": comfy_extras.nodes_sd3.EmptySD3LatentImage}
    outputs = dict(substitutes)

    def value(v):
        return outputs[v[0]][v[1]] if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) else v

    pending = [i for i in api if i not in outputs]
    while pending:
        for node_id in list(pending):
            node = api[node_id]
            links = [v for v in node["inputs"].values() if isinstance(v, list) and len(v) == 2]
            if any(v[0] not in outputs for v in links):
                continue
            inputs = {k: value(v) for k, v in node["inputs"].items()}
            cls = classes[node["class_type"]]
            if node["class_type"] == "SaveImage":
                result = (inputs["images"],)
            elif hasattr(cls, "define_schema"):  # the host's v3 nodes
                result = tuple(cls.execute(**inputs).result)
            else:
                instance = cls()
                result = getattr(instance, cls.FUNCTION)(**inputs)
                result = tuple(result["result"]) if isinstance(result, dict) else tuple(result)
            outputs[node_id] = result
            pending.remove(node_id)
    return outputs


@pytest.mark.parametrize("name", ["Flux - train a text slider and sweep it", "SD3.5 - train a text slider and sweep it"])
def test_flow_workflows_run_with_tiny_models_in_their_loaders(loras, name):
    import json

    api = json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())
    flux = name.startswith("Flux")
    model = comfy_support.tiny_flux_patcher() if flux else comfy_support.tiny_sd3_patcher()
    clip, vae = FakeClip(), comfy_support.tiny_vae(latent_channels=16)
    if flux:
        substitutes = {"1": (model,), "2": (clip,), "3": (vae,)}
    else:
        substitutes = {"1": (model, None, vae), "2": (clip,)}
    for node in api.values():  # small and quick: 64 px, 2 steps, 2 iterations
        inputs = node["inputs"]
        if node["class_type"] == "ConceptSlidersTrainText":
            inputs.update(iterations=2, resolution=64, save_every=0)
        if node["class_type"] == "EmptySD3LatentImage":
            inputs.update(width=64, height=64)
        if "steps" in inputs:
            inputs.update(steps=2, start_step=1)
    with torch.inference_mode():
        outputs = run_api_workflow(api, substitutes)
    sweep = next(i for i, n in api.items() if n["class_type"] == "ConceptSlidersSweep")
    grid = outputs[sweep][0]
    assert grid.shape[-1] == 3 and grid.shape[2] >= 5 * 64  # one column per α
    slider_name = next(n["inputs"]["slider_name"] for n in api.values() if n["class_type"] == "ConceptSlidersTrainText")
    assert (loras / "sliders" / f"{slider_name}.safetensors").is_file()
