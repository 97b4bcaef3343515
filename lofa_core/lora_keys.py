"""Key styles of LoRA files: how a target's module path becomes the name of its tensors."""

from __future__ import annotations

from .targets import COMFY_PREFIX

STYLE_COMFYUI = "comfyui"  # diffusion_model.<path>.lora_up.weight (ComfyUI LoraSave / TrainLoraNode)
STYLE_KOHYA = "kohya"  # lora_unet_<path_with_underscores>.lora_up.weight (also loads on 2024 ComfyUI)


def lora_base_name(path: str, style: str) -> str:
    """Name of a target's LoRA tensors without the `.lora_up.weight` etc. suffix."""
    if style == STYLE_COMFYUI:
        return COMFY_PREFIX + path
    if style == STYLE_KOHYA:
        return "lora_unet_" + path.replace(".", "_")
    raise ValueError(f"unknown LoRA key style {style!r}; use '{STYLE_COMFYUI}' or '{STYLE_KOHYA}'")
