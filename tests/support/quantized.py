"""Tiny base models stored the way users' quantised downloads are: fp8_scaled safetensors and GGUF.

* `fp8_scaled`: the key layout of ComfyUI's scaled-fp8 checkpoints (what most WAN 14B / 2.2 users download):
  float8_e4m3fn weights, a per-layer `scale_weight` and a `scaled_fp8` marker. Current ComfyUI's stock loader
  turns these layers into QuantizedTensor weights.
* `quantize_linear_gguf_`: a layer as city96's ComfyUI-GGUF holds it after loading a .gguf file: the parameter is
  a torch.Tensor subclass whose storage is the raw GGML blocks (encoded by the `gguf` package, llama.cpp's
  reference), with `tensor_type` / `tensor_shape`, a `shape` that reports the logical shape, and a state-dict
  entry that is only a storage-shaped placeholder. ComfyUI-GGUF itself cannot be installed here (GitHub only),
  so this reproduces exactly that layout and nothing else.
"""

from __future__ import annotations

import types

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def fp8_scaled(state_dict: dict[str, torch.Tensor], layers: list[str]) -> dict[str, torch.Tensor]:
    """A copy of `state_dict` with the 2-D `<layer>.weight`s stored as scaled fp8 (per-tensor scale)."""
    out = dict(state_dict)
    for layer in layers:
        weight = state_dict[f"{layer}.weight"].float()
        scale = weight.abs().max() / FP8_MAX
        out[f"{layer}.weight"] = (weight / scale).to(FP8)
        out[f"{layer}.scale_weight"] = scale.reshape(1)
    out["scaled_fp8"] = torch.empty(0, dtype=FP8)
    return out


def dequantised_fp8(state_dict: dict[str, torch.Tensor], layer: str) -> torch.Tensor:
    """What a scaled-fp8 layer stands for: fp8 value times its scale, in float32."""
    return state_dict[f"{layer}.weight"].float() * state_dict[f"{layer}.scale_weight"].float()


class GGMLTensor(torch.Tensor):
    """ComfyUI-GGUF's tensor layout: raw GGML storage plus the format and the logical shape."""

    def __new__(cls, data, *, tensor_type, tensor_shape):
        return super().__new__(cls, data)

    def __init__(self, data, *, tensor_type, tensor_shape):
        super().__init__()
        self.tensor_type = tensor_type
        self.tensor_shape = torch.Size(tensor_shape)

    def detach(self, *args, **kwargs):
        return self

    @property
    def shape(self):
        if not hasattr(self, "tensor_shape"):
            self.tensor_shape = self.size()
        return self.tensor_shape


def _placeholder_state(self, destination, prefix, keep_vars):
    """ComfyUI-GGUF's layers report storage-shaped meta placeholders in their state dict (for memory estimates)."""
    destination[prefix + "weight"] = torch.zeros_like(self.weight.as_subclass(torch.Tensor), device="meta")
    if self.bias is not None:
        destination[prefix + "bias"] = torch.zeros_like(self.bias, device="meta")


def quantize_linear_gguf_(linear: torch.nn.Linear, qtype_name: str = "Q8_0") -> torch.Tensor:
    """Store `linear.weight` GGUF-quantised in place; returns the values the encoded blocks stand for."""
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[qtype_name]
    weight = linear.weight.detach().float()
    blocks = quants.quantize(weight.numpy(), qtype)
    decoded = torch.from_numpy(quants.dequantize(blocks, qtype)).reshape(weight.shape)
    raw = GGMLTensor(torch.from_numpy(blocks), tensor_type=qtype, tensor_shape=weight.shape)
    linear.weight = torch.nn.Parameter(raw, requires_grad=False)
    linear._save_to_state_dict = types.MethodType(_placeholder_state, linear)
    return decoded
