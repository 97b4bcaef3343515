"""The paper's Fig. 2 grid of response maps (rows = block depth, columns = layer type), drawn for the preview
node: layout, colour ramp and rendering, pure torch."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..lofa_core.response import ResponseMaps


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
