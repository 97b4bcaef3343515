"""LoFA Save LoRA: LORA_MODEL -> models/loras/<prefix>_0_steps_NNNNN.safetensors (atomic, never overwrites).

The `_0_steps_` is ComfyUI's naming of trained LoRAs (Train LoRA's `existing_lora` reads the step count from it):
a LoFA LoRA had no training steps, and Train LoRA can continue from it.
"""

from __future__ import annotations

import os

import folder_paths
import torch

from ..lofa_core.errors import LoRAFormatError
from ..lofa_core.families import family_of_module_paths
from ..lofa_core.fileio import save_numbered
from ..lofa_core.lora_formats import (
    PredictedLoRA,
    check_finite,
    check_fits_dtype,
    fold_scale,
    read_lora_state_dict,
    to_file_state_dict,
)
from ..lofa_core.lora_keys import STYLE_COMFYUI, STYLE_KOHYA
from ..lofa_core.lora_metadata import file_metadata
from .comfy_compat import log

CATEGORY = "LoFA"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
STEPS_SUFFIX = "_0_steps"


class LoFASaveLoRA:
    DESCRIPTION = ("Saves a LORA_MODEL as a normal LoRA file in models/loras, loadable by ComfyUI's Load LoRA "
                   "nodes. Picks the next free number; never replaces a file.")
    CATEGORY = CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora": ("LORA_MODEL", {"tooltip": "The LoRA to save."}),
                "filename_prefix": ("STRING", {"default": "LoFA/lofa", "tooltip": "Path under models/loras; "
                                               "_0_steps_00001 etc. is appended (ComfyUI's trained-LoRA naming)."}),
                "key_style": (["auto", STYLE_COMFYUI, STYLE_KOHYA], {
                    "default": "auto",
                    "tooltip": "auto: kohya 'lora_unet_' names for SDXL (load on every ComfyUI version and in "
                               "other tools), ComfyUI 'diffusion_model.' names for WAN. comfyui: also what Train "
                               "LoRA's existing_lora reads (needed for SDXL there)."}),
                "dtype": (list(DTYPES), {"default": "float16", "tooltip": "Precision of the saved factors."}),
            }
        }

    def save(self, lora, filename_prefix, key_style, dtype):
        factors, leftovers = read_lora_state_dict(lora, None, source="the LORA_MODEL")
        if leftovers or not factors:
            raise LoRAFormatError(f"The LORA_MODEL has entries this node cannot save (e.g. {leftovers[:3]}); "
                                  f"connect the lora output of LoFA Predict LoRA.")
        check_finite(factors, "the LORA_MODEL")
        check_fits_dtype({p: fold_scale(f) for p, f in factors.items()}, DTYPES[dtype], "the LORA_MODEL",
                         "save it as bfloat16 or float32 (dtype input)")  # the stored factors hold the scale
        family = family_of_module_paths(factors)
        style = key_style if key_style != "auto" else family.lora_key_style
        tensors = to_file_state_dict(PredictedLoRA(family.name, factors), style, DTYPES[dtype])
        prefix = filename_prefix.strip() or "LoFA/lofa"
        rank = next(iter(factors.values())).rank
        metadata = file_metadata(getattr(lora, "metadata", {}), family=family.name, rank=rank, key_style=style,
                                 title=os.path.basename(prefix))
        root = folder_paths.get_folder_paths("loras")[0]
        path = save_numbered(tensors, root, prefix, metadata, label="models/loras", suffix=STEPS_SUFFIX)
        relative = os.path.relpath(path, root)
        log.info("LoFA: saved LoRA to %s", path)
        return {"ui": {"lofa_lora": [relative]}, "result": ()}
