"""Encoders that turn non-text user prompts into the condition tokens the hypernetwork cross-attends to.

Text keeps the authors' linear projection (`text_proj`, in the trunk). These are trained with the hypernetwork
and saved in the LoFA checkpoint; their kind and sizes are part of the stage config.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

POSE_STRIDES = ((1, 4, 4), (2, 2, 2), (2, 2, 2))
POSE_KERNELS = ((3, 4, 4), (3, 2, 2), (3, 2, 2))
POSE_CHANNELS = (32, 64)


class ImageProjector(nn.Module):
    """CLIP vision features -> condition tokens (paper: CLIP image feature -> learnable MLP -> tokens).

    A feature sequence ([L, width], e.g. penultimate_hidden_states) is projected token by token; a pooled
    feature (image_embeds, one vector) is expanded into `tokens` condition tokens.
    """

    def __init__(self, width: int, dim: int, tokens: int = 1) -> None:
        super().__init__()
        self.tokens = max(1, tokens)
        self.fc1 = nn.Linear(width, dim)
        self.fc2 = nn.Linear(dim, dim * self.tokens)
        self.norm = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, L, width] -> [B, L * tokens, dim]."""
        out = self.fc2(F.gelu(self.fc1(features)))
        return self.norm(rearrange(out, "b l (k d) -> b (l k) d", k=self.tokens))


class MixedImageProjector(nn.Module):
    """Two pooled image features -> condition tokens, mixed by a gate (DiffLoRA Sec. 3.4, Mixed Image Features).

    The input token is both features side by side ([B, L, width + width_2]); a linear gate with softmax scores the
    two branches from that concatenation and the output is the score-weighted sum of each branch's MLP tokens.
    """

    def __init__(self, width: int, width_2: int, dim: int, tokens: int = 1) -> None:
        super().__init__()
        self.width = width
        self.first = ImageProjector(width, dim, tokens)
        self.second = ImageProjector(width_2, dim, tokens)
        self.gate = nn.Linear(width + width_2, 2)

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """[B, L, width + width_2] -> branch weights [B, L, 2] (they sum to one)."""
        return self.gate(features).softmax(dim=-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, L, width + width_2] -> [B, L * tokens, dim]."""
        scores = self.scores(features).repeat_interleave(self.first.tokens, dim=1)  # one score per output token
        first = self.first(features[..., :self.width])
        second = self.second(features[..., self.width:])
        return scores[..., :1] * first + scores[..., 1:] * second


def pose_grid(frames: int, size: int) -> tuple[int, int, int]:
    """(T', H', W') of the pose encoder's output for `frames` frames of size x size."""
    dims = [frames, size, size]
    for kernel, stride in zip(POSE_KERNELS, POSE_STRIDES):
        pads = (1, 0, 0)
        dims = [(d + 2 * p - k) // s + 1 for d, k, s, p in zip(dims, kernel, stride, pads)]
    return tuple(dims)


class PoseEncoder(nn.Module):
    """Rendered pose frames [B, 3, T, S, S] in [0, 1] -> spatio-temporal tokens (multi-layer 3D convolutions)."""

    def __init__(self, dim: int, frames: int, size: int) -> None:
        super().__init__()
        if size % 16 or frames < 1:
            raise ValueError(f"pose frames need a size divisible by 16 and at least one frame (got {frames}, {size})")
        channels = (3, *POSE_CHANNELS, dim)
        self.convs = nn.ModuleList(
            nn.Conv3d(channels[i], channels[i + 1], POSE_KERNELS[i], stride=POSE_STRIDES[i], padding=(1, 0, 0))
            for i in range(3)
        )
        t, h, w = pose_grid(frames, size)
        self.pos = nn.Parameter(torch.empty(1, t * h * w, dim))
        nn.init.trunc_normal_(self.pos, std=0.02, a=-2.0, b=2.0)
        self.norm = nn.LayerNorm(dim)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames * 2 - 1
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i < len(self.convs) - 1:
                x = F.gelu(x)
        return self.norm(rearrange(x, "b d t h w -> b (t h w) d") + self.pos)
