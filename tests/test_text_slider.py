import json

import pytest
import torch
from conftest import random_slider

from sliders_core.config import TrainConfig
from sliders_core.errors import SliderError, TrainingDivergedError
from sliders_core.formats import load_slider
from sliders_core.prompts import PromptPair
from sliders_core.text_slider import (
    encode_pair,
    frozen_target,
    slider_modules,
    train_text_slider,
    without_directions,
)

AGE = PromptPair(target="a person", positive="a person, old", negative="a person, young", eta=2.0,
                 preservation=("male", "female", "child"))


def quick_config(**overrides):
    base = dict(iterations=6, lr=1e-3, resolution=32, trajectory_steps=4, trajectory_reuse=3, seed=0)
    base.update(overrides)
    return TrainConfig(**base)


@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("action", ["enhance", "erase"])
def test_target_is_eq8_over_every_preservation_prompt(sd1, action, reduce):
    pair = PromptPair(target=AGE.target, positive=AGE.positive, negative=AGE.negative, eta=2.5,
                      preservation=AGE.preservation, action=action, neutral="a photo")
    item = encode_pair(sd1, pair, reduce=reduce)
    random_slider(sd1)  # attached but must not take part in the frozen predictions
    sd1.sliders.set_scales({"s": 1.0})
    gen = torch.Generator().manual_seed(1)
    x_t, level = torch.randn(2, 4, 16, 16, generator=gen), torch.tensor([700, 300])

    batched = frozen_target(sd1, item, x_t, level)

    with torch.no_grad(), sd1.sliders.disabled():
        def eps(prompt):  # one separate forward per prompt, per sample
            return torch.cat([sd1.predict(x_t[i:i + 1], level[i:i + 1], sd1.encode([prompt])) for i in range(2)])
        sign = 1.0 if action == "enhance" else -1.0
        # mean: η keeps the reference's scale (it samples one p per step); sum: eq. 8 as printed
        weight = 2.5 / len(AGE.preservation) if reduce == "mean" else 2.5
        direct = eps("a photo") + sign * weight * sum(
            eps(f"a person, old, {p}") - eps(f"a person, young, {p}") for p in AGE.preservation)
    assert torch.allclose(batched, direct, atol=1e-5, rtol=1e-4)
    # and it is not what one sampled attribute (the reference's shortcut) would give
    with torch.no_grad(), sd1.sliders.disabled():
        one = eps("a photo") + sign * 2.5 * (eps("a person, old, male") - eps("a person, young, male"))
    assert not torch.allclose(batched, one, atol=1e-4)


def test_frozen_predictions_are_one_batched_forward_at_the_trajectory_level(sd1, monkeypatch):
    calls = []
    real_predict, real_sample = sd1.predict, sd1.sample
    trajectories = []

    def spy_predict(x, level, cond):
        calls.append((x.detach().clone(), level.clone(), len(cond), torch.is_grad_enabled()))
        return real_predict(x, level, cond)

    between_samples = []

    def spy_sample(*args, **kwargs):
        between_samples.append(list(calls))
        calls.clear()
        trajectories.append(real_sample(*args, **kwargs))
        calls.clear()
        return trajectories[-1]

    monkeypatch.setattr(sd1, "predict", spy_predict)
    monkeypatch.setattr(sd1, "sample", spy_sample)
    train_text_slider(sd1, [AGE], quick_config(iterations=1, batch_size=2), progress=False)
    frozen, lora = between_samples[1]  # the training step's calls (the effect check samples afterwards)
    # c± ⊕ p for 3 attributes × batch 2, no grad, one call; ε(x_t, c_n) comes from the trajectory (c_n = c_t)
    assert frozen[2] == 2 * (2 * 3) and not frozen[3]
    assert lora[2] == 2 and lora[3]
    states, levels = trajectories[0].states, trajectories[0].levels
    matches = [k for k in range(len(states)) if torch.equal(frozen[0][:2], states[k])]
    assert len(matches) == 1 and matches[0] >= 1  # a recorded state, never the pure noise
    assert torch.equal(frozen[1][:2], levels[matches[0]])  # trained at the level it sits at
    assert torch.equal(lora[0], states[matches[0]])


def test_training_loss_falls(sd1):
    # one fixed x_t (2-step trajectory, reused throughout) makes the objective stationary
    config = quick_config(iterations=40, lr=3e-3, trajectory_steps=2, trajectory_reuse=1000)
    result = train_text_slider(sd1, [AGE], config, progress=False)
    assert result.losses[-1] < 0.3 * result.losses[0]
    assert len(result.weights.modules) == len(slider_modules(sd1, "noxattn"))


def test_training_loss_falls_on_sdxl(sdxl):
    config = quick_config(iterations=30, lr=3e-3, trajectory_steps=2, trajectory_reuse=1000, layers="attn")
    result = train_text_slider(sdxl, [AGE], config, progress=False)
    assert result.losses[-1] < 0.3 * result.losses[0]
    assert all(".attn" in p for p in result.weights.modules)


def test_same_seed_same_slider_and_other_seed_differs(sd1):
    from sliders_core.backends.diffusers_backend import DiffusersDenoiser
    from sliders_core.tiny import tiny_sd1_pipeline

    a = train_text_slider(sd1, [AGE], quick_config(), progress=False).weights
    b = train_text_slider(DiffusersDenoiser(tiny_sd1_pipeline()), [AGE], quick_config(), progress=False).weights
    c = train_text_slider(DiffusersDenoiser(tiny_sd1_pipeline()), [AGE], quick_config(seed=1), progress=False).weights
    assert all(torch.equal(a.modules[p].up, b.modules[p].up) for p in a.modules)
    assert not all(torch.equal(a.modules[p].up, c.modules[p].up) for p in a.modules)


def test_effect_is_linear_in_alpha_and_flips_sign(sd1):
    random_slider(sd1, scale=0.01)
    x, t, c = torch.randn(1, 4, 16, 16), torch.tensor([400]), sd1.encode(["a person"])

    @torch.no_grad()
    def out(alpha):
        sd1.sliders.set_scales({"s": alpha})
        return sd1.predict(x, t, c)

    base = out(0.0)
    with torch.no_grad(), sd1.sliders.disabled():
        assert torch.equal(base, sd1.predict(x, t, c))
    d = {a: (out(a) - base).flatten() for a in (-2.0, -1.0, 0.5, 1.0, 2.0)}
    cos = torch.nn.functional.cosine_similarity
    assert cos(d[1.0], -d[-1.0], dim=0) > 0.99  # negative α moves the other way
    assert cos(d[1.0], d[2.0], dim=0) > 0.99
    for a in (-2.0, 0.5, 2.0):
        ratio = d[a].norm() / d[1.0].norm()
        assert abs(ratio - abs(a)) < 0.1 * abs(a)
    # exactly linear per layer: the peft layer's effective weight is W + α·ΔW
    path = next(p for p in sd1.sliders.lora_candidates() if p.endswith("attn1.to_q"))
    layer = sd1.unet.get_submodule(path)
    delta = sd1.sliders.export("s").modules[path].delta_weight()
    probe = torch.randn(3, layer.in_features)
    for alpha in (-1.7, 0.3, 2.5):
        sd1.sliders.set_scales({"s": alpha})
        with torch.no_grad():
            assert torch.allclose(layer(probe), probe @ (layer.base_layer.weight + alpha * delta).T, atol=1e-5)


def test_sliders_compose_with_independent_scales(sd1):
    a = random_slider(sd1, name="a", seed=1, scale=0.05)
    b = random_slider(sd1, name="b", layers="attn", seed=2, scale=0.05)
    path = next(p for p in a.modules if p.endswith("attn1.to_k") and p in b.modules)
    layer = sd1.unet.get_submodule(path)
    probe = torch.randn(2, layer.in_features)
    sd1.sliders.set_scales({"a": 1.5, "b": -0.7})
    expected = probe @ (layer.base_layer.weight + 1.5 * a.modules[path].delta_weight()
                        - 0.7 * b.modules[path].delta_weight()).T
    with torch.no_grad():
        assert torch.allclose(layer(probe), expected, atol=1e-5)
    sd1.sliders.set_scales({"a": 1.5})
    with torch.no_grad():
        assert torch.allclose(layer(probe), probe @ (layer.base_layer.weight + 1.5 * a.modules[path].delta_weight()).T,
                              atol=1e-5)


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(sd1, tmp_path, monkeypatch):
    real_predict = sd1.predict
    count = {"lora": 0}

    def poisoned(x, level, cond):
        out = real_predict(x, level, cond)
        if torch.is_grad_enabled():
            count["lora"] += 1
            if count["lora"] == 4:
                return out * float("nan")
        return out

    monkeypatch.setattr(sd1, "predict", poisoned)
    path = tmp_path / "s.safetensors"
    with pytest.raises(TrainingDivergedError, match="step 4.*step 3"):
        train_text_slider(sd1, [AGE], quick_config(iterations=10), checkpoint_path=path, progress=False)
    saved = load_slider(path, sd1.naming, sd1.family)
    assert saved.metadata["sliders.steps"] == "3"
    assert all(torch.isfinite(m.up).all() and torch.isfinite(m.down).all() for m in saved.modules.values())


def test_save_every_and_resume(sd1, tmp_path):
    from sliders_core.backends.diffusers_backend import DiffusersDenoiser
    from sliders_core.tiny import tiny_sd1_pipeline

    path = tmp_path / "s.safetensors"
    steps_seen = []
    train_text_slider(sd1, [AGE], quick_config(iterations=4, save_every=2), checkpoint_path=path,
                      callback=lambda step, total, loss: steps_seen.append((step, total, loss)), progress=False)
    assert [(s, t) for s, t, loss in steps_seen if loss == loss] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    first = load_slider(path, sd1.naming, sd1.family)
    assert first.metadata["sliders.steps"] == "4"
    assert json.loads(first.metadata["sliders.prompts"])[0]["preservation"] == list(AGE.preservation)
    other = DiffusersDenoiser(tiny_sd1_pipeline())
    result = train_text_slider(other, [AGE], quick_config(iterations=7), resume=first, progress=False)
    assert len(result.losses) == 3 and result.weights.metadata["sliders.steps"] == "7"
    moved = [not torch.equal(first.modules[p].up, result.weights.modules[p].up) for p in first.modules]
    assert any(moved)


def test_cancel_from_callback_stops_without_writing(sd1, tmp_path):
    path = tmp_path / "s.safetensors"

    def cancel(step, total, loss):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_text_slider(sd1, [AGE], quick_config(iterations=5), checkpoint_path=path, callback=cancel,
                          progress=False)
    assert not path.exists()


def test_forward_budget_per_iteration(sd1):
    pair = PromptPair(target="a person", positive="a person, old", negative="a person, young")
    config = TrainConfig(iterations=40, resolution=32)  # default trajectory settings
    result = train_text_slider(sd1, [pair], config, progress=False)
    # ≤ 2 frozen (c+, c−; none for a state drawn again) + 1 LoRA + a 30-step CFG trajectory amortised over
    # 20 iterations (3) = at most 6, plus the effect check's share
    assert result.unet_samples_per_iteration <= 8


@pytest.mark.parametrize("options", [{}, {"signs": "both", "contrast": "ends"}, {"anchors": ("a cat",)}])
def test_a_state_drawn_again_reuses_its_frozen_predictions_and_trains_the_same(sd1, monkeypatch, options):
    import random

    from sliders_core import text_slider
    config = quick_config(iterations=8, trajectory_steps=4, trajectory_reuse=8, **options)
    rng = random.Random(config.seed)  # the trainer's draws of the trajectory state
    draws = [rng.randrange(1, 4) for _ in range(config.iterations)]
    # each sign of "ends" has its own frozen prompts, so a state is shared only within a sign
    signs = [1.0 if "signs" not in options or step % 2 == 0 else -1.0 for step in range(config.iterations)]
    repeats = config.iterations - len(set(zip(draws, signs)))
    assert repeats > 0  # the seed must draw some state twice for this test to mean anything

    def run(name):
        calls = []
        real = sd1.predict
        monkeypatch.setattr(sd1, "predict", lambda *a, **k: calls.append(1) or real(*a, **k))
        result = train_text_slider(sd1, [AGE], config, name=name, progress=False)
        monkeypatch.setattr(sd1, "predict", real)
        return result, len(calls)

    kept, kept_calls = run("kept")
    monkeypatch.setattr(text_slider, "cached", lambda cache, key, compute: compute())
    fresh, fresh_calls = run("fresh")
    assert fresh_calls - kept_calls == repeats * (2 if options.get("anchors") else 1)
    assert kept.losses == fresh.losses
    assert torch.equal(flat(kept), flat(fresh))


def test_reference_style_list_of_pairs_round_robins_with_own_eta(sd1, monkeypatch):
    male = PromptPair(target="male person", positive="male person, old", negative="male person, young", eta=1.0)
    female = PromptPair(target="female person", positive="female person, old", negative="female person, young",
                        eta=3.0)
    seen = []
    real_encode = sd1.encode
    monkeypatch.setattr(sd1, "encode", lambda prompts: seen.append(list(prompts)) or real_encode(prompts))
    result = train_text_slider(sd1, [male, female], quick_config(iterations=4), progress=False)
    assert json.loads(result.weights.metadata["sliders.eta"]) == [1.0, 3.0]
    assert [p["target"] for p in json.loads(result.weights.metadata["sliders.prompts"])] == ["male person",
                                                                                           "female person"]
    assert ["female person, old"] in [s[1:2] for s in seen]


def test_gradient_checkpointing_trains_the_same_slider(sd1):
    from sliders_core.backends.diffusers_backend import DiffusersDenoiser
    from sliders_core.tiny import tiny_sd1_pipeline

    plain = train_text_slider(sd1, [AGE], quick_config(iterations=3), progress=False)
    other = DiffusersDenoiser(tiny_sd1_pipeline())
    checkpointed = train_text_slider(other, [AGE], quick_config(iterations=3, gradient_checkpointing=True),
                                     progress=False)
    assert not other.unet.is_gradient_checkpointing  # switched off again afterwards
    for path, module in plain.weights.modules.items():
        assert torch.allclose(module.up, checkpointed.weights.modules[path].up, atol=1e-6)


def test_neutral_prediction_reused_from_the_trajectory_equals_a_fresh_one(sd1):
    item = encode_pair(sd1, AGE)
    noise = sd1.initial_noise(2, 32, torch.Generator().manual_seed(3))
    trajectory = sd1.sample(item.target, sd1.encode([""]), guidance=3.0, steps=5, noise=noise, record=True)
    assert len(trajectory.cond_outputs) == len(trajectory.states) == 5
    for k in (1, 3):
        x_t, level = trajectory.states[k], trajectory.levels[k]
        fresh = frozen_target(sd1, item, x_t, level)
        reused = frozen_target(sd1, item, x_t, level, eps_neutral=trajectory.cond_outputs[k])
        torch.testing.assert_close(reused, fresh, atol=1e-5, rtol=1e-4)


def test_cancel_acts_inside_the_frozen_trajectory_within_one_model_call(sd1, tmp_path):
    """The trajectory before step 1 is many model calls: the callback sees each, so a cancel acts at once."""
    path = tmp_path / "s.safetensors"
    calls = []

    def cancel(step, total, loss):
        calls.append((step, loss))
        if len(calls) == 3:
            raise KeyboardInterrupt

    before = sd1.forward_count
    with pytest.raises(KeyboardInterrupt):
        train_text_slider(sd1, [AGE], quick_config(iterations=5), checkpoint_path=path, callback=cancel,
                          progress=False)
    assert all(step == 0 and loss != loss for step, loss in calls)  # inside step 1, before any update
    assert sd1.forward_count - before <= 3 * 2  # three CFG sampling steps, nothing after the cancel
    assert not path.exists()


def test_effect_check_warns_when_the_slider_does_nothing(sd1):
    weak = train_text_slider(sd1, [AGE], quick_config(iterations=2, lr=1e-9), name="weak", progress=False)
    assert weak.effect < 0.2 and "almost no effect" in weak.warning and "WARNING" in weak.report()
    strong = train_text_slider(sd1, [AGE], quick_config(iterations=6, lr=3e-2), name="strong", progress=False)
    assert strong.effect > weak.effect + 0.1, (strong.effect, weak.effect)


# --- disentanglement options (issue 13) ---

def record_trained_scales(denoiser, monkeypatch):
    """The slider scale of every gradient-carrying forward (the LoRA-on prediction of each step)."""
    scales, current = [], {}
    real_set, real_predict = denoiser.sliders.set_scales, denoiser.predict

    def spy_set(s):
        current.clear()
        current.update(s)
        real_set(s)

    def spy_predict(x, level, cond):
        if torch.is_grad_enabled():
            scales.append((dict(current), level.clone(), len(cond)))
        return real_predict(x, level, cond)

    monkeypatch.setattr(denoiser.sliders, "set_scales", spy_set)
    monkeypatch.setattr(denoiser, "predict", spy_predict)
    return scales


@pytest.mark.parametrize("n_pairs, expected", [(1, [1, -1, 1, -1]), (2, [1, 1, -1, -1])])
def test_both_signs_alternates_the_trained_scale_per_pass_over_the_pairs(sd1, monkeypatch, n_pairs, expected):
    scales = record_trained_scales(sd1, monkeypatch)
    train_text_slider(sd1, [AGE] * n_pairs, quick_config(iterations=4, signs="both"), name="b", progress=False)
    assert [s["b"] for s, _, _ in scales[:4]] == expected


def test_the_minus_one_target_is_eq8_with_the_sign_reversed(sd1):
    item = encode_pair(sd1, AGE)
    x_t, level = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2)), torch.tensor([500])
    with torch.no_grad(), sd1.sliders.disabled():
        neutral = sd1.predict(x_t, level, sd1.encode([AGE.target])).float()
    plus, minus = frozen_target(sd1, item, x_t, level), frozen_target(sd1, item, x_t, level, scale=-1.0)
    assert torch.allclose(minus - neutral, -(plus - neutral), atol=1e-5)
    assert not torch.allclose(minus, plus, atol=1e-4)
    # negative_eta: the −1 steps' own η (AGE's η is 2), the +1 steps unchanged
    own = encode_pair(sd1, AGE, negative_eta=3.0)
    assert torch.allclose(frozen_target(sd1, own, x_t, level, scale=-1.0) - neutral, 1.5 * (minus - neutral), atol=1e-5)
    assert torch.allclose(frozen_target(sd1, own, x_t, level), plus, atol=1e-6)
    with pytest.raises(SliderError, match="negative_eta"):
        TrainConfig(negative_eta=3.0).validate()


def test_preservation_trajectories_cycle_c_t_plus_each_attribute(sd1, monkeypatch):
    sampled, real_sample = [], sd1.sample
    texts = {}
    real_encode = sd1.encode

    def spy_encode(prompts):
        cond = real_encode(prompts)
        texts[id(cond)] = list(prompts)
        return cond

    def spy_sample(cond, *args, **kwargs):
        sampled.append(texts.get(id(cond)))
        return real_sample(cond, *args, **kwargs)

    monkeypatch.setattr(sd1, "encode", spy_encode)
    monkeypatch.setattr(sd1, "sample", spy_sample)
    item = encode_pair(sd1, AGE, trajectory_prompts="preservation")
    assert [t for t, _ in item.trajectory_prompts] == ["a person, male", "a person, female", "a person, child"]
    train_text_slider(sd1, [AGE], quick_config(iterations=9, trajectory_reuse=2, trajectory_prompts="preservation"),
                      name="p", progress=False)
    assert sampled[:4] == [["a person, male"], ["a person, female"], ["a person, child"], ["a person, male"]]


def test_level_range_draws_only_from_its_part_of_the_trajectory(sd1, monkeypatch):
    levels = sd1.sample(sd1.encode(["x"]), sd1.encode([""]), guidance=3.0, steps=10,
                        noise=sd1.initial_noise(1, 32, torch.Generator().manual_seed(0)), record=True).levels
    allowed = {float(v) for v in levels[5:10]}
    scales = record_trained_scales(sd1, monkeypatch)
    train_text_slider(sd1, [AGE], quick_config(iterations=12, trajectory_steps=10, level_range=(0.5, 1.0)),
                      name="l", progress=False)
    seen = {float(level[0]) for _, level, _ in scales}
    assert seen <= allowed and len(seen) > 1


def test_anchor_prompts_join_the_lora_on_forward_and_change_the_slider(sd1, monkeypatch):
    scales = record_trained_scales(sd1, monkeypatch)
    anchored = train_text_slider(sd1, [AGE], quick_config(anchors=("a cat", "a dog")), name="a", progress=False)
    assert {n for _, _, n in scales} == {3}  # c_t and both anchors in one forward
    monkeypatch.undo()
    plain = train_text_slider(sd1, [AGE], quick_config(), name="n", progress=False)
    free = train_text_slider(sd1, [AGE], quick_config(anchors=("a cat",), anchor_weight=0.0), name="f", progress=False)
    assert torch.allclose(flat(free), flat(plain), atol=1e-5)  # weight 0: the same slider (up to batch numerics)
    assert not torch.allclose(flat(anchored), flat(plain))


def flat(result) -> torch.Tensor:
    return torch.cat([t.flatten().float() for m in result.weights.modules.values() for t in (m.down, m.up)])


def test_trajectory_with_the_slider_on_samples_at_the_trained_scale(sd1, monkeypatch):
    states, real_sample = [], sd1.sample

    def spy_sample(*args, **kwargs):
        states.append(not sd1.sliders._layers()[0].disable_adapters)
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(sd1, "sample", spy_sample)
    on = train_text_slider(sd1, [AGE], quick_config(trajectory_slider=True), name="on", progress=False)
    off = train_text_slider(sd1, [AGE], quick_config(), name="off", progress=False)
    assert states[:2] == [True, True] and states[2:4] == [False, False]  # slider on, then the default: off
    # the first trajectory is drawn with a zero-initialised LoRA up-projection, later ones are not
    assert not torch.allclose(flat(on), flat(off))


@pytest.mark.parametrize("options, message", [
    ({"signs": "minus"}, "signs"), ({"trajectory_prompts": "x"}, "trajectory_prompts"),
    ({"level_range": (0.5, 0.5)}, "level_range"), ({"anchor_weight": -1.0}, "anchor_weight")])
def test_bad_disentanglement_options_are_refused(options, message):
    with pytest.raises(SliderError, match=message):
        TrainConfig(**options).validate()


def test_ends_contrast_pushes_each_sign_toward_its_own_end_against_the_neutral_prompt(sd1):
    item = encode_pair(sd1, AGE, contrast="ends")
    x_t, level = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3)), torch.tensor([400])
    with torch.no_grad(), sd1.sliders.disabled():
        def eps(prompt):
            return sd1.predict(x_t, level, sd1.encode([prompt])).float()
        for scale, end in ((1.0, "a person, old"), (-1.0, "a person, young")):
            direct = eps("a person") + 2.0 / 3 * sum(eps(f"{end}, {p}") - eps(f"a person, {p}") for p in AGE.preservation)
            assert torch.allclose(frozen_target(sd1, item, x_t, level, scale=scale), direct, atol=1e-5, rtol=1e-4)


def test_with_the_slider_on_in_x_t_each_trajectory_trains_the_sign_it_was_drawn_at(sd1, monkeypatch):
    from sliders_core import text_slider
    scales, drawn = record_trained_scales(sd1, monkeypatch), []
    real = text_slider.draw_trajectory

    def spy(denoiser, item, config, empty, noise, slider, scale, callback):
        drawn.append(scale)
        return real(denoiser, item, config, empty, noise, slider, scale, callback)

    monkeypatch.setattr(text_slider, "draw_trajectory", spy)
    config = quick_config(iterations=9, trajectory_reuse=3, signs="both", trajectory_slider=True)
    train_text_slider(sd1, [AGE], config, name="s", progress=False)
    assert drawn == [1.0, -1.0, 1.0]
    assert [s["s"] for s, _, _ in scales[:9]] == [1.0] * 3 + [-1.0] * 3 + [1.0] * 3


def test_ends_contrast_with_signs_plus_trains_the_positive_end_alone(sd1, monkeypatch):
    import inspect

    from sliders_core import text_slider
    scales, targets = record_trained_scales(sd1, monkeypatch), []
    real = text_slider.frozen_target
    signature = inspect.signature(real)

    def spy(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        targets.append((bound.arguments["item"].frozen_ends is not None, bound.arguments["scale"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(text_slider, "frozen_target", spy)
    train_text_slider(sd1, [AGE], quick_config(iterations=4, contrast="ends"), name="one", progress=False)
    assert [s["one"] for s, _, _ in scales[:4]] == [1.0] * 4
    assert targets[:4] == [(True, 1.0)] * 4  # the 'ends' target, toward c+ only


def test_without_directions_leaves_only_the_part_orthogonal_to_every_direction():
    gen = torch.Generator().manual_seed(0)
    directions = torch.randn(3, 2, 4, 5, 5, generator=gen)  # [P, B, ...]
    directions[2, 1] = directions[0, 1]  # a repeated direction removes nothing more
    inside = torch.einsum("pb,pb...->b...", torch.randn(3, 2, generator=gen), directions)
    outside = torch.randn(2, 4, 5, 5, generator=gen)
    outside = without_directions(outside, directions)
    for b in range(2):
        for p in range(3):
            assert abs(float((outside[b] * directions[p, b]).sum())) < 1e-3
    # a push inside the span vanishes; the orthogonal part is kept as it is
    assert without_directions(inside, directions).abs().max() < 1e-4
    assert torch.allclose(without_directions(inside + outside, directions), outside, atol=1e-4)
    assert torch.equal(without_directions(outside, torch.zeros_like(directions)), outside)


@pytest.mark.parametrize("contrast", ["pair", "ends"])
def test_projected_target_moves_no_preserved_attribute_and_keeps_the_rest_of_the_push(sd1, contrast):
    plain = encode_pair(sd1, AGE, contrast=contrast)
    projected = encode_pair(sd1, AGE, contrast=contrast, project=True)
    x_t, level = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4)), torch.tensor([800, 200])
    with torch.no_grad(), sd1.sliders.disabled():
        neutral = sd1.predict(x_t, level, sd1.encode(["a person"]).repeat_each(2)).float()
        held = torch.stack([sd1.predict(x_t, level, sd1.encode([f"a person, {p}"]).repeat_each(2)).float() - neutral
                            for p in AGE.preservation])
        for scale in (1.0, -1.0):
            push = frozen_target(sd1, plain, x_t, level, scale=scale) - neutral
            kept = frozen_target(sd1, projected, x_t, level, scale=scale) - neutral
            for b in range(2):
                for p in range(len(AGE.preservation)):
                    along = float((kept[b] * held[p, b]).sum()) / float(held[p, b].norm() * kept[b].norm())
                    assert abs(along) < 1e-3
            # exactly the plain push minus its fit on the held directions
            assert torch.allclose(kept, without_directions(push, held), atol=1e-5, rtol=1e-4)
            assert not torch.allclose(kept, push, atol=1e-4)


def test_projection_needs_preservation_attributes(sd1):
    with pytest.raises(SliderError, match="project_preservation needs preservation"):
        encode_pair(sd1, PromptPair(target="a person", positive="old", negative="young"), project=True)
    result = train_text_slider(sd1, [AGE], quick_config(project_preservation=True), name="pj", progress=False)
    assert json.loads(result.weights.metadata["sliders.train_config"])["project_preservation"] is True


def test_a_two_ended_slider_trains_its_second_lora_on_the_minus_one_steps(sd1, tmp_path):
    from sliders_core.backends.diffusers_backend import DiffusersDenoiser
    from sliders_core.formats import META_ENDS
    from sliders_core.slider_weights import SliderWeights
    from sliders_core.tiny import tiny_sd1_pipeline

    def ends(weights):
        return [any(bool(m.up.abs().sum()) for m in modules.values()) for modules in (weights.modules, weights.negative)]

    # step 1 trains at +1 and step 2 at −1: the negative end's up-projection leaves zero only at step 2
    one = train_text_slider(sd1, [AGE], quick_config(iterations=1, signs="separate", contrast="ends"), name="one",
                            progress=False)
    assert ends(one.weights) == [True, False]
    path = tmp_path / "two.safetensors"
    two = train_text_slider(sd1, [AGE], quick_config(iterations=4, signs="separate", contrast="ends", save_every=2),
                            name="two", checkpoint_path=path, progress=False)
    assert ends(two.weights) == [True, True]
    saved = load_slider(path, sd1.naming, sd1.family)
    assert saved.metadata[META_ENDS] == "two" and saved.metadata["sliders.steps"] == "4"
    assert json.loads(saved.metadata["sliders.train_config"])["signs"] == "separate"
    # α < 0 runs the negative end at |α| (not the positive end negated), α > 0 the positive end
    other = DiffusersDenoiser(tiny_sd1_pipeline())
    other.sliders.add("minus", SliderWeights(saved.negative))
    other.sliders.add("plus", SliderWeights(saved.modules))
    x, t, c = torch.randn(1, 4, 16, 16), torch.tensor([400]), sd1.encode(["a person"])
    with torch.no_grad():
        for alpha, scales in ((-0.8, {"minus": 0.8}), (0.8, {"plus": 0.8})):
            sd1.sliders.set_scales({"two": alpha})
            other.sliders.set_scales(scales)
            assert torch.allclose(sd1.predict(x, t, c), other.predict(x, t, c), atol=1e-6)
    assert 0 < two.effect <= 2  # the weaker end's share of its push
    # resuming continues both ends; a one-ended file cannot continue as two-ended, nor the reverse
    resumed = train_text_slider(other, [AGE], quick_config(iterations=6, signs="separate", contrast="ends"),
                                name="resumed", resume=saved, progress=False)
    assert len(resumed.losses) == 2 and resumed.weights.negative is not None
    with pytest.raises(SliderError, match="has one end, this run trains two"):
        train_text_slider(other, [AGE], quick_config(iterations=6, signs="separate"), name="a",
                          resume=SliderWeights(saved.modules, {"sliders.steps": "4"}), progress=False)
    with pytest.raises(SliderError, match="has two ends, this run trains one"):
        train_text_slider(other, [AGE], quick_config(iterations=6, signs="both"), name="b", resume=saved,
                          progress=False)
