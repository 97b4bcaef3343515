"""Transformer building blocks of the LoFA hypernetwork.

Module and parameter names follow the authors' released model, so a converted official checkpoint loads into
these modules key for key. The maths is written from a specification of that model; no code was taken from
the authors' repository.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class Mlp(nn.Module):
    """fc1 -> exact-erf GELU -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ZeroLinear(nn.Linear):
    """A Linear that starts at exactly zero, so a freshly initialised B head predicts a zero LoRA."""

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float = 1.0) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class SelfAttention(nn.Module):
    """Multi-head self-attention with per-head LayerNorm on q and k (one affine set shared by all heads)."""

    def __init__(self, dim: int, heads: int, qk_norm: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(dim // heads) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim // heads) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class Context(NamedTuple):
    """Projected condition tokens [Bc, L, d] with log-multiplicities [Bc, L] (log 0 = absent).

    A token standing for k identical tokens gets log k added to its attention logits, which gives exactly the
    softmax over the k copies: how the many identical zero-padding tokens of a WAN prompt are attended once.
    """

    values: torch.Tensor
    log_counts: torch.Tensor | None = None


class PromptKV(NamedTuple):
    """One block's cross-attention keys and values for a prompt, computed once and reused for every matrix."""

    k: torch.Tensor  # [Bc, heads, L, head_dim], already k-normed
    v: torch.Tensor
    log_counts: torch.Tensor | None


class CrossAttention(nn.Module):
    """Queries from the weight tokens, keys/values from a context already projected to `dim`.

    The context batch may be smaller than the query batch: with S contexts and S*g query sequences, each
    consecutive group of g sequences shares one context (one prompt for all its target matrices). Each group's
    sequences are folded into one long query sequence that attends to its context: the same result as repeating
    the context per matrix, without materialising the repeats.
    """

    def __init__(self, dim: int, heads: int, qk_norm: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = nn.LayerNorm(dim // heads) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim // heads) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = rearrange(self.kv(context), "b n (two h d) -> two b h n d", two=2, h=self.heads)
        return self.k_norm(k), v

    def prepare(self, context: torch.Tensor | Context) -> PromptKV:
        """Keys/values of a context, to be reused across many query batches."""
        if isinstance(context, PromptKV):
            return context
        values, log_counts = (context.values, context.log_counts) if isinstance(context, Context) else (context, None)
        k, v = self.keys_values(values)
        return PromptKV(k, v, log_counts)

    def forward(self, x: torch.Tensor, context: torch.Tensor | Context | PromptKV) -> torch.Tensor:
        k, v, log_counts = self.prepare(context)
        q = self.q_norm(rearrange(self.q(x), "b n (h d) -> b h n d", h=self.heads))
        contexts, batch = k.shape[0], x.shape[0]
        if batch % contexts:
            raise ValueError(f"{batch} query sequences cannot share {contexts} contexts evenly")
        group = batch // contexts
        q = rearrange(q, "(s g) h n d -> s h (g n) d", g=group)
        mask = None if log_counts is None else log_counts[:, None, None, :].to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(rearrange(out, "s h (g n) d -> (s g) n (h d)", g=group))


class ConditionalBlock(nn.Module):
    """Pre-norm block: self-attention, MLP, then (with a context) cross-attention and a second MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qk_norm: bool = True) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attn = SelfAttention(dim, heads, qk_norm)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_sa = Mlp(dim, hidden)
        self.ls2 = LayerScale(dim)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = CrossAttention(dim, heads, qk_norm)
        self.ls3 = LayerScale(dim)
        self.norm4 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_ca = Mlp(dim, hidden)
        self.ls4 = LayerScale(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | Context | PromptKV | None) -> torch.Tensor:
        x = x + self.ls1(self.self_attn(self.norm1(x)))
        x = x + self.ls2(self.mlp_sa(self.norm2(x)))
        if context is not None:
            x = x + self.ls3(self.cross_attn(self.norm3(x), context))
            x = x + self.ls4(self.mlp_ca(self.norm4(x)))
        return x


class CrossResidualBlock(nn.Module):
    """Stage-II injection of Stage-I features: un-normalised cross-attention, then a pre-norm MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qk_norm: bool = True) -> None:
        super().__init__()
        self.cross_attn = CrossAttention(dim, heads, qk_norm)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        if context is not None:
            x = x + self.ls1(self.cross_attn(x, context))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches of the (normalised) weight matrix -> tokens, then RMSNorm."""

    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(1, dim, kernel_size=patch, stride=patch)
        self.norm = nn.RMSNorm(dim, eps=None)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """w: [B, rows*p, cols*p] -> tokens [B, rows*cols, dim] in row-major grid order.

        A stride-p p x p convolution over non-overlapping patches is one matrix product over the flattened
        patches; computed that way (the Conv2d weights kept for checkpoint compatibility), because convolution
        kernels are slow for p = 96.
        """
        patches = rearrange(w, "b (r i) (c j) -> b (r c) (i j)", i=self.patch, j=self.patch)
        tokens = F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)
        return self.norm(tokens)


class Learnable2DPos(nn.Module):
    """Factorised grid position: pos[r, c] = row[r] + col[c], cropped to each matrix's grid."""

    def __init__(self, rows: int, cols: int, dim: int) -> None:
        super().__init__()
        self.row = nn.Parameter(torch.empty(1, rows, 1, dim))
        self.col = nn.Parameter(torch.empty(1, 1, cols, dim))
        nn.init.trunc_normal_(self.row, std=0.02, a=-2.0, b=2.0)
        nn.init.trunc_normal_(self.col, std=0.02, a=-2.0, b=2.0)

    def forward(self, rows: int, cols: int) -> torch.Tensor:
        pos = self.row[:, :rows] + self.col[:, :, :cols]
        return rearrange(pos, "1 r c d -> 1 (r c) d")


def softplus_inverse(y: float) -> float:
    """x with softplus(x) = y, for initialising a softplus-activated bias at a chosen value."""
    return y + math.log(-math.expm1(-y))
