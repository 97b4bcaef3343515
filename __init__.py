"""ComfyUI-LoFA: personalised LoRAs in seconds from a prompt, with the LoFA hypernetwork."""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
