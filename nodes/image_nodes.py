"""Load Image Pairs: a pairs folder under ComfyUI's input directory → two IMAGE batches, their strengths and
captions."""

from __future__ import annotations

from pathlib import Path

from ..sliders_core.errors import SliderError
from ..sliders_core.image_pairs import load_pair_folder, pair_folders
from .common import CATEGORY


def _input_dir() -> Path:
    import folder_paths

    return Path(folder_paths.get_input_directory()).resolve()


def pair_folder_names() -> list[str]:
    """Folders directly under the input directory that hold image pairs in a layout the core reads."""
    names = []
    root = _input_dir()
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        try:
            pair_folders(folder)
        except SliderError:
            continue
        names.append(folder.name)
    return names


class LoadImagePairs:
    DESCRIPTION = ("Loads image pairs from a folder in ComfyUI's input directory: <folder>/A/<name>.png and "
                   "<folder>/B/<name>.png with matching names, optionally one level per strength (<folder>/2/A, "
                   "<folder>/2/B) or the official sliders' signed-scale folders. Every image is resized and "
                   "centre-cropped to `resolution`. A caption <name>.txt beside an A image is that pair's prompt.")
    CATEGORY = f"{CATEGORY}/train"
    RETURN_TYPES = ("IMAGE", "IMAGE", "STRING", "STRING")
    RETURN_NAMES = ("images_a", "images_b", "strengths", "captions")
    OUTPUT_TOOLTIPS = ("A images (less of the concept), in name order.", "B images, in the same order.",
                       "One strength per pair, for Train Pair Slider.",
                       "One caption per line, in the pairs' order (from <name>.txt beside A; empty if the folder has "
                       "none), for Train Pair Slider's prompt.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "folder": (pair_folder_names(), {"tooltip": "A folder under ComfyUI's input directory holding A/ and B/ "
                                             "(refresh the page after adding one)."}),
            "resolution": ("INT", {"default": 512, "min": 8, "max": 2048, "step": 8,
                           "tooltip": "Square size every image is resized and centre-cropped to."}),
        }}

    @classmethod
    def IS_CHANGED(cls, folder, resolution):
        path = cls._path(folder)
        return [(str(f), f.stat().st_mtime_ns) for f in sorted(path.rglob("*")) if f.is_file()]

    @staticmethod
    def _path(folder: str) -> Path:
        root = _input_dir()
        path = (root / folder).resolve()
        if path.parent != root or not folder or "/" in folder or "\\" in folder:
            raise SliderError(f"pairs folder {folder!r} must be a folder directly under the input directory {root}")
        return path

    def load(self, folder, resolution):
        pairs = load_pair_folder(self._path(folder), resolution)
        return (pairs.a, pairs.b, ", ".join(f"{s:g}" for s in pairs.strengths), "\n".join(pairs.prompts or []))
