"""Concept Sliders core: train, save, load, apply and compose LoRA sliders. Never imports ComfyUI."""

__version__ = "0.1.0"
