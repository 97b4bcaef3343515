"""Load LoFA Model: a checkpoint from models/lofa -> LOFA_MODEL."""

from __future__ import annotations

import os

import folder_paths

from ..lofa_core.checkpoint import load_checkpoint
from ..lofa_core.errors import CheckpointError
from .comfy_compat import LOFA_FOLDER, LoFAModelHandle, log

CATEGORY = "LoFA"


class LoFAModelLoader:
    DESCRIPTION = ("Loads a LoFA hypernetwork checkpoint (.safetensors) from models/lofa. ComfyUI's model "
                   "management moves it to the GPU only while it predicts.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("LOFA_MODEL",)
    RETURN_NAMES = ("lofa_model",)
    OUTPUT_TOOLTIPS = ("The LoFA hypernetwork, for LoFA Predict LoRA.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lofa_name": (folder_paths.get_filename_list(LOFA_FOLDER),
                              {"tooltip": "A LoFA checkpoint in models/lofa (made by `python -m training` or "
                                          "converted from the authors' release)."}),
                "dtype": (["auto", "float32", "bfloat16", "float16"],
                          {"default": "auto", "tooltip": "Compute precision. auto = bfloat16 on GPUs that run "
                                                         "it well, float32 otherwise."}),
            }
        }

    @classmethod
    def IS_CHANGED(cls, lofa_name, dtype):
        path = folder_paths.get_full_path(LOFA_FOLDER, lofa_name)
        if path is None:
            return lofa_name
        stat = os.stat(path)
        return f"{lofa_name}:{stat.st_size}:{stat.st_mtime_ns}:{dtype}"

    def load(self, lofa_name, dtype):
        path = folder_paths.get_full_path(LOFA_FOLDER, lofa_name)
        if path is None:
            raise CheckpointError(f"LoFA checkpoint '{lofa_name}' was not found in models/lofa. Put the file "
                                  f"there and refresh the node list.")
        checkpoint = load_checkpoint(path)
        if not checkpoint.trained:
            log.warning("LoFA checkpoint '%s' is marked untrained (random weights): its LoRAs are noise.",
                        lofa_name)
        return (LoFAModelHandle.create(checkpoint, dtype, path),)
