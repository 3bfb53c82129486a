"""ComfyUI nodes: thin adapters over sliders_core (the nodes themselves arrive with the ComfyUI issue)."""

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
