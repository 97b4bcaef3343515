"""A plain functional transcription of the authors' released LoFA forward pass, step by step from its spec.

Independent of `hypernet.py` on purpose: written from the specification with explicit tensor operations over
the authors' flat state dicts (their key names), computing everything the straightforward way (the context
repeated and projected for every matrix, one set of weights per call, float32). It exists to check that the
pack's optimised modules compute the same function, and as the baseline of `benchmarks/predict.py`.
Never used for prediction in the nodes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from lofa_core.config import DEFAULT_TAU

Tensor = torch.Tensor
StateDict = Mapping[str, Tensor]


def _linear(x: Tensor, sd: StateDict, name: str) -> Tensor:
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def _layer_norm(x: Tensor, sd: StateDict, name: str, eps: float) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), sd[f"{name}.weight"], sd[f"{name}.bias"], eps)


def _heads(x: Tensor, heads: int) -> Tensor:
    """[B, N, H*64] -> [B, H, N, 64], channels split into contiguous per-head chunks."""
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).permute(0, 2, 1, 3)


def _attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    out = weights @ v
    b, h, n, d = out.shape
    return out.permute(0, 2, 1, 3).reshape(b, n, h * d)


def _self_attention(x: Tensor, sd: StateDict, p: str, heads: int) -> Tensor:
    qkv = _linear(x, sd, f"{p}.qkv")
    d = x.shape[-1]
    q, k, v = (_heads(qkv[..., i * d:(i + 1) * d], heads) for i in range(3))
    q = _layer_norm(q, sd, f"{p}.q_norm", 1e-5)
    k = _layer_norm(k, sd, f"{p}.k_norm", 1e-5)
    return _linear(_attend(q, k, v), sd, f"{p}.proj")


def _cross_attention(x: Tensor, context: Tensor, sd: StateDict, p: str, heads: int) -> Tensor:
    d = x.shape[-1]
    q = _layer_norm(_heads(_linear(x, sd, f"{p}.q"), heads), sd, f"{p}.q_norm", 1e-5)
    kv = _linear(context, sd, f"{p}.kv")
    k = _layer_norm(_heads(kv[..., :d], heads), sd, f"{p}.k_norm", 1e-5)
    v = _heads(kv[..., d:], heads)
    return _linear(_attend(q, k, v), sd, f"{p}.proj")


def _mlp(x: Tensor, sd: StateDict, p: str) -> Tensor:
    return _linear(F.gelu(_linear(x, sd, f"{p}.fc1")), sd, f"{p}.fc2")


def _conditional_block(x: Tensor, context: Tensor, sd: StateDict, p: str, heads: int) -> Tensor:
    x = x + sd[f"{p}.ls1.gamma"] * _self_attention(_layer_norm(x, sd, f"{p}.norm1", 1e-6), sd, f"{p}.self_attn", heads)
    x = x + sd[f"{p}.ls2.gamma"] * _mlp(_layer_norm(x, sd, f"{p}.norm2", 1e-6), sd, f"{p}.mlp_sa")
    x = x + sd[f"{p}.ls3.gamma"] * _cross_attention(_layer_norm(x, sd, f"{p}.norm3", 1e-6), context, sd,
                                                    f"{p}.cross_attn", heads)
    return x + sd[f"{p}.ls4.gamma"] * _mlp(_layer_norm(x, sd, f"{p}.norm4", 1e-6), sd, f"{p}.mlp_ca")


def _cross_residual_block(x: Tensor, prior: Tensor, sd: StateDict, p: str, heads: int) -> Tensor:
    x = x + sd[f"{p}.ls1.gamma"] * _cross_attention(x, prior, sd, f"{p}.cross_attn", heads)
    return x + sd[f"{p}.ls2.gamma"] * _mlp(_layer_norm(x, sd, f"{p}.norm2", 1e-6), sd, f"{p}.mlp")


def _trunk(sd: StateDict, w: Tensor, depth: Tensor, type_id: Tensor, text: Tensor, heads: int,
           prior: Tensor | None) -> Tensor:
    # 1. per-column RMS normalisation (dims (1, 2) after the unsqueeze: channel and out-rows)
    w = w.unsqueeze(1)
    w = w / torch.sqrt(w.pow(2).mean(dim=(1, 2), keepdim=True) + 1e-6)
    # 2. patch conv, row-major tokens, RMSNorm (eps = float32 machine epsilon), factorised grid position
    x = F.conv2d(w, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"],
                 stride=sd["patch_embed.proj.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2)
    x = F.rms_norm(x, (x.shape[-1],), sd["patch_embed.norm.weight"], torch.finfo(x.dtype).eps)
    rows, cols = sd["pos.row"].shape[1], sd["pos.col"].shape[2]
    x = x + (sd["pos.row"] + sd["pos.col"]).reshape(1, rows * cols, -1)
    # 3. depth + type embedding on every patch token; 4. CLS in front (no position, no meta)
    x = x + (sd["depth_embed.weight"][depth] + sd["type_embed.weight"][type_id]).unsqueeze(1)
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], dim=1)
    # 5. the text context, projected for every matrix (no mask: padding positions are attended too)
    context = _linear(text, sd, "text_proj")
    n_blocks = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(n_blocks):
        x = _conditional_block(x, context, sd, f"blocks.{i}", heads)
        if f"cross_attn_blocks.{i}.ls1.gamma" in sd:
            x = _cross_residual_block(x, prior, sd, f"cross_attn_blocks.{i}", heads)
    return _layer_norm(x, sd, "norm", 1e-5)


def _factors(sd: StateDict, tokens: Tensor, rank: int, out_f: int, in_f: int) -> tuple[Tensor, Tensor]:
    h = tokens.mean(dim=1)  # all tokens, CLS included
    a = _linear(h, sd, "head_A").reshape(-1, rank, in_f)
    b = _linear(h, sd, "head_B").reshape(-1, out_f, rank)
    return a, b


def heads_of(sd: StateDict) -> int:
    return sd["cls_token"].shape[-1] // sd["blocks.0.self_attn.q_norm.weight"].shape[0]


def rank_of(sd: StateDict) -> int:
    in_f = sd["pos.col"].shape[2] * sd["patch_embed.proj.weight"].shape[-1]
    return sd["head_A.weight"].shape[0] // in_f


def stage1_forward(sd: StateDict, w: Tensor, depth: Tensor, type_id: Tensor, text: Tensor, tau: float = DEFAULT_TAU,
                   temperature: float = 0.1) -> tuple[Tensor, Tensor]:
    """-> (Stage-I features [BL, 1+N, D], response logits [BL, out, in]). `text` is [BL, 512, 4096]."""
    tokens = _trunk(sd, w, depth, type_id, text, heads_of(sd), None)
    a, b = _factors(sd, tokens, rank_of(sd), w.shape[-2], w.shape[-1])
    return tokens, (F.softplus(b @ a) - tau) / temperature


def stage2_forward(sd: StateDict, w: Tensor, depth: Tensor, type_id: Tensor, text: Tensor,
                   prior: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """-> (A [BL, r, in], B [BL, out, r], alpha [BL, 1]); the LoRA is alpha * B @ A."""
    tokens = _trunk(sd, w, depth, type_id, text, heads_of(sd), prior)
    a, b = _factors(sd, tokens, rank_of(sd), w.shape[-2], w.shape[-1])
    alpha = F.softplus(_linear(tokens.mean(dim=1), sd, "head_alpha"))
    return a, b, alpha
