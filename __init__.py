"""ComfyUI entry point of the Concept Sliders pack: it registers the nodes and does nothing else.

Importing it outside ComfyUI must not fail, so the node modules import ComfyUI lazily.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
