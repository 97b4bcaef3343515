"""GGUF-quantised base weights (what city96's ComfyUI-GGUF loads): logical shapes and real values.

ComfyUI-GGUF keeps each quantised weight as a torch.Tensor subclass whose storage holds the raw GGML blocks
(uint8, e.g. [out, 34 * in / 32] for Q8_0) and whose `tensor_type` / `tensor_shape` attributes name the format
and the logical shape. Reading such storage as numbers gives garbage, and its storage shape is not the layer's
shape. Values come from the `gguf` package (llama.cpp's reference reader, which ComfyUI-GGUF itself requires);
when it is missing or does not know the format, the error says so and what to load instead.
"""

from __future__ import annotations

import math

import torch

from .errors import WeightError

# GGML types whose storage already holds the values (ComfyUI-GGUF keeps these as ordinary float tensors).
_PLAIN_TYPES = {"F32", "F16"}


def is_gguf_tensor(weight: object) -> bool:
    return isinstance(weight, torch.Tensor) and hasattr(weight, "tensor_type") and hasattr(weight, "tensor_shape")


def logical_shape(weight: torch.Tensor) -> tuple[int, ...]:
    """The layer's shape: `tensor_shape` for GGUF tensors, else the tensor's own."""
    shape = getattr(weight, "tensor_shape", None) if is_gguf_tensor(weight) else None
    return tuple(int(s) for s in (shape if shape is not None else weight.shape))


def _type_name(qtype: object) -> str:
    return getattr(qtype, "name", None) or str(qtype)


def dequantize(weight: torch.Tensor, key: str) -> torch.Tensor:
    """The real float32 values of a GGUF tensor, in its logical shape, on its device."""
    shape = logical_shape(weight)
    raw = weight.as_subclass(torch.Tensor)
    qtype = weight.tensor_type
    name = _type_name(qtype)
    if qtype is None or name in _PLAIN_TYPES:
        return raw.float().reshape(shape)
    fix = ("or load this model's .safetensors file (fp16, bf16 or fp8) with Load Diffusion Model for LoFA Predict "
           "LoRA (the GGUF model can still do the sampling).")
    try:
        from gguf import quants
    except ImportError as err:
        raise WeightError(f"The base weight '{key}' is GGUF-quantised ({name}, from ComfyUI-GGUF) and the Python "
                          f"package 'gguf' that decodes it is not installed. Install it (pip install gguf) "
                          f"{fix}") from err
    try:
        values = quants.dequantize(raw.detach().cpu().numpy(), qtype)
    except (NotImplementedError, ValueError, KeyError, TypeError, quants.QuantError) as err:
        raise WeightError(f"The base weight '{key}' is GGUF-quantised as {name}, which the installed 'gguf' package "
                          f"cannot decode ({err}). Update it (pip install -U gguf) {fix}") from err
    if values.size != math.prod(shape):
        raise WeightError(f"The base weight '{key}' ({name}) decodes to {values.size} values, but its shape "
                          f"{list(shape)} needs {math.prod(shape)}; the GGUF file is damaged.")
    return torch.from_numpy(values.astype("float32", copy=False)).reshape(shape).to(raw.device)
