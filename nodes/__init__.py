"""ComfyUI nodes of the LoFA pack: the only package that imports comfy / folder_paths."""

from .apply import LoFAApplyLoRA
from .average import LoFAAverageLoRAs
from .comfy_compat import register_model_folder
from .condition_nodes import LoFAImageCondition, LoFAPoseCondition, LoFATextCondition
from .loader import LoFAModelLoader
from .predict import LoFAPredictLoRA
from .preview import LoFAResponsePreview
from .save import LoFASaveLoRA

register_model_folder()

NODE_CLASS_MAPPINGS = {
    "LoFAModelLoader": LoFAModelLoader,
    "LoFAPredictLoRA": LoFAPredictLoRA,
    "LoFAApplyLoRA": LoFAApplyLoRA,
    "LoFASaveLoRA": LoFASaveLoRA,
    "LoFAAverageLoRAs": LoFAAverageLoRAs,
    "LoFAResponsePreview": LoFAResponsePreview,
    "LoFATextCondition": LoFATextCondition,
    "LoFAImageCondition": LoFAImageCondition,
    "LoFAPoseCondition": LoFAPoseCondition,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoFAModelLoader": "Load LoFA Model",
    "LoFAPredictLoRA": "LoFA Predict LoRA",
    "LoFAApplyLoRA": "LoFA Apply LoRA",
    "LoFASaveLoRA": "LoFA Save LoRA",
    "LoFAAverageLoRAs": "LoFA Average LoRAs",
    "LoFAResponsePreview": "LoFA Response Map Preview",
    "LoFATextCondition": "LoFA Text Condition",
    "LoFAImageCondition": "LoFA Image Condition",
    "LoFAPoseCondition": "LoFA Pose Condition",
}
