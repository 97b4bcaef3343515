"""Response maps (paper Sec. 3.2): which weights a LoRA changes by more than tau of their magnitude.

R = 1[|dW / W| > tau] with dW = B @ A times the LoRA's own scale, tau = 0.02 by default. The metrics compare a
predicted map (probabilities or binary) with another map.
"""

from __future__ import annotations

import math
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


@dataclass(frozen=True)
class GridLayout:
    """Where each (depth, type) cell sits in a rendered grid, for labelling."""

    cell: int
    gap: int
    rows_per_panel: int
    panels: int
    num_types: int
    margin_left: int
    margin_top: int

    def cell_origin(self, depth: int, type_index: int) -> tuple[int, int]:
        """(y, x) of a cell's top-left pixel."""
        panel, row = divmod(depth, self.rows_per_panel)
        x = self.margin_left + panel * self.panel_width + type_index * (self.cell + self.gap)
        y = self.margin_top + row * (self.cell + self.gap)
        return y, x

    @property
    def panel_width(self) -> int:
        return self.num_types * (self.cell + self.gap) + 3 * self.cell // 2 + self.margin_left


_MAGMA = torch.tensor([[0.0, 0.0, 0.02], [0.23, 0.06, 0.44], [0.55, 0.16, 0.51], [0.87, 0.29, 0.41],
                       [0.99, 0.62, 0.36], [0.99, 0.99, 0.75]])


def colorize(values: torch.Tensor) -> torch.Tensor:
    """[h, w] in [0, 1] -> [h, w, 3] with a perceptually ordered dark-to-bright colour ramp."""
    v = values.float().clamp(0, 1) * (len(_MAGMA) - 1)
    low = v.floor().long().clamp(max=len(_MAGMA) - 2)
    frac = (v - low).unsqueeze(-1)
    return _MAGMA[low] * (1 - frac) + _MAGMA[low + 1] * frac


def render_grid(maps: ResponseMaps, cell: int = 40, gap: int = 2, max_rows_per_panel: int = 32,
                margin_left: int = 0, margin_top: int = 0) -> tuple[torch.Tensor, GridLayout]:
    """Paper Fig. 2 style grid: rows = depth, columns = type; long models wrap into side-by-side panels.

    Maps keep their aspect ratio (non-square layers look non-square) down to a quarter of a cell.

    Returns an image [H, W, 3] in [0, 1] and its layout. Empty cells (targets not predicted) stay dark grey.
    """
    num_types = len(maps.type_names)
    panels = max(1, math.ceil(maps.num_depths / max_rows_per_panel))
    rows = math.ceil(maps.num_depths / panels)
    layout = GridLayout(cell, gap, rows, panels, num_types, margin_left, margin_top)
    height = margin_top + rows * (cell + gap) + gap
    width = panels * layout.panel_width
    image = torch.full((height, width, 3), 0.12)
    for d in range(maps.num_depths):
        for t in range(num_types):
            y, x = layout.cell_origin(d, t)
            image[y:y + cell, x:x + cell] = 0.2
    for m, depth, type_index in zip(maps.maps, maps.depths, maps.type_indices):
        h, w = m.shape
        scale = cell / max(h, w)
        # keep the aspect, but never thinner than a quarter cell: a 640x2048 map must stay readable
        size = (max(cell // 4, round(h * scale)), max(cell // 4, round(w * scale)))
        tile = F.interpolate(m.float()[None, None], size=size, mode="nearest")[0, 0]
        y, x = layout.cell_origin(depth, type_index)
        oy, ox = (cell - size[0]) // 2, (cell - size[1]) // 2
        image[y + oy:y + oy + size[0], x + ox:x + ox + size[1]] = colorize(tile)
    return image, layout
