"""LoFA Response Map Preview: LOFA_RESPONSE -> IMAGE grid (rows = depth, columns = layer type)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .response_grid import render_grid

CATEGORY = "LoFA"
LABEL_WIDTH = 28
HEADER_HEIGHT = 16


class LoFAResponsePreview:
    DESCRIPTION = ("Draws Stage-I response maps like the paper's Fig. 2: one row per block depth, one column per "
                   "layer type, bright = weights the LoRA changes by more than tau. Long models wrap into "
                   "side-by-side panels.")
    CATEGORY = CATEGORY
    FUNCTION = "render"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The response-map grid; connect to Preview Image or Save Image.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "response": ("LOFA_RESPONSE", {"tooltip": "From LoFA Predict LoRA."}),
                "cell_size": ("INT", {"default": 40, "min": 8, "max": 256, "tooltip": "Pixels per map."}),
            }
        }

    def render(self, response, cell_size):
        grid, layout = render_grid(response, cell=cell_size, margin_left=LABEL_WIDTH, margin_top=HEADER_HEIGHT)
        image = Image.fromarray((grid.numpy() * 255).round().astype(np.uint8))
        draw = ImageDraw.Draw(image)
        font = ImageFont.load_default()
        for panel in range(layout.panels):
            first = panel * layout.rows_per_panel
            for t, name in enumerate(response.type_names):
                _, x = layout.cell_origin(first, t)
                draw.text((x, 2), _short(name), fill=(230, 230, 230), font=font)
            for row in range(layout.rows_per_panel):
                depth = first + row
                if depth >= response.num_depths:
                    break
                y, x = layout.cell_origin(depth, 0)
                draw.text((x - LABEL_WIDTH + 2, y + cell_size // 2 - 5), str(depth), fill=(200, 200, 200), font=font)
        array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
        return (array.unsqueeze(0),)


def _short(type_name: str) -> str:
    """Column header that fits a cell: self_attn.q -> sa.q, attn2.to_out.0 -> a2.out."""
    name = type_name.replace("self_attn", "sa").replace("cross_attn", "ca").replace("attn1", "a1")
    return name.replace("attn2", "a2").replace("to_out.0", "out").replace("to_", "")
