#!/usr/bin/env python3
"""Build the UI-format example workflows (`<name>.json`) from the API-format ones (`api/<name>.json`).

The API files are the source of truth: the live ComfyUI tests run them. The UI files, which the
ComfyUI frontend opens (Workflow → Open, or the pack's templates), are generated from them plus a
snapshot of the node schemas (`tests/comfy_object_info.json`, the relevant part of ComfyUI's
`/object_info`), so the two never drift apart. Standard library only; ComfyUI is not needed.

    python workflows/make_ui_workflows.py                      # rewrite workflows/*.json
    python workflows/make_ui_workflows.py --check              # exit 1 if a UI file is out of date
    python workflows/make_ui_workflows.py --object-info http://127.0.0.1:8188/object_info
        # refresh the snapshot from a running ComfyUI (or from a saved /object_info JSON file)

UI format (litegraph, "version": 0.4), as the frontend saves it in its compact form:
- nodes: id, type, pos, size, flags, order, mode, inputs (the sockets only: {name, type, link}),
  outputs ({name, type, links, slot_index}), properties, widgets_values;
- widgets_values: one value per widget input in the node's input order (required, then optional),
  and after every INT named `seed`/`noise_seed` (or with `control_after_generate`) the value of its
  "control after generate" combo, which the frontend inserts there (we ship "fixed");
- links: [id, from_node, from_slot, to_node, to_slot, type], to_slot indexing the node's inputs list;
- groups: {id, title, bounding: [x, y, w, h], color, font_size, flags}. A node's pos is the top-left
  of its body; its title bar (TITLE_HEIGHT) is drawn above pos[1].

Layout sidecar `layout/<name>.json` (optional; every key optional):

    {"nodes":  {"4": {"pos": [x, y], "size": [w, h]}},        # API node id → pos and/or size
     "notes":  [{"id": 100, "text": "...", "pos": [x, y],     # id, text, pos required
                 "title": "Read me", "size": [w, h]}],
     "groups": [{"title": "1. Train", "nodes": [4, 5, 100], "color": "#3f789e"}]}

- nodes without a pos are laid out automatically (one column per graph depth, ordered to limit
  crossing wires, clear of the nodes the sidecar places); without any sidecar every node is;
- a size's height never goes below the node's estimated height (widgets must fit); image previews
  (SaveImage, PreviewImage) default to PREVIEW_SIZE;
- notes become stock frontend Note nodes; their ids must differ from the API node ids;
- a group's bounding is computed: its member nodes' boxes (title bars included) plus GROUP_PADDING,
  and GROUP_TITLE_HEIGHT on top for the group's title. Members may be notes.
`check_ui` reports overlapping nodes, overlapping groups and nodes across a group's border (see
`overlaps`); the script prints them but still writes the file, to look at the result in the frontend.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
import uuid
from itertools import combinations
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SNAPSHOT = REPO / "tests" / "comfy_object_info.json"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# combos whose options depend on the user's files (models, input folders): values are not checked against them
FILE_COMBOS = {"ckpt_name", "lora_name", "slider_name", "resume_from", "vae_name", "unet_name", "clip_name", "clip_name1",
               "clip_name2", "clip_name3", "folder", "image", "name"}
MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pt2", ".pth", ".bin", ".pkl", ".sft")
SEED_CONTROL_VALUE = "fixed"
UI_VERSION = 0.4
LAYOUTS = HERE / "layout"
NODE_WIDTH_DEFAULT = 320
NODE_WIDTH = {"ConceptSlidersTrainText": 400, "ConceptSlidersTrainPairs": 400, "ConceptSlidersSweep": 340,
              "ConceptSlidersDelayedSampler": 340, "ConceptSlidersNullTextInvert": 360}
PREVIEW_SIZE = {"SaveImage": [400, 460], "PreviewImage": [400, 460]}  # room for the image itself
NOTE_SIZE = [400, 200]
NOTE_COLORS = {"color": "#432", "bgcolor": "#653"}  # the frontend's look for notes
GROUP_COLOR = "#3f789e"
GROUP_FONT_SIZE = 24
GROUP_PADDING = 20
GROUP_TITLE_HEIGHT = 40
TITLE_HEIGHT = 30  # node title bar, above pos[1]
MARGIN = 40  # top-left of the auto layout
COLUMN_GAP = 80
ROW_GAP = 50  # body bottom → next body top (the title bar takes 30 of it)
OVERLAP_TOLERANCE = 4  # px two boxes may share before they count as overlapping
CLEARANCE = 20  # px the auto layout keeps between a node and what the sidecar placed


# ------------------------------------------------------------------------------------------------
# Node schema snapshot
# ------------------------------------------------------------------------------------------------

def normalise_input(name: str, section: str, spec) -> dict:
    """One /object_info input → {name, section, type, widget, control_after_generate, default?, options?}."""
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    entry: dict = {"name": name, "section": section}
    combo_values = None
    if isinstance(kind, list):
        entry["type"], combo_values = "COMBO", kind
    elif kind == "COMBO":
        entry["type"], combo_values = "COMBO", options.get("options", [])
    else:
        entry["type"] = str(kind)
    entry["widget"] = entry["type"] in WIDGET_TYPES and not options.get("forceInput", False)
    entry["control_after_generate"] = bool(
        entry["widget"] and entry["type"] == "INT"
        and options.get("control_after_generate", name in ("seed", "noise_seed")))
    if "default" in options and section == "optional":  # fills optional widgets an API file leaves out
        entry["default"] = options["default"]
    for key in ("min", "max", "multiline"):
        if key in options:
            entry[key] = options[key]
    if combo_values is not None:
        files = name in FILE_COMBOS or any(str(v).lower().endswith(MODEL_EXTENSIONS) for v in combo_values)
        entry["options"] = None if files or not combo_values else list(combo_values)
    return entry


def normalise_node(info: dict) -> dict:
    module = info.get("python_module", "")
    if module.startswith("custom_nodes."):  # "custom_nodes.<folder>" depends on the install folder
        module = "custom_nodes"
    order = info.get("input_order") or {s: list(info.get("input", {}).get(s, {})) for s in ("required", "optional")}
    inputs = []
    for section in ("required", "optional"):
        specs = info.get("input", {}).get(section, {}) or {}
        for name in order.get(section, []) or []:
            inputs.append(normalise_input(name, section, specs[name]))
    return {
        "display_name": info.get("display_name") or info.get("name"),
        "category": info.get("category", ""),
        "python_module": module,
        "output_node": bool(info.get("output_node", False)),
        "inputs": inputs,
        "output": list(info.get("output", [])),
        "output_name": list(info.get("output_name", info.get("output", []))),
    }


def normalise_object_info(object_info: dict, types) -> dict:
    missing = sorted(set(types) - set(object_info))
    if missing:
        raise KeyError(f"/object_info has no node type(s) {missing}")
    return {t: normalise_node(object_info[t]) for t in sorted(types)}


def load_snapshot(path: Path = SNAPSHOT) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------------
# API → UI
# ------------------------------------------------------------------------------------------------

def api_workflows(folder: Path = HERE) -> dict[str, dict]:
    """name → API graph for every `api/<name>.json` in folder (sorted by name). The API files live in a
    subfolder because ComfyUI lists every JSON file at the top of the folder as a UI template."""
    out = {}
    for path in sorted((folder / "api").glob("*.json")):
        out[path.stem] = json.loads(path.read_text(encoding="utf-8"))
    return out


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def expected_widgets_values(class_type: str, api_inputs: dict, schema: dict) -> list:
    """widgets_values for one node, in the frontend's order (control values after seeds)."""
    values = []
    for spec in schema["inputs"]:
        if not spec["widget"]:
            continue
        name = spec["name"]
        if name in api_inputs:
            value = api_inputs[name]
            if is_link(value):
                raise ValueError(f"{class_type}.{name}: widget inputs fed by links are not supported here")
        elif spec["section"] == "optional" and "default" in spec:
            value = spec["default"]
        else:
            raise ValueError(f"{class_type}: the API file gives no value for widget input {name!r}")
        values.append(value)
        if spec["control_after_generate"]:
            values.append(SEED_CONTROL_VALUE)
    return values


def _check_api(api: dict, snapshot: dict) -> None:
    for node_id, node in api.items():
        if not node_id.isdigit():
            raise ValueError(f"node id {node_id!r}: use numeric ids (the UI format needs integers)")
        class_type = node["class_type"]
        if class_type not in snapshot:
            raise KeyError(f"node {node_id}: type {class_type} is not in the snapshot {SNAPSHOT.name}; refresh it")
        known = {s["name"] for s in snapshot[class_type]["inputs"]}
        unknown = set(node["inputs"]) - known
        if unknown:
            raise ValueError(f"node {node_id} ({class_type}): unknown inputs {sorted(unknown)}")
        for name, value in node["inputs"].items():
            if is_link(value) and value[0] not in api:
                raise ValueError(f"node {node_id}.{name} links to missing node {value[0]}")


def _depths(api: dict) -> dict[str, int]:
    depth: dict[str, int] = {}

    def visit(node_id: str, stack: tuple = ()) -> int:
        if node_id in stack:
            raise ValueError(f"cycle through node {node_id}")
        if node_id not in depth:
            parents = [v[0] for v in api[node_id]["inputs"].values() if is_link(v)]
            depth[node_id] = 1 + max((visit(p, stack + (node_id,)) for p in parents), default=-1)
        return depth[node_id]

    for node_id in api:
        visit(node_id)
    return depth


def _node_height(schema: dict, n_sockets: int, n_outputs: int) -> int:
    widgets = [s for s in schema["inputs"] if s["widget"]]
    rows = len(widgets) + sum(s["control_after_generate"] for s in widgets)
    multiline = sum(1 for s in widgets if s.get("multiline"))
    return 36 + 22 * max(n_sockets, n_outputs, 1) + 24 * rows + 60 * multiline


def api_to_ui(api: dict, snapshot: dict, name: str, layout: dict | None = None) -> dict:
    """The UI workflow for one API graph. layout: the sidecar's content; None reads `layout/<name>.json`
    (no file: automatic layout), {} forces the automatic layout."""
    _check_api(api, snapshot)
    layout = load_layout(name) if layout is None else layout
    _check_layout(layout, api)
    placed = layout.get("nodes", {})
    ids = sorted(api, key=int)
    depth = _depths(api)
    order = sorted(ids, key=lambda i: (depth[i], int(i)))

    nodes, links = {}, []
    for node_id in ids:
        node = api[node_id]
        class_type, schema = node["class_type"], snapshot[node["class_type"]]
        sockets = [s for s in schema["inputs"] if not s["widget"]]
        estimate = _node_height(schema, len(sockets), len(schema["output"]))
        width, height = placed.get(node_id, {}).get("size") or PREVIEW_SIZE.get(class_type) or (
            NODE_WIDTH.get(class_type, NODE_WIDTH_DEFAULT), estimate)
        ui = {
            "id": int(node_id),
            "type": class_type,
            "pos": [0, 0],
            "size": [width, max(height, estimate)],  # never too small for its widgets
            "flags": {},
            "order": order.index(node_id),
            "mode": 0,
            "inputs": [{"name": s["name"], "type": s["type"], "link": None} for s in sockets],
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": i}
                        for i, (n, t) in enumerate(zip(schema["output_name"], schema["output"]))],
            "properties": {"Node name for S&R": class_type},
            "widgets_values": expected_widgets_values(class_type, node["inputs"], schema),
        }
        title = node.get("_meta", {}).get("title")
        if title and title != schema["display_name"]:
            ui["title"] = title
        nodes[node_id] = ui

    for node_id in ids:  # links in target order: node id, then input order
        node = api[node_id]
        for slot, socket in enumerate(nodes[node_id]["inputs"]):
            value = node["inputs"].get(socket["name"])
            if value is None:
                continue
            if not is_link(value):
                raise ValueError(f"node {node_id}.{socket['name']} is a socket but has the literal {value!r}")
            src, src_slot = value
            outputs = nodes[src]["outputs"]
            if src_slot >= len(outputs):
                raise ValueError(f"node {node_id}.{socket['name']} links to output {src_slot} of node {src}, "
                                 f"which has {len(outputs)} outputs")
            link_type = outputs[src_slot]["type"]
            if socket["type"] not in (link_type, "*"):
                raise ValueError(f"node {node_id}.{socket['name']} ({socket['type']}) is fed a {link_type}")
            link_id = len(links) + 1
            links.append([link_id, int(src), src_slot, int(node_id), slot, link_type])
            socket["link"] = link_id
            outputs[src_slot]["links"].append(link_id)

    notes = [_note_node(note, len(ids) + k) for k, note in enumerate(layout.get("notes", []))]
    fixed = {i: entry["pos"] for i, entry in placed.items() if "pos" in entry}
    obstacles = [node_box(n) for n in notes] + [node_box({"pos": p, "size": nodes[i]["size"]})
                                                 for i, p in fixed.items()]
    positions = auto_layout(api, {i: n["size"] for i, n in nodes.items()}, fixed, obstacles)
    for node_id, node in nodes.items():
        node["pos"] = list(positions[node_id])

    ui_nodes = [nodes[i] for i in ids] + notes
    boxes = {n["id"]: node_box(n) for n in ui_nodes}
    groups = [{"id": k, "title": group["title"],
               "bounding": group_bounding([boxes[m] for m in group["nodes"]]),
               "color": group.get("color", GROUP_COLOR), "font_size": GROUP_FONT_SIZE, "flags": {}}
              for k, group in enumerate(layout.get("groups", []), start=1)]
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-concept-sliders/{name}")),
        "revision": 0,
        "last_node_id": max(n["id"] for n in ui_nodes),
        "last_link_id": len(links),
        "nodes": ui_nodes,
        "links": links,
        "groups": groups,
        "config": {},
        "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}},
        "version": UI_VERSION,
    }


def dumps(ui: dict) -> str:
    return json.dumps(ui, indent=2, ensure_ascii=False) + "\n"


# ------------------------------------------------------------------------------------------------
# Layout: sidecar, boxes, automatic placement
# ------------------------------------------------------------------------------------------------

def load_layout(name: str, folder: Path = LAYOUTS) -> dict:
    """The layout sidecar `<folder>/<name>.json`, or {} when there is none."""
    path = Path(folder) / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _pair(value, what: str) -> list:
    if not (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"layout: {what} must be two numbers, got {value!r}")
    return list(value)


def _check_keys(entry, allowed: set, required: set, what: str) -> None:
    if not isinstance(entry, dict):
        raise ValueError(f"layout: {what} must be an object, got {entry!r}")
    unknown, missing = set(entry) - allowed, required - set(entry)
    if unknown or missing:
        raise ValueError(f"layout: {what}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")


def _check_layout(layout: dict, api: dict) -> None:
    """Refuse a sidecar that names unknown nodes, reuses an API node id for a note, or has typos in keys."""
    _check_keys(layout, {"nodes", "notes", "groups"}, set(), "the sidecar")
    for key, kind in (("nodes", dict), ("notes", list), ("groups", list)):
        if not isinstance(layout.get(key, kind()), kind):
            raise ValueError(f"layout: {key!r} must be a {kind.__name__}")
    for node_id, entry in layout.get("nodes", {}).items():
        if node_id not in api:
            raise ValueError(f"layout: node {node_id} is not in the API file")
        _check_keys(entry, {"pos", "size"}, set(), f"node {node_id}")
        for key in entry:
            _pair(entry[key], f"node {node_id} {key}")
    note_ids: set[int] = set()
    for k, note in enumerate(layout.get("notes", [])):
        _check_keys(note, {"id", "text", "pos", "title", "size"}, {"id", "text", "pos"}, f"notes[{k}]")
        note_id = note["id"]
        if not isinstance(note_id, int) or isinstance(note_id, bool) or note_id < 1:
            raise ValueError(f"layout: note id {note_id!r} must be a positive integer")
        if str(note_id) in api:
            free = max(int(i) for i in api) + 1
            raise ValueError(f"layout: note id {note_id} clashes with API node {note_id} "
                             f"({api[str(note_id)]['class_type']}); use an id from {free} up")
        if note_id in note_ids:
            raise ValueError(f"layout: two notes have id {note_id}")
        note_ids.add(note_id)
        _pair(note["pos"], f"note {note_id} pos")
        if "size" in note:
            _pair(note["size"], f"note {note_id} size")
    for k, group in enumerate(layout.get("groups", [])):
        _check_keys(group, {"title", "nodes", "color"}, {"title", "nodes"}, f"groups[{k}]")
        strays = [m for m in group["nodes"] if not isinstance(m, int) or (str(m) not in api and m not in note_ids)]
        if not group["nodes"] or strays:
            raise ValueError(f"layout: group {group['title']!r} needs members that are API nodes or notes "
                             f"(unknown: {strays})")


def node_box(node: dict) -> list:
    """[x, y, w, h] a node covers on the canvas, title bar included."""
    (x, y), (w, h) = node["pos"], node["size"]
    return [x, y - TITLE_HEIGHT, w, h + TITLE_HEIGHT]


def _overlap(a: list, b: list, tolerance: float = OVERLAP_TOLERANCE) -> bool:
    """Do boxes a and b share more than `tolerance` px in both directions (negative: keep that much apart)?"""
    return (min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]) > tolerance
            and min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]) > tolerance)


def _inside(a: list, b: list) -> bool:
    return b[0] <= a[0] and b[1] <= a[1] and a[0] + a[2] <= b[0] + b[2] and a[1] + a[3] <= b[1] + b[3]


def group_bounding(boxes: list[list]) -> list:
    """A group's [x, y, w, h] around its members' boxes, with padding and room for its title on top."""
    left, top = min(b[0] for b in boxes), min(b[1] for b in boxes)
    right, bottom = max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)
    return [left - GROUP_PADDING, top - GROUP_PADDING - GROUP_TITLE_HEIGHT,
            right - left + 2 * GROUP_PADDING, bottom - top + 2 * GROUP_PADDING + GROUP_TITLE_HEIGHT]


def auto_layout(api: dict, sizes: dict[str, list], fixed: dict[str, list], obstacles: list[list]) -> dict[str, list]:
    """pos of every API node: `fixed` ones as given, the others in columns (one per depth), ordered by
    the mean height of their neighbours (fewer crossing wires), moved down to their highest parent's
    height where there is room, and kept clear of the `obstacles` boxes (placed nodes, notes)."""
    parents = {i: [v[0] for v in api[i]["inputs"].values() if is_link(v)] for i in api}
    children: dict[str, list] = {i: [] for i in api}
    for node_id, sources in parents.items():
        for source in sources:
            children[source].append(node_id)
    depth = _depths(api)
    # a node's column is its depth; a source (loader, prompt) moves right to just before its first
    # consumer, so that it sits next to what it feeds instead of far left with a long wire
    column = {i: depth[i] if parents[i] else min((depth[c] for c in children[i]), default=1) - 1 for i in api}
    free = sorted((i for i in api if i not in fixed), key=int)
    n_columns = max((column[i] + 1 for i in free), default=0)
    columns = [[i for i in free if column[i] == c] for c in range(n_columns)]
    xs = [MARGIN]
    for col in columns[:-1]:  # a column the sidecar emptied keeps its room: later columns stay apart
        xs.append(xs[-1] + max((sizes[i][0] for i in col), default=NODE_WIDTH_DEFAULT) + COLUMN_GAP)
    pos = {i: list(p) for i, p in fixed.items()}

    def mean_centre(node_id: str, neighbours: dict) -> float:
        ys = [pos[m][1] + sizes[m][1] / 2 for m in neighbours[node_id]] or [pos[node_id][1] + sizes[node_id][1] / 2]
        return sum(ys) / len(ys)

    def stack(c: int, align: bool) -> None:
        y = MARGIN
        for node_id in columns[c]:
            if align and parents[node_id]:  # not above its highest parent: chains form rows
                y = max(y, min(pos[p][1] for p in parents[node_id]))
            box = [xs[c], y - TITLE_HEIGHT, sizes[node_id][0], sizes[node_id][1] + TITLE_HEIGHT]
            hit = next((o for o in obstacles if _overlap(box, o, -CLEARANCE)), None)
            while hit:  # below the obstacle, then look again
                box[1] = hit[1] + hit[3] + CLEARANCE
                hit = next((o for o in obstacles if _overlap(box, o, -CLEARANCE)), None)
            pos[node_id] = [xs[c], box[1] + TITLE_HEIGHT]
            y = pos[node_id][1] + sizes[node_id][1] + ROW_GAP

    for c in range(n_columns):  # start in id order (the API file's author's order)
        stack(c, align=False)
    for sweep in range(4):  # barycentre sweeps, alternately by parents (left to right) and by children
        neighbours, order = (parents, range(n_columns)) if sweep % 2 == 0 else (children, reversed(range(n_columns)))
        for c in order:
            columns[c].sort(key=lambda node_id: mean_centre(node_id, neighbours))
            stack(c, align=False)
    for c in range(n_columns):
        stack(c, align=True)
    return pos


def _note_node(note: dict, order: int) -> dict:
    node = {"id": note["id"], "type": "Note", "pos": list(note["pos"]), "size": list(note.get("size", NOTE_SIZE)),
            "flags": {}, "order": order, "mode": 0, "inputs": [], "outputs": [],
            "properties": {"text": ""}, "widgets_values": [note["text"]], **NOTE_COLORS}
    if "title" in note:
        node["title"] = note["title"]
    return node


# ------------------------------------------------------------------------------------------------
# Consistency check (used by the tests)
# ------------------------------------------------------------------------------------------------

def _label(node: dict) -> str:
    return f"{node['id']} ({node.get('title') or node['type']})"


def overlaps(ui: dict) -> list[str]:
    """Layout problems: node boxes (title bars included) that overlap, groups that overlap, and nodes
    that straddle a group's border (the frontend moves a node with a group only when it lies inside)."""
    nodes, groups = ui.get("nodes", []), ui.get("groups", [])
    problems = [f"nodes {_label(a)} and {_label(b)} overlap"
                for a, b in combinations(nodes, 2) if _overlap(node_box(a), node_box(b))]
    problems += [f"groups {a['title']!r} and {b['title']!r} overlap"
                 for a, b in combinations(groups, 2) if _overlap(a["bounding"], b["bounding"])]
    problems += [f"node {_label(n)} straddles the border of group {g['title']!r}"
                 for g in groups for n in nodes
                 if _overlap(node_box(n), g["bounding"]) and not _inside(node_box(n), g["bounding"])]
    return problems


def check_ui(ui: dict, api: dict, snapshot: dict) -> list[str]:
    """Problems of one UI workflow: internal link consistency, agreement with its API file, overlaps."""
    errors: list[str] = []
    if ui.get("version") != UI_VERSION:
        errors.append(f"version is {ui.get('version')!r}, expected {UI_VERSION}")
    nodes = {}
    for node in ui.get("nodes", []):
        if node["id"] in nodes:
            errors.append(f"duplicate node id {node['id']}")
        nodes[node["id"]] = node
        for key in ("type", "pos", "size", "inputs", "outputs", "widgets_values", "mode", "order"):
            if key not in node:
                errors.append(f"node {node['id']} has no {key!r}")
    links = {}
    for link in ui.get("links", []):
        if len(link) != 6:
            errors.append(f"link {link} does not have 6 fields")
            continue
        if link[0] in links:
            errors.append(f"duplicate link id {link[0]}")
        links[link[0]] = link
    if nodes and ui.get("last_node_id", -1) < max(nodes):
        errors.append("last_node_id is below the largest node id")
    if links and ui.get("last_link_id", -1) < max(links):
        errors.append("last_link_id is below the largest link id")

    for link_id, (_, src, src_slot, dst, dst_slot, link_type) in links.items():
        if src not in nodes or dst not in nodes:
            errors.append(f"link {link_id} joins missing node(s) {src}->{dst}")
            continue
        outs, ins = nodes[src]["outputs"], nodes[dst]["inputs"]
        if src_slot >= len(outs) or link_id not in (outs[src_slot].get("links") or []):
            errors.append(f"link {link_id}: output {src_slot} of node {src} does not list it")
        elif outs[src_slot]["type"] != link_type:
            errors.append(f"link {link_id}: type {link_type} but output is {outs[src_slot]['type']}")
        if dst_slot >= len(ins) or ins[dst_slot].get("link") != link_id:
            errors.append(f"link {link_id}: input {dst_slot} of node {dst} does not point back to it")
        elif ins[dst_slot]["type"] not in (link_type, "*"):
            errors.append(f"link {link_id}: type {link_type} into input of type {ins[dst_slot]['type']}")
    for node_id, node in nodes.items():
        for i, inp in enumerate(node["inputs"]):
            if inp.get("link") is not None and inp["link"] not in links:
                errors.append(f"node {node_id} input {i} ({inp['name']}) points to missing link {inp['link']}")
        for out in node["outputs"]:
            for link_id in out.get("links") or []:
                if link_id not in links:
                    errors.append(f"node {node_id} output {out['name']} lists missing link {link_id}")

    # agreement with the API file; only notes may be UI-only
    api_ids = {int(i) for i in api}
    extra = sorted(i for i in set(nodes) - api_ids if nodes[i]["type"] != "Note")
    if api_ids - set(nodes) or extra:
        errors.append(f"node ids differ from the API file: UI {sorted(nodes)} vs API {sorted(api_ids)}")
    for node_id in set(nodes) - api_ids:
        if nodes[node_id]["type"] == "Note" and (nodes[node_id]["inputs"] or nodes[node_id]["outputs"]):
            errors.append(f"note {node_id} has inputs or outputs")
    for node_id_str, api_node in api.items():
        node = nodes.get(int(node_id_str))
        if node is None:
            continue
        class_type = api_node["class_type"]
        if node["type"] != class_type:
            errors.append(f"node {node_id_str}: type {node['type']} vs API {class_type}")
            continue
        schema = snapshot.get(class_type)
        if schema is None:
            errors.append(f"node {node_id_str}: {class_type} is not in the snapshot")
            continue
        try:
            want = expected_widgets_values(class_type, api_node["inputs"], schema)
        except ValueError as exc:
            errors.append(f"node {node_id_str}: {exc}")
            continue
        if node["widgets_values"] != want:
            errors.append(f"node {node_id_str} ({class_type}): widgets_values {node['widgets_values']} "
                          f"do not match the API file ({want})")
        for name, value in api_node["inputs"].items():
            if not is_link(value):
                continue
            slot = next((i for i, s in enumerate(node["inputs"]) if s["name"] == name), None)
            link = links.get(node["inputs"][slot]["link"]) if slot is not None else None
            if link is None or (link[1], link[2]) != (int(value[0]), value[1]):
                errors.append(f"node {node_id_str}.{name}: API links {value}, UI has {link}")
        for inp in node["inputs"]:
            if inp.get("link") is not None and inp["name"] not in api_node["inputs"]:
                errors.append(f"node {node_id_str}.{inp['name']} is linked in the UI but not in the API file")
    return errors + overlaps(ui)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def _read_object_info(source: str) -> dict:
    if source.startswith(("http://", "https://")):
        with urllib.request.urlopen(source, timeout=30) as response:
            return json.loads(response.read().decode("utf-8"))
    return json.loads(Path(source).read_text(encoding="utf-8"))


def used_types(workflows: dict[str, dict]) -> set[str]:
    return {node["class_type"] for wf in workflows.values() for node in wf.values()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that the UI files are up to date")
    parser.add_argument("--object-info", metavar="URL_OR_FILE",
                        help="refresh tests/comfy_object_info.json from a ComfyUI /object_info first")
    args = parser.parse_args(argv)

    workflows = api_workflows()
    if args.object_info:
        snapshot = normalise_object_info(_read_object_info(args.object_info), used_types(workflows))
        SNAPSHOT.write_text(json.dumps(snapshot, indent=1, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
        print(f"wrote {SNAPSHOT.relative_to(REPO)} ({len(snapshot)} node types)")
    snapshot = load_snapshot()
    stale = []
    problems = [f"layout/{p.name}: there is no api/{p.name}" for p in sorted(LAYOUTS.glob("*.json"))
                if p.stem not in workflows]
    for name, api in workflows.items():
        ui = api_to_ui(api, snapshot, name)
        problems += [f"{name}: {problem}" for problem in check_ui(ui, api, snapshot)]
        text = dumps(ui)
        path = HERE / f"{name}.json"
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(path.name)
        if not args.check:  # written even with layout problems, to look at them in the frontend
            path.write_text(text, encoding="utf-8")
            print(f"wrote workflows/{path.name}")
    for problem in problems:
        print(problem)
    if args.check and stale:
        print("out of date (run python workflows/make_ui_workflows.py): " + ", ".join(stale))
    return 1 if problems or (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
