"""ComfyUI helpers shared by the tests: node instances, stock nodes, the tiny WAN loaded as a user would."""

from __future__ import annotations

import asyncio
import inspect

import pytest

from support import tiny_wan
from training import tiny_models


def require_native_wan() -> None:
    if not tiny_wan.native_available():
        pytest.skip("this ComfyUI has no WAN model class (the embedded 2024 runtime); it runs on current ComfyUI")


def load_tiny_wan(comfy, sd: dict, folder, name: str):
    """The tiny WAN as a user loads it: current ComfyUI's stock UNETLoader from a file (so its name is known);
    the 2024 runtime has no WAN class, so there a ComfyUI-named view of the same weights."""
    if tiny_wan.native_available():
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / name))
        return comfy.mappings["UNETLoader"]().load_unet(name, "default")[0]
    from lofa_core.families.wan import comfy_to_diffusers_key

    model = tiny_models.build_tiny_wan(0)
    model.load_state_dict({comfy_to_diffusers_key(k): v for k, v in sd.items()})
    return tiny_wan.build_view_patcher(model=model)[0]


def stock_training_node(comfy, name: str):
    """A node class of ComfyUI's comfy_extras/nodes_train.py (LoraModelLoader, TrainLoraNode: 2025+), loaded the
    way ComfyUI loads its extras; skipped where this ComfyUI has none."""
    extra = comfy.root / "comfy_extras" / "nodes_train.py"
    if name not in comfy.mappings and extra.exists():
        loaded = comfy.nodes.load_custom_node(str(extra), module_parent="comfy_extras")
        if inspect.iscoroutine(loaded):
            asyncio.run(loaded)
    if name not in comfy.mappings:
        pytest.skip(f"this ComfyUI has no {name} node (added in 2025)")
    return comfy.mappings[name]


def node(comfy, name: str):
    """An instance of a registered node class."""
    return comfy.mappings[name]()
