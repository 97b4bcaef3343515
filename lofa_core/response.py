"""Response maps (paper Sec. 3.2): which weights a LoRA changes by more than tau of their magnitude.

R = 1[|dW / W| > tau] with dW = B @ A times the LoRA's own scale, tau = 0.02 by default. The metrics compare a
predicted map (probabilities or binary) with another map.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import DEFAULT_TAU, RATIO_EPS

PREVIEW_SIDE = 64


def response_map(delta: torch.Tensor, weight: torch.Tensor, tau: float = DEFAULT_TAU) -> torch.Tensor:
    """Ground-truth map R = 1[|dW| / (|W| + eps) > tau] as float32 (computed in float32)."""
    if delta.shape != weight.shape:
        raise ValueError(f"delta {list(delta.shape)} and weight {list(weight.shape)} differ in shape")
    ratio = delta.float().abs() / (weight.float().abs() + RATIO_EPS)
    return (ratio > tau).float()


def lora_delta(up: torch.Tensor, down: torch.Tensor, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """dW = scale * up @ down in float32; batched if up/down are 3-D."""
    delta = torch.matmul(up.float(), down.float())
    if isinstance(scale, torch.Tensor) and scale.dim() > 0:
        scale = scale.float().reshape(-1, *([1] * (delta.dim() - 1)))
    return delta * scale


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of flattened maps; batched over a leading dim if both are 3-D. 0 for an all-zero map."""
    a2, b2 = _flat(a), _flat(b)
    dot = (a2 * b2).sum(-1)
    norm = a2.norm(dim=-1) * b2.norm(dim=-1)
    return torch.where(norm > 0, dot / norm.clamp_min(1e-30), torch.zeros_like(dot))


def iou(a: torch.Tensor, b: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Intersection over union of binarised maps (> threshold); 1 when both are empty."""
    a2, b2 = _flat(a) > threshold, _flat(b) > threshold
    inter = (a2 & b2).sum(-1).float()
    union = (a2 | b2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))


def _flat(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x.reshape(x.shape[0], -1) if x.dim() == 3 else x.reshape(-1)


def preview_map(probabilities: torch.Tensor, side: int = PREVIEW_SIDE) -> torch.Tensor:
    """Mean-pool full maps [B, out, in] so the longer side is at most `side` (aspect kept); float16 on CPU."""
    out_f, in_f = probabilities.shape[-2:]
    scale = min(1.0, side / max(out_f, in_f))
    size = (max(1, round(out_f * scale)), max(1, round(in_f * scale)))
    pooled = F.adaptive_avg_pool2d(probabilities.float().unsqueeze(1), size).squeeze(1)
    return pooled.to(torch.float16).cpu()


@dataclass
class ResponseMaps:
    """Stage-I predictions for a set of targets, at preview resolution."""

    keys: list[str]
    depths: list[int]
    type_indices: list[int]
    type_names: Sequence[str]
    num_depths: int
    maps: list[torch.Tensor]  # each [h, w] probabilities in [0, 1]
    active_fraction: list[float]  # share of entries with p > 0.5 at full resolution
    family: str = ""

    def mean_active(self) -> float:
        return float(sum(self.active_fraction) / max(1, len(self.active_fraction)))
