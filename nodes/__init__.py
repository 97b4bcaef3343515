"""ComfyUI nodes of the LoFA pack: the only package that imports comfy / folder_paths."""

from .apply import LoFAApplyLoRA
from .comfy_compat import register_model_folder
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
    "LoFAResponsePreview": LoFAResponsePreview,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoFAModelLoader": "Load LoFA Model",
    "LoFAPredictLoRA": "LoFA Predict LoRA",
    "LoFAApplyLoRA": "LoFA Apply LoRA",
    "LoFASaveLoRA": "LoFA Save LoRA",
    "LoFAResponsePreview": "LoFA Response Map Preview",
}
