"""Error types with messages meant for the person at the keyboard.

Every error raised on bad input says what was wrong and how to fix it. The node layer shows the message
as-is in ComfyUI, so messages are full sentences, not codes.
"""

from __future__ import annotations


class LoFAError(ValueError):
    """Base class: bad input that the user can fix."""


class ModelFamilyError(LoFAError):
    """The base model is not one LoFA knows, or not the one a checkpoint was trained for."""


class CheckpointError(LoFAError):
    """A LoFA checkpoint file is unreadable, incomplete or does not fit the code or the model."""


class ConditionError(LoFAError):
    """The prompt condition is missing or has the wrong shape for the checkpoint."""


class WeightError(LoFAError):
    """Base-model weights cannot be used (NaN/Inf, wrong shape)."""


class LoRAFormatError(LoFAError):
    """A LoRA state dict or file cannot be read or does not match the model."""
