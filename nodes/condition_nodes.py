"""LoFA condition nodes: text, image and pose prompts as one LOFA_CONDITION type for LoFA Predict LoRA.

The pack reuses ComfyUI's own encoders: CLIP Text Encode (CONDITIONING), Load CLIP Vision + CLIP Vision Encode
(CLIP_VISION_OUTPUT) and any node that yields an IMAGE batch of pose frames. Which image feature and frame
format a checkpoint needs is checked when it predicts, with a message naming what it expects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..lofa_core.conditioning import IMAGE_FEATURES, KIND_IMAGE, KIND_POSE, KIND_TEXT, Condition, prepare_condition
from ..lofa_core.errors import ConditionError

CATEGORY = "LoFA"


@dataclass
class LoFACondition:
    """The LOFA_CONDITION socket value: a user prompt of one kind, not yet shaped for a checkpoint."""

    kind: str
    tokens: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    image: dict = field(default_factory=dict)
    image_2: dict | None = None  # a second CLIP_VISION_OUTPUT, for checkpoints that mix two image features
    frames: torch.Tensor | None = None

    def prepare(self, spec) -> Condition:
        return prepare_condition(spec, self.kind, tokens=self.tokens, pooled=self.pooled, image=self.image,
                           image_2=self.image_2, frames=self.frames)


def from_conditioning(conditioning) -> LoFACondition:
    if not conditioning:
        raise ConditionError("The CONDITIONING is empty. Connect a CLIP Text Encode node with a prompt.")
    entry = conditioning[0]
    extra = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
    return LoFACondition(KIND_TEXT, tokens=entry[0], pooled=extra.get("pooled_output"))


class _ConditionNode:
    """What every condition node shares: one LOFA_CONDITION output for LoFA Predict LoRA."""

    CATEGORY = CATEGORY
    FUNCTION = "make"
    RETURN_TYPES = ("LOFA_CONDITION",)
    RETURN_NAMES = ("condition",)
    OUTPUT_TOOLTIPS = ("For LoFA Predict LoRA.",)


class LoFATextCondition(_ConditionNode):
    DESCRIPTION = "A text prompt for LoFA, from CLIP Text Encode on the base model's text encoder."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING", {"tooltip": "CLIP Text Encode output (umT5 for WAN, "
                                                                          "CLIP-L+G for SDXL)."})}}

    def make(self, conditioning):
        return (from_conditioning(conditioning),)


class LoFAImageCondition(_ConditionNode):
    DESCRIPTION = ("A style or face image for LoFA, from CLIP Vision Encode (Load CLIP Vision with the model the "
                   "LoFA checkpoint was trained with, e.g. CLIP ViT-L/14).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_vision_output": ("CLIP_VISION_OUTPUT", {
                    "tooltip": "CLIP Vision Encode output of the style or face image."})},
                "optional": {"clip_vision_output_2": ("CLIP_VISION_OUTPUT", {
                    "tooltip": "Only for LoFA checkpoints that mix two image features (DiffLoRA-style): the "
                               "second encoding, e.g. of a face crop or from a second CLIP vision model."})}}

    def make(self, clip_vision_output, clip_vision_output_2=None):
        second = None if clip_vision_output_2 is None else image_features(clip_vision_output_2)
        return (LoFACondition(KIND_IMAGE, image=image_features(clip_vision_output), image_2=second),)


def image_features(clip_vision_output) -> dict[str, torch.Tensor]:
    """The feature tensors of a CLIP_VISION_OUTPUT (an object with attributes, or a dict in older ComfyUI)."""
    image = {}
    for name in IMAGE_FEATURES:
        value = getattr(clip_vision_output, name, None)
        if value is None and isinstance(clip_vision_output, dict):
            value = clip_vision_output.get(name)
        if isinstance(value, torch.Tensor):
            image[name] = value
    if not image:
        raise ConditionError("The CLIP_VISION_OUTPUT has no image features; connect CLIP Vision Encode.")
    return image


class LoFAPoseCondition(_ConditionNode):
    DESCRIPTION = ("A pose sequence for LoFA: rendered 2D pose frames as an IMAGE batch (from a pose estimator node "
                   "or a loaded pose video). Any frame count and size; resampled and letterboxed to what the "
                   "checkpoint takes.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"frames": ("IMAGE", {"tooltip": "Pose frames, [frames, height, width, 3]."})}}

    def make(self, frames):
        return (LoFACondition(KIND_POSE, frames=frames),)
