"""Shapes world: synthetic one-shape images with captions, and exact pixel measurements."""
from .data import (
    COLOR_HUE,
    COLOR_RGB,
    COLORS,
    SHAPES,
    SIZE_AREA,
    SIZES,
    ShapeSpec,
    caption,
    caption_attributes,
    caption_vocabulary,
    make_dataset,
    random_spec,
    random_specs,
    render,
    render_batch,
)
from .metrics import Measurement, attribute_accuracy, foreground_masks, measure, measure_batch

__all__ = [
    "COLOR_HUE", "COLOR_RGB", "COLORS", "SHAPES", "SIZE_AREA", "SIZES", "ShapeSpec",
    "caption", "caption_attributes", "caption_vocabulary", "make_dataset", "random_spec",
    "random_specs", "render", "render_batch",
    "Measurement", "attribute_accuracy", "foreground_masks", "measure", "measure_batch",
]
