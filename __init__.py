"""ComfyUI entry point of the Concept Sliders pack: it registers the nodes and does nothing else.

Importing it outside ComfyUI must not fail, so the node modules import ComfyUI lazily.
"""

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # imported as a plain module (pytest treats the repo root as a package): nothing to register
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
