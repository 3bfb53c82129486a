"""Layout of the generated UI workflows (workflows/make_ui_workflows.py): the sidecar files
workflows/layout/<name>.json (positions, sizes, notes, groups), default sizes, and the overlap check.
Standard library + pytest only; no ComfyUI."""

from __future__ import annotations

import copy

import pytest
from workflow_support import WORKFLOWS, load_generator

TITLE = 30  # litegraph's node title bar, drawn above pos[1]
gen = load_generator()
SNAPSHOT = gen.load_snapshot()
API_WORKFLOWS = gen.api_workflows(WORKFLOWS)

# a small txt2img graph of core nodes
API = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
    "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
    "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
    "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
    "5": {"class_type": "KSampler", "inputs": {
        "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 0,
        "steps": 20, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
    "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
    "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "cat"}},
}
LAYOUT = {
    "nodes": {"1": {"pos": [60, 140]}, "5": {"pos": [480, 140], "size": [330, 300]},
              "7": {"pos": [880, 140], "size": [500, 520]}},
    "notes": [{"id": 50, "title": "Read me", "text": "Prompt → image.", "pos": [60, 400], "size": [300, 120]}],
    "groups": [{"title": "Load", "nodes": [1, 50]}, {"title": "Sample", "nodes": [5], "color": "#8A8"}],
}


def ui_for(layout, api=API):
    return gen.api_to_ui(api, SNAPSHOT, "test", copy.deepcopy(layout))


def by_id(ui) -> dict:
    return {n["id"]: n for n in ui["nodes"]}


def box(node) -> list:
    (x, y), (w, h) = node["pos"], node["size"]
    return [x, y - TITLE, w, h + TITLE]


def test_sidecar_positions_sizes_notes_and_groups_appear():
    ui = ui_for(LAYOUT)
    nodes = by_id(ui)
    assert nodes[1]["pos"] == [60, 140] and nodes[5]["pos"] == [480, 140] and nodes[7]["pos"] == [880, 140]
    assert nodes[5]["size"] == [330, 300] and nodes[7]["size"] == [500, 520]
    note = nodes[50]
    assert note["type"] == "Note" and note["title"] == "Read me"
    assert note["widgets_values"] == ["Prompt → image."] and note["properties"] == {"text": ""}
    assert note["inputs"] == [] and note["outputs"] == []
    assert (note["pos"], note["size"]) == ([60, 400], [300, 120])
    assert (note["color"], note["bgcolor"]) == ("#432", "#653")
    assert ui["last_node_id"] == 50
    assert [(g["id"], g["title"], g["color"], g["font_size"], g["flags"]) for g in ui["groups"]] == [
        (1, "Load", "#3f789e", 24, {}), (2, "Sample", "#8A8", 24, {})]
    assert gen.check_ui(ui, API, SNAPSHOT) == []
    assert gen.dumps(ui) == gen.dumps(ui_for(LAYOUT))  # deterministic


def test_nodes_without_a_pos_are_laid_out_clear_of_placed_ones():
    # a big note where the automatic layout starts: the free nodes must go around it
    layout = {"notes": [{"id": 20, "text": "big", "pos": [0, 0], "size": [2000, 600]}]}
    ui = ui_for(layout)
    assert gen.overlaps(ui) == []
    assert all(n["pos"][1] - TITLE >= 600 for n in ui["nodes"] if n["id"] != 20)


def _assert_groups_contain_members(ui, layout):
    nodes = by_id(ui)
    for group, spec in zip(ui["groups"], layout["groups"], strict=True):
        x, y, w, h = group["bounding"]
        for member in spec["nodes"]:
            bx, by, bw, bh = box(nodes[member])
            assert x < bx and bx + bw < x + w and by + bh < y + h, (group["title"], member)
            assert y + 40 <= by, f"group {group['title']!r}: no room for its title above node {member}'s title bar"


def test_group_bounding_contains_its_members_with_their_title_bars():
    ui = ui_for(LAYOUT)
    _assert_groups_contain_members(ui, LAYOUT)
    load = ui["groups"][0]["bounding"]  # members: node 1 at y 140 (title bar from 110), note 50 down to 520
    assert load[1] <= 140 - TITLE - 40 and load[1] + load[3] >= 520


@pytest.mark.parametrize("name", sorted(API_WORKFLOWS))
def test_shipped_sidecar_groups_contain_their_members(name):
    layout = gen.load_layout(name)
    if not layout.get("groups"):
        pytest.skip(f"workflows/layout/{name}.json has no groups")
    _assert_groups_contain_members(gen.api_to_ui(API_WORKFLOWS[name], SNAPSHOT, name), layout)


def test_note_ids_that_clash_are_refused():
    clash = copy.deepcopy(LAYOUT)
    clash["notes"][0]["id"] = 5
    with pytest.raises(ValueError, match="note id 5 clashes with API node 5 .KSampler.; use an id from 8 up"):
        ui_for(clash)
    twice = copy.deepcopy(LAYOUT)
    twice["notes"].append(dict(twice["notes"][0], pos=[60, 600]))
    with pytest.raises(ValueError, match="two notes have id 50"):
        ui_for(twice)


@pytest.mark.parametrize("layout,match", [
    ({"nodes": {"9": {"pos": [0, 0]}}}, "node 9 is not in the API file"),
    ({"nodes": {"1": {"position": [0, 0]}}}, "unknown keys .'position'."),
    ({"nodes": {"1": {"pos": [0]}}}, "node 1 pos must be two numbers"),
    ({"notes": [{"id": 50, "pos": [0, 0]}]}, "missing keys .'text'."),
    ({"groups": [{"title": "G", "nodes": [1, 99]}]}, r"unknown: \[99\]"),
    ({"group": []}, "unknown keys .'group'."),
])
def test_malformed_sidecars_are_refused(layout, match):
    with pytest.raises(ValueError, match=match):
        ui_for(layout)


def test_overlapping_nodes_are_reported():
    on_top = copy.deepcopy(LAYOUT)
    on_top["nodes"]["5"]["pos"] = [100, 160]  # over node 1
    problems = gen.check_ui(ui_for(on_top), API, SNAPSHOT)
    assert any("nodes 1 (CheckpointLoaderSimple) and 5 (KSampler) overlap" in p for p in problems), problems
    # node 5 just below node 1's body: only its title bar overlaps node 1, which still counts
    bottom = 140 + by_id(ui_for(LAYOUT))[1]["size"][1]
    title_only = copy.deepcopy(LAYOUT)
    title_only["nodes"]["5"]["pos"] = [60, bottom + 10]
    assert any("nodes 1 " in p and " 5 " in p for p in gen.overlaps(ui_for(title_only)))
    clear = copy.deepcopy(title_only)
    clear["nodes"]["5"]["pos"] = [60, bottom + TITLE + 5]
    clear["notes"][0]["pos"] = [1600, 140]
    clear["groups"] = []
    assert gen.overlaps(ui_for(clear)) == []


def test_overlapping_groups_and_straddled_borders_are_reported():
    close = copy.deepcopy(LAYOUT)
    close["nodes"]["5"]["pos"] = [390, 140]  # clear of node 1, but the groups' paddings overlap
    problems = gen.check_ui(ui_for(close), API, SNAPSHOT)
    assert any("groups 'Load' and 'Sample' overlap" in p for p in problems), problems
    straddle = copy.deepcopy(LAYOUT)
    straddle["nodes"]["7"]["pos"] = [600, 400]  # partly inside 'Sample', not a member
    problems = gen.overlaps(ui_for(straddle))
    assert any("node 7 (SaveImage) straddles the border of group 'Sample'" in p for p in problems), problems


def test_image_previews_get_room_and_no_node_shrinks_below_its_widgets():
    nodes = by_id(ui_for({}))
    assert nodes[7]["size"] == [400, 460]  # SaveImage
    estimate = nodes[5]["size"][1]  # KSampler, automatic size
    small = {"nodes": {"5": {"size": [300, 50]}, "7": {"size": [250, 300]}}}
    nodes = by_id(ui_for(small))
    assert nodes[5]["size"] == [300, estimate]
    assert nodes[7]["size"] == [250, 300]


def test_check_ui_lets_only_notes_be_ui_only():
    ui = ui_for(LAYOUT)
    assert gen.check_ui(ui, API, SNAPSHOT) == []
    stray = copy.deepcopy(ui)
    stray["nodes"].append(dict(copy.deepcopy(by_id(ui)[50]), id=60, type="KSampler", pos=[2000, 2000]))
    stray["last_node_id"] = 60
    assert any("node ids differ from the API file" in p for p in gen.check_ui(stray, API, SNAPSHOT))


@pytest.mark.parametrize("name", sorted(API_WORKFLOWS))
def test_shipped_workflows_generate_without_overlaps(name):
    api = API_WORKFLOWS[name]
    for layout in (None, {}):  # its sidecar (if any), and the automatic layout
        ui = gen.api_to_ui(api, SNAPSHOT, name, layout)
        assert gen.check_ui(ui, api, SNAPSHOT) == []
        saves = [n for n in ui["nodes"] if n["type"] in ("SaveImage", "PreviewImage")]
        assert all(n["size"][1] >= 300 for n in saves), [(n["id"], n["size"]) for n in saves]


def test_every_sidecar_belongs_to_an_api_workflow():
    sidecars = {p.stem for p in (WORKFLOWS / "layout").glob("*.json")}
    assert sidecars <= set(API_WORKFLOWS), sorted(sidecars - set(API_WORKFLOWS))


def test_check_mode_of_the_script(capsys):
    assert gen.main(["--check"]) == 0, capsys.readouterr().out
