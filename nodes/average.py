"""LoFA Average LoRAs: several LORA_MODELs -> one whose every update is their mean (an ensemble of LoFA models).

Two LoFA checkpoints trained alike but with other seeds make different errors; the mean of their LoRAs is closer
to the task's LoRA than either (the training suite's model is such a pair). The result is exact, not a
re-compressed approximation: the members' factors side by side, rank = the sum of their ranks.
"""

from __future__ import annotations

from ..lofa_core.errors import LoRAFormatError
from ..lofa_core.families import family_of_module_paths
from ..lofa_core.lora_formats import PredictedLoRA, average_loras, read_lora_state_dict, to_lora_model
from ..lofa_core.lora_metadata import averaged_metadata

CATEGORY = "LoFA"
MAX_MEMBERS = 4


class LoFAAverageLoRAs:
    DESCRIPTION = ("Averages the LoRAs of several LoFA models (e.g. two checkpoints trained with other seeds) into "
                   "one LoRA: each update is the mean of theirs. Connect the result to Apply or Save.")
    CATEGORY = CATEGORY
    FUNCTION = "average"
    RETURN_TYPES = ("LORA_MODEL",)
    RETURN_NAMES = ("lora",)
    OUTPUT_TOOLTIPS = ("The averaged LoRA (rank: the sum of the members' ranks).",)

    @classmethod
    def INPUT_TYPES(cls):
        tip = "A LoRA from LoFA Predict LoRA, for the same base model as lora_1."
        return {
            "required": {
                "lora_1": ("LORA_MODEL", {"tooltip": "A LoRA from LoFA Predict LoRA."}),
                "lora_2": ("LORA_MODEL", {"tooltip": tip}),
            },
            "optional": {f"lora_{i}": ("LORA_MODEL", {"tooltip": tip}) for i in range(3, MAX_MEMBERS + 1)},
        }

    def average(self, lora_1, lora_2, lora_3=None, lora_4=None):
        given = [(f"lora_{i}", lora) for i, lora in enumerate((lora_1, lora_2, lora_3, lora_4), 1) if lora is not None]
        members = []
        for name, lora in given:
            factors, leftovers = read_lora_state_dict(lora, None, source=name)
            if leftovers or not factors:
                raise LoRAFormatError(f"{name} has entries this node cannot read (e.g. {leftovers[:3]}) or none; "
                                      f"connect the lora output of LoFA Predict LoRA.")
            members.append(PredictedLoRA(family_of_module_paths(factors).name, factors))
        mean = average_loras(members)
        metadata = averaged_metadata([dict(getattr(lora, "metadata", {})) for _, lora in given])
        return (to_lora_model(mean, metadata=metadata),)
