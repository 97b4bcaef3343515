"""Load LoFA Model: a checkpoint from models/lofa -> LOFA_MODEL.

Also offers the authors' release as downloaded (a `stage2_*.pth` next to its `stage1_*.pth`): it is converted to
this pack's format on first use into `models/lofa/converted/` and the `.pth` files are never modified.
"""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths

from ..lofa_core.checkpoint import load_checkpoint
from ..lofa_core.convert_official import convert_cached, paired_stage1
from ..lofa_core.errors import CheckpointError
from .comfy_compat import LOFA_FOLDER, LoFAModelHandle, log

CATEGORY = "LoFA"
CONVERTED_FOLDER = "converted"


def lofa_choices() -> list[str]:
    names = folder_paths.get_filename_list(LOFA_FOLDER)
    present = set(names)
    return [n for n in names if n.endswith(".safetensors") or (paired_stage1(n) or "") in present]


class LoFAModelLoader:
    DESCRIPTION = ("Loads a LoFA hypernetwork checkpoint from models/lofa. ComfyUI's model management moves it to "
                   "the GPU only while it predicts. The authors' release (stage1_*.pth + stage2_*.pth) is "
                   "converted on first use.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("LOFA_MODEL",)
    RETURN_NAMES = ("lofa_model",)
    OUTPUT_TOOLTIPS = ("The LoFA hypernetwork, for LoFA Predict LoRA.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lofa_name": (lofa_choices(), {
                    "tooltip": "A LoFA checkpoint in models/lofa (.safetensors made by `python -m training` or "
                               "`python -m lofa_core.convert_official`), or the authors' stage2_*.pth whose "
                               "stage1_*.pth sits next to it."}),
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
        if lofa_name.endswith(".pth"):
            path = str(self._converted(lofa_name, path))
        checkpoint = load_checkpoint(path)
        if not checkpoint.trained:
            log.warning("LoFA checkpoint '%s' is marked untrained (random weights): its LoRAs are noise.",
                        lofa_name)
        return (LoFAModelHandle.create(checkpoint, dtype, path),)

    @staticmethod
    def _converted(stage2_name: str, stage2_path: str) -> Path:
        stage1_name = paired_stage1(stage2_name)
        stage1_path = folder_paths.get_full_path(LOFA_FOLDER, stage1_name) if stage1_name else None
        if stage1_path is None:
            raise CheckpointError(f"'{stage2_name}' is not a LoFA release file this node can convert: it needs a "
                                  f"stage2_*.pth with its stage1_*.pth next to it (or convert it with "
                                  f"`python -m lofa_core.convert_official`).")
        cache = Path(stage2_path).parent / CONVERTED_FOLDER
        log.info("LoFA: converting the authors' release %s + %s (once; cached in %s)", stage1_name, stage2_name,
                 cache)
        return convert_cached(stage1_path, stage2_path, cache)
