"""LoFA Apply LoRA: MODEL + LORA_MODEL + strength -> patched MODEL (the input MODEL is never modified)."""

from __future__ import annotations

import math

from ..lofa_core.errors import LoFAError, LoRAFormatError
from ..lofa_core.families import family_of_module_paths
from ..lofa_core.lora_formats import (
    PredictedLoRA,
    check_finite,
    check_lora_shapes,
    read_lora_state_dict,
    to_file_state_dict,
)
from ..lofa_core.lora_keys import STYLE_COMFYUI
from ..lofa_core.targets import COMFY_PREFIX
from .comfy_compat import add_patches_checked, lora_patches, model_weight_shapes

CATEGORY = "LoFA"


class LoFAApplyLoRA:
    DESCRIPTION = "Patches a LORA_MODEL into a clone of the MODEL through ComfyUI's weight patching."
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The MODEL with the LoRA applied (connect to the sampler).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The base model to patch."}),
                "lora": ("LORA_MODEL", {"tooltip": "A LoRA from LoFA Predict LoRA (or any LORA_MODEL)."}),
                "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                             "tooltip": "Multiplier of the LoRA's update (1 = as predicted)."}),
            }
        }

    def apply(self, model, lora, strength_model):
        if not math.isfinite(strength_model):
            raise LoFAError(f"strength_model is {strength_model}; set a finite number such as 1.0 (a NaN or infinite "
                            f"strength turns the model's output black).")
        if strength_model == 0:
            return (model,)
        shapes = {k[len(COMFY_PREFIX):-len(".weight")]: v for k, v in model_weight_shapes(model).items()
                  if k.endswith(".weight") and len(v) == 2}
        factors, leftovers = read_lora_state_dict(lora, shapes, source="the LORA_MODEL")
        if leftovers:
            raise LoRAFormatError(
                f"{len(leftovers)} entries of the LORA_MODEL fit no layer of this MODEL (e.g. {leftovers[:3]}). "
                f"The LoRA was made for a different base model."
            )
        if not factors:
            raise LoRAFormatError("The LORA_MODEL is empty; connect the lora output of LoFA Predict LoRA.")
        check_lora_shapes(factors, shapes, "the LORA_MODEL")
        check_finite(factors, "the LORA_MODEL")
        # The tensors exactly as LoFA Save LoRA writes them (scale folded in, alpha 1), patched the way ComfyUI's
        # loaders patch that file: the model sampled here and one patched by any loader from the saved float32
        # file are the same, bit for bit.
        lora_tensors = to_file_state_dict(PredictedLoRA(family_of_module_paths(factors).name, factors), STYLE_COMFYUI)
        return (add_patches_checked(model, lora_patches(lora_tensors, factors), strength_model),)
