import pytest

from sliders_core.config import TrainConfig, parse_numbers
from sliders_core.errors import SliderError
from sliders_core.prompts import PromptPair, compose, load_prompt_set, pair_from_dict


def write(tmp_path, text):
    path = tmp_path / "prompts.yaml"
    path.write_text(text)
    return path


def test_reference_prompt_file_loads_with_guidance_scale_as_eta(tmp_path):
    path = write(tmp_path, """
- target: "male person"
  positive: "male person, very old"
  unconditional: "male person, very young"
  neutral: "male person"
  action: "enhance"
  guidance_scale: 4
  resolution: 512
  dynamic_resolution: false
  batch_size: 1
- target: "female person"
  positive: "female person, very old"
  unconditional: "female person, very young"
  action: "erase"
  guidance: 2
""")
    first, second = load_prompt_set(path)
    assert (first.target, first.positive, first.negative, first.eta) == (
        "male person", "male person, very old", "male person, very young", 4.0)
    assert first.resolution == 512 and first.sign == 1.0
    # `guidance` is η, not silently dropped (the reference's bug made it 1)
    assert second.eta == 2.0 and second.sign == -1.0 and second.neutral_prompt == "female person"


def test_preservation_prompts_compose_with_placeholder_or_append():
    pair = PromptPair(target="a circle", positive="a large {p} circle", negative="a small {p} circle",
                      preservation=("red", "blue"))
    assert pair.contrast_prompts() == (["a large red circle", "a large blue circle"],
                                       ["a small red circle", "a small blue circle"])
    pair = PromptPair(target="person", positive="person, old", negative="person, young", preservation=("male",))
    assert pair.contrast_prompts() == (["person, old, male"], ["person, young, male"])
    assert compose("a large {p} circle", None) == "a large circle"


def test_preservation_as_multiline_text():
    pair = pair_from_dict({"target": "t", "positive": "a", "unconditional": "b", "preservation": "x\n\n y \n"})
    assert pair.preservation == ("x", "y")


@pytest.mark.parametrize("entry, message", [
    ({"target": "t", "positive": "old", "unconditional": "young", "colour": 1}, "unknown key"),
    ({"target": "t", "positive": "", "unconditional": "young"}, "non-empty"),
    ({"target": "t", "positive": "old", "unconditional": "  "}, "non-empty"),
    ({"target": "t", "positive": "old", "unconditional": "old"}, "identical"),
    ({"target": "t", "positive": "old", "unconditional": "young", "guidance_scale": 0}, "positive number"),
    ({"target": "t", "positive": "old", "unconditional": "young", "guidance_scale": -1}, "positive number"),
    ({"target": "t", "positive": "old", "unconditional": "young", "guidance_scale": 1e6}, "absurd"),
    ({"target": "t", "positive": "old", "unconditional": "young", "guidance_scale": float("nan")}, "positive"),
    ({"target": "t", "positive": "old", "unconditional": "young", "guidance": 1, "guidance_scale": 2}, "differ"),
    ({"target": "t", "positive": "old", "unconditional": "young", "action": "boost"}, "action"),
    ({"target": "t", "positive": "old"}, "unconditional"),
    ({"target": "t", "positive": "old", "unconditional": "young", "dynamic_resolution": True}, "dynamic"),
    ({"target": "t", "positive": "old", "unconditional": "young", "preservation": ["a", "a"]}, "repeat"),
])
def test_bad_prompt_entries_are_refused_with_a_reason(entry, message):
    with pytest.raises(SliderError, match=message):
        pair_from_dict(entry)


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = write(tmp_path, "target: a\npositive: b\nunconditional: c\nguidence: 3\n")
    with pytest.raises(SliderError, match=r"prompts.yaml.*unknown key.*guidence"):
        load_prompt_set(path)


def test_empty_and_invalid_files(tmp_path):
    with pytest.raises(SliderError, match="empty"):
        load_prompt_set(write(tmp_path, ""))
    with pytest.raises(SliderError, match="YAML"):
        load_prompt_set(write(tmp_path, "target: [unclosed"))
    with pytest.raises(SliderError, match="not found"):
        load_prompt_set(tmp_path / "missing.yaml")


@pytest.mark.parametrize("field, value, message", [
    ("rank", 0, "rank"), ("rank", -3, "rank"), ("eta", 0.0, "positive"), ("eta", 500.0, "absurd"),
    ("lr", 0.0, "lr"), ("layers", "everything", "layers"), ("resolution", 100, "multiple of 8"),
    ("iterations", 0, "iterations"), ("alpha", 0.0, "alpha"),
])
def test_bad_train_config_values(field, value, message):
    with pytest.raises(SliderError, match=message):
        TrainConfig(**{field: value}).validate()


def test_number_lists_parse_for_cli_and_nodes_alike():
    assert parse_numbers("-2, -1,0 ;1, 2.5,") == [-2.0, -1.0, 0.0, 1.0, 2.5]
    assert parse_numbers("  ") == []
    with pytest.raises(SliderError, match="alphas must be comma-separated"):
        parse_numbers("1, big", "alphas")
    for bad in ("nan", "1, inf", "-inf"):
        with pytest.raises(SliderError, match="finite"):
            parse_numbers(bad)
