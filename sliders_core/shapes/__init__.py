"""Shapes world: synthetic one-shape images with captions, and exact pixel measurements."""
from .data import (
    COLOR_HUE,
    COLOR_RGB,
    COLORS,
    PAIR_CONCEPTS,
    SHAPES,
    SIZE_AREA,
    SIZES,
    ShapeSpec,
    caption,
    caption_attributes,
    caption_vocabulary,
    concept_pair_specs,
    make_dataset,
    random_spec,
    random_specs,
    render,
    render_batch,
    render_concept_pairs,
)
from .metrics import Measurement, attribute_accuracy, foreground_masks, measure, measure_batch

__all__ = [
    "COLOR_HUE", "COLOR_RGB", "COLORS", "PAIR_CONCEPTS", "SHAPES", "SIZE_AREA", "SIZES", "ShapeSpec",
    "caption", "caption_attributes", "caption_vocabulary", "concept_pair_specs", "make_dataset", "random_spec",
    "random_specs", "render", "render_batch", "render_concept_pairs",
    "Measurement", "attribute_accuracy", "foreground_masks", "measure", "measure_batch",
]
