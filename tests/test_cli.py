import json
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open

from sliders_core.cli import main

PROMPTS = """
target: a person
positive: a person, old
unconditional: a person, young
guidance_scale: 2
preservation: [male, female]
"""


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "age.yaml"
    path.write_text(PROMPTS)
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def test_train_sweep_generate_info(tmp_path, prompt_file, sd1_folder, capsys):
    out_dir = tmp_path / "sliders"
    code, summary, _ = run(capsys, "train", "--model", sd1_folder, "--prompts", prompt_file, "--out-dir", out_dir,
                           "--name", "age", "--iterations", 3, "--resolution", 32, "--sweep", "a person")
    assert code == 0
    slider = out_dir / "age.safetensors"
    assert summary["slider"] == str(slider.resolve()) and slider.is_file()
    with safe_open(str(slider), "pt") as f:
        assert all(k.startswith("lora_unet_") for k in f.keys())
        meta = f.metadata()
    assert meta["sliders.steps"] == "3" and json.loads(meta["sliders.eta"]) == [2.0]
    assert Image.open(summary["sweep"]).size == (5 * 128, 16 + 4 * 128)

    code, summary, _ = run(capsys, "sweep", "--model", sd1_folder, "--slider", slider, "--prompt", "a person",
                           "--alphas=-1,0,1", "--seeds", "0,1,2", "--steps", 3, "--resolution", 32,
                           "--with", f"{slider}:0.5", "--out", tmp_path / "grid.png")
    assert code == 0 and Image.open(tmp_path / "grid.png").size == (3 * 128, 16 + 3 * 128)

    code, summary, _ = run(capsys, "generate", "--model", sd1_folder, "--prompt", "a person", "--slider",
                           f"{slider}:1.5", "--slider", f"{slider}:-0.5", "--steps", 3, "--resolution", 32,
                           "--start", 0.3, "--out", tmp_path / "img.png")
    assert code == 0 and sorted(summary["sliders"].values()) == [-0.5, 1.5]

    code, summary, _ = run(capsys, "info", slider, "--model", sd1_folder)
    assert code == 0 and summary["loads_on_model"]["modules"] > 0


@pytest.mark.parametrize("extra, message", [
    (["--name", "../escape"], "path separators"),
    (["--name", "ok", "--rank", "0"], "rank"),
    (["--name", "ok", "--eta", "-1"], "positive"),
])
def test_bad_train_input_fails_cleanly_and_writes_nothing(tmp_path, prompt_file, capsys, extra, message):
    out_dir = tmp_path / "out"
    code, _, err = run(capsys, "train", "--model", "tiny-sd1", "--prompts", prompt_file, "--out-dir", out_dir,
                       "--iterations", 2, *extra)
    assert code == 2 and message in err
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_slider_for_another_family_is_refused_by_the_cli(tmp_path, prompt_file, capsys):
    code, summary, _ = run(capsys, "train", "--model", "tiny-sdxl", "--prompts", prompt_file, "--out-dir", tmp_path,
                           "--name", "xl", "--iterations", 1, "--resolution", 32)
    assert code == 0
    code, _, err = run(capsys, "generate", "--model", "tiny-sd1", "--prompt", "x", "--slider", summary["slider"],
                       "--out", tmp_path / "x.png")
    assert code == 2 and "base family" in err


def test_invert_then_edit(tmp_path, prompt_file, sd1_folder, capsys):
    import numpy as np

    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(photo)
    inv = tmp_path / "inv.safetensors"
    code, summary, _ = run(capsys, "invert", "--model", sd1_folder, "--image", photo, "--prompt", "a person",
                           "--out", inv, "--steps", 4, "--inner-iterations", 2)
    assert code == 0 and inv.is_file() and summary["steps"] == 4 and summary["psnr_db"] > 0
    assert Image.open(summary["reconstruction"]).size[0] > 0
    code, trained, _ = run(capsys, "train", "--model", sd1_folder, "--prompts", prompt_file, "--out-dir", tmp_path,
                           "--name", "age", "--iterations", 2, "--resolution", 32)
    out = tmp_path / "edits.png"
    code, summary, _ = run(capsys, "edit", "--model", sd1_folder, "--inversion", inv, "--slider", trained["slider"],
                           "--alphas=-2,0,2", "--out", out)
    assert code == 0 and out.is_file() and summary["steps"] == 4
    code, _, err = run(capsys, "edit", "--model", "tiny-sdxl", "--inversion", inv, "--out", out)
    assert code == 2 and "made on a" in err
    code, _, err = run(capsys, "invert", "--model", sd1_folder, "--image", tmp_path / "none.png", "--out", inv)
    assert code == 2 and "image not found" in err


def test_discover_writes_one_slider_per_direction_and_a_preview(tmp_path, capsys):
    out = tmp_path / "space"
    code, summary, err = run(capsys, "discover", "--concept", "a shape", "--images", "12", "--k", "2",
                             "--iterations", "5", "--out-dir", out)
    assert code == 0, err
    assert summary["explained_variance"][0] >= summary["explained_variance"][1] > 0
    for path in summary["sliders"]:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata()
        assert metadata["sliders.kind"] == "sliderspace" and metadata["sliders.concept"] == "a shape"
    assert Image.open(summary["preview"]).size == (5 * 128, 16 + 2 * 128)  # a row per slider, a column per α
    # --resume: finished sliders are kept as they are, unfinished ones continue from their steps
    first = Path(summary["sliders"][0]).read_bytes()
    code, again, err = run(capsys, "discover", "--concept", "a shape", "--images", "12", "--k", "2",
                           "--iterations", "5", "--out-dir", out, "--resume")
    assert code == 0, err
    assert Path(again["sliders"][0]).read_bytes() == first and again["train_seconds"] == 0
    code, longer, err = run(capsys, "discover", "--concept", "a shape", "--images", "12", "--k", "2",
                            "--iterations", "8", "--out-dir", out, "--resume")
    assert code == 0, err
    with safe_open(longer["sliders"][1], framework="pt") as f:
        assert f.metadata()["sliders.steps"] == "8"
    code, _, err = run(capsys, "discover", "--concept", "a shape", "--images", "4", "--k", "4", "--out-dir", out)
    assert code == 2 and "K = 4 sliders need more than K images" in err
    code, _, err = run(capsys, "discover", "--concept", "a shape", "--embedder", tmp_path / "none", "--out-dir", out)
    assert code == 2 and "not a transformers model folder" in err


def test_discover_with_a_clip_folder(tmp_path, capsys):
    from test_sliderspace import tiny_clip_folder

    code, summary, err = run(capsys, "discover", "--concept", "a shape", "--images", "8", "--k", "2",
                             "--iterations", "3", "--embedder", tiny_clip_folder(tmp_path / "clip"),
                             "--rotation", "pca", "--out-dir", tmp_path / "space")
    assert code == 0, err
    assert summary["rotation"] == "pca" and len(summary["sliders"]) == 2 and Path(summary["sliders"][1]).is_file()


def test_train_passes_the_disentanglement_options_into_the_slider_file(tmp_path, prompt_file, sd1_folder, capsys):
    code, summary, _ = run(capsys, "train", "--model", sd1_folder, "--prompts", prompt_file, "--out-dir", tmp_path,
                           "--name", "opts", "--iterations", 2, "--resolution", 32, "--signs", "both",
                           "--trajectory-prompts", "preservation", "--anchor", "a cat", "--anchor-weight", 0.5,
                           "--level-range", 0.2, 0.9, "--preservation-reduce", "sum")
    assert code == 0
    with safe_open(summary["slider"], "pt") as f:
        config = json.loads(f.metadata()["sliders.train_config"])
    assert (config["signs"], config["trajectory_prompts"], config["anchors"], config["anchor_weight"],
            config["level_range"], config["preservation_reduce"]) == (
        "both", "preservation", ["a cat"], 0.5, [0.2, 0.9], "sum")
    code, _, err = run(capsys, "train", "--model", sd1_folder, "--prompts", prompt_file, "--out-dir", tmp_path,
                       "--name", "bad", "--iterations", 2, "--level-range", 0.9, 0.2)
    assert code == 2 and "level_range" in err


def test_train_separate_writes_a_two_ended_slider_that_generate_and_info_read(tmp_path, prompt_file, sd1_folder,
                                                                                 capsys):
    code, summary, err = run(capsys, "train", "--model", sd1_folder, "--prompts", prompt_file, "--out-dir", tmp_path,
                             "--name", "two", "--iterations", 2, "--lr", 0.05, "--resolution", 32, "--signs", "separate",
                             "--contrast", "ends")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.glob("two*.safetensors")) == ["two.safetensors"]
    code, info, err = run(capsys, "info", summary["slider"], "--model", sd1_folder)
    assert code == 0, err
    assert info["metadata"]["sliders.ends"] == "two" and info["loads_on_model"]["ends"] == 2
    images = {}
    for alpha in ("-1", "1"):
        out = tmp_path / f"at{alpha}.png"
        code, _, err = run(capsys, "generate", "--model", sd1_folder, "--prompt", "a person", "--steps", 2,
                           "--resolution", 32, "--slider", f"{summary['slider']}:{alpha}", "--out", out)
        assert code == 0, err
        images[alpha] = out.read_bytes()
    assert images["-1"] != images["1"]


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd3"])
def test_cli_trains_and_renders_a_flow_transformer_slider(tmp_path, prompt_file, capsys, model):
    code, summary, err = run(capsys, "train", "--model", model, "--prompts", prompt_file, "--out-dir", tmp_path,
                             "--name", "flow", "--iterations", 3, "--resolution", 32, "--layers", "dit-attn")
    assert code == 0, err
    code, info, _ = run(capsys, "info", summary["slider"])
    assert code == 0 and info["example_keys"][0].startswith("transformer.transformer_blocks.")
    code, _, err = run(capsys, "generate", "--model", model, "--prompt", "a circle", "--slider", summary["slider"],
                       "--steps", 2, "--resolution", 32, "--out", tmp_path / "g.png")
    assert code == 0 and (tmp_path / "g.png").is_file(), err
    code, _, err = run(capsys, "train", "--model", model, "--prompts", prompt_file, "--out-dir", tmp_path,
                       "--name", "bad", "--iterations", 1, "--resolution", 32, "--layers", "noxattn")  # a UNet preset
    assert code == 2 and "dit-attn" in err
    code, summary, _ = run(capsys, "train", "--model", model, "--prompts", prompt_file, "--out-dir", tmp_path,
                           "--name", "auto", "--iterations", 1, "--resolution", 32)  # the default: auto
    assert code == 0
    code, info, _ = run(capsys, "info", summary["slider"])
    assert info["metadata"]["sliders.layers"] == "dit-attn"
