"""The two-stage LoFA hypernetwork (paper Eq. 3-5).

Input per target matrix: its base weight W (out x in), a depth and a type index, and the prompt's condition
tokens through cross-attention. Stage-I predicts response-map logits for W; Stage-II has the same trunk,
cross-attends to Stage-I's final tokens after chosen blocks, and predicts B (out x r), A (r x in) and alpha.
The predicted update is dW = alpha * B @ A (no rank scaling).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import HEAD_AXIAL, RATIO_EPS, RESPONSE_PATCH, HyperNetConfig
from .hypernet_encoders import ImageProjector, MixedImageProjector, PoseEncoder
from .layers import (
    ConditionalBlock,
    Context,
    CrossResidualBlock,
    Learnable2DPos,
    PatchEmbed,
    PromptKV,
    ZeroLinear,
    softplus_inverse,
)

COLUMN_RMS_EPS = 1e-6


def normalise_columns(w: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Divide each in-feature column by its RMS over the out rows (the authors' "per matrix" norm, B2).

    The RMS is computed in float32 whatever the weights' dtype; the result comes out in `dtype` (default: W's).
    """
    dtype = dtype or w.dtype
    w32 = w.float()
    norm = torch.linalg.vector_norm(w32, dim=-2, keepdim=True)
    scale = torch.rsqrt(norm.square() / w.shape[-2] + COLUMN_RMS_EPS)
    if dtype == torch.float32:
        return w32 * scale
    return w.to(dtype) * scale.to(dtype)


class _Trunk(nn.Module):
    """Everything both stages share: weight tokens, embeddings, condition projection, blocks, final norm.

    Attributes are flat (not under a `trunk.` prefix) so parameter names match the authors' checkpoints.
    """

    def __init__(self, cfg: HyperNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.patch_embed = PatchEmbed(cfg.patch_size, d)
        self.pos = Learnable2DPos(cfg.max_rows, cfg.max_cols, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.use_cls else None
        self.depth_embed = nn.Embedding(cfg.num_depths, d)
        self.type_embed = nn.Embedding(cfg.num_types, d)
        nn.init.trunc_normal_(self.depth_embed.weight, std=0.02, a=-2.0, b=2.0)
        nn.init.trunc_normal_(self.type_embed.weight, std=0.02, a=-2.0, b=2.0)
        if cfg.condition == "image" and cfg.context_dim_2:
            self.image_proj = MixedImageProjector(cfg.context_dim, cfg.context_dim_2, d, cfg.condition_tokens)
        elif cfg.condition == "image":
            self.image_proj = ImageProjector(cfg.context_dim, d, cfg.condition_tokens)
        elif cfg.condition == "pose":
            self.pose_encoder = PoseEncoder(d, cfg.pose_frames, cfg.pose_size)
        else:
            self.text_proj = nn.Linear(cfg.context_dim, d)
        self.pooled_proj = nn.Linear(cfg.pooled_dim, d) if cfg.pooled_dim else None
        self.blocks = nn.ModuleList(
            ConditionalBlock(d, cfg.n_heads, cfg.mlp_ratio, cfg.qk_norm) for _ in range(cfg.n_blocks)
        )
        self.norm = nn.LayerNorm(d)
        self.gradient_checkpointing = False

    def _make_factor_heads(self) -> None:
        """head_A / head_B: global (pooled) or row/column-block (axial) heads emitting A and B."""
        cfg, d = self.cfg, self.cfg.d_model
        if cfg.head == HEAD_AXIAL:
            self.head_A = nn.Linear(d, cfg.patch_size * cfg.rank)
            self.head_B = ZeroLinear(d, cfg.patch_size * cfg.rank)
        else:
            out_f, in_f = cfg.head_shape
            self.head_A = nn.Linear(d, cfg.rank * in_f)
            self.head_B = ZeroLinear(d, out_f * cfg.rank)

    # -- inputs ------------------------------------------------------------------------------------------
    def encode_context(self, tokens: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """Condition [Bc, L, context_dim] (+ pooled [Bc, pooled_dim]), or pose frames [Bc, 3, T, S, S]
        -> context [Bc, L', d]."""
        if self.cfg.condition == "image":
            ctx = self.image_proj(tokens)
        elif self.cfg.condition == "pose":
            ctx = self.pose_encoder(tokens)
        else:
            ctx = self.text_proj(tokens)
        if self.pooled_proj is not None:
            if pooled is None:
                raise ValueError("this hypernetwork needs a pooled condition vector")
            ctx = torch.cat([ctx, self.pooled_proj(pooled).unsqueeze(1)], dim=1)
        return ctx

    def encode_collapsed(self, tokens: torch.Tensor, log_counts: torch.Tensor,
                         pooled: torch.Tensor | None = None) -> Context:
        """Like `encode_context` for tokens whose repeats were collapsed (see `conditioning.collapse_padding`)."""
        values = self.encode_context(tokens, pooled)
        if values.shape[1] > log_counts.shape[1]:  # the pooled token counts once
            log_counts = F.pad(log_counts, (0, values.shape[1] - log_counts.shape[1]))
        return Context(values, log_counts)

    def prepare_weights(self, w: torch.Tensor) -> torch.Tensor:
        """Base weights [B, out, in] (any float dtype) -> normalised, padded to whole patches, compute dtype.

        Both stages of a model with the same patch size can share this (it depends only on W).
        """
        cfg = self.cfg
        out_f, in_f = w.shape[-2:]
        rows, cols = cfg.grid(out_f, in_f)
        wn = normalise_columns(w, self.patch_embed.proj.weight.dtype)
        if rows * cfg.patch_size != out_f or cols * cfg.patch_size != in_f:
            wn = F.pad(wn, (0, cols * cfg.patch_size - in_f, 0, rows * cfg.patch_size - out_f))
        return wn

    def embed_weights(self, w: torch.Tensor, depth: torch.Tensor, type_index: torch.Tensor,
                      prepared: torch.Tensor | None = None) -> torch.Tensor:
        """Base weights [B, out, in] -> tokens [B, (1+) rows*cols, d]."""
        rows, cols = self.cfg.grid(*w.shape[-2:])
        wn = self.prepare_weights(w) if prepared is None else prepared
        x = self.patch_embed(wn) + self.pos(rows, cols)
        x = x + (self.depth_embed(depth) + self.type_embed(type_index)).unsqueeze(1)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x

    # -- trunk -------------------------------------------------------------------------------------------
    def _run_block(self, block: nn.Module, x: torch.Tensor, ctx: torch.Tensor | None) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # The block is passed as the function itself, so recomputation uses this block (the authors'
            # late-bound lambda recomputed every block with the last one, bug B1).
            return checkpoint(block, x, ctx, use_reentrant=False)
        return block(x, ctx)

    def prompt_cache(self, ctx: torch.Tensor | Context) -> list[PromptKV]:
        """Every block's cross-attention keys/values for one prompt: computed once per prompt, not per matrix."""
        return [block.cross_attn.prepare(ctx) for block in self.blocks]

    def _per_block(self, ctx) -> list:
        return ctx if isinstance(ctx, list) else [ctx] * len(self.blocks)

    def run_blocks(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """`ctx`: one context for all blocks, or a per-block list (see `prompt_cache`)."""
        for block, block_ctx in zip(self.blocks, self._per_block(ctx)):
            x = self._run_block(block, x, block_ctx)
        return self.norm(x)

    # -- heads -------------------------------------------------------------------------------------------
    def lora_factors(self, tokens: torch.Tensor, out_f: int, in_f: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Final tokens -> (A [B, r, in], B [B, out, r])."""
        cfg = self.cfg
        pooled = tokens.mean(dim=1)
        if cfg.head != HEAD_AXIAL:
            return (self.head_A(pooled).view(-1, cfg.rank, in_f),
                    self.head_B(pooled).view(-1, out_f, cfg.rank))
        rows, cols = cfg.grid(out_f, in_f)
        grid = tokens[:, 1:] if self.cls_token is not None else tokens
        grid = rearrange(grid, "b (r c) d -> b r c d", r=rows, c=cols)
        row_tokens = grid.mean(dim=2) + pooled.unsqueeze(1)
        col_tokens = grid.mean(dim=1) + pooled.unsqueeze(1)
        b = rearrange(self.head_B(row_tokens), "b r (p k) -> b (r p) k", k=cfg.rank)[:, :out_f]
        a = rearrange(self.head_A(col_tokens), "b c (p k) -> b k (c p)", k=cfg.rank)[:, :, :in_f]
        return a, b


class Stage1Net(_Trunk):
    """Response-map predictor. Its final tokens are the Stage-I features Stage-II attends to.

    Two response heads: the authors' (`softplus_tau`: low-rank factors B A, logits (softplus(B A) - tau) / T)
    and this pack's (`patch`): logits = B A (row and column effects) + a dense term each weight token decodes
    for its own p x p patch - g log|W| + b, since R = 1[|dW| > tau |W|] depends on |W| element by element.
    """

    def __init__(self, cfg: HyperNetConfig) -> None:
        if cfg.stage != 1:
            raise ValueError("Stage1Net needs a stage=1 config")
        super().__init__(cfg)
        self._make_factor_heads()
        if cfg.response == RESPONSE_PATCH:
            self.head_map = nn.Linear(cfg.d_model, cfg.patch_size * cfg.patch_size)
            nn.init.zeros_(self.head_map.weight)
            nn.init.zeros_(self.head_map.bias)
            self.response_gain = nn.Parameter(torch.ones(1))  # on -log|W|
            self.response_bias = nn.Parameter(torch.zeros(1))

    def forward_features(self, w: torch.Tensor, depth: torch.Tensor, type_index: torch.Tensor, ctx: torch.Tensor,
                         logits: bool = True, prepared: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (final tokens [B, N, d] (the Stage-I features), response logits [B, out, in] or None)."""
        tokens = self.run_blocks(self.embed_weights(w, depth, type_index, prepared), ctx)
        return tokens, (self.response_logits(tokens, w) if logits else None)

    def response_logits(self, tokens: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Final tokens (and the base weights W) -> logits [B, out, in]; p > 0.5 marks |dW/W| > tau."""
        cfg = self.cfg
        out_f, in_f = w.shape[-2:]
        if cfg.response != RESPONSE_PATCH:
            a, b = self.lora_factors(tokens, out_f, in_f)
            return (F.softplus(torch.bmm(b.float(), a.float())) - cfg.tau) / cfg.temperature
        a, b = self.lora_factors(tokens, out_f, in_f)
        rows, cols = cfg.grid(out_f, in_f)
        patches = self.head_map(tokens[:, 1:] if self.cls_token is not None else tokens).float()
        dense = rearrange(patches, "b (r c) (pr pc) -> b (r pr) (c pc)", r=rows, c=cols, pr=cfg.patch_size)
        log_w = torch.log(w.abs().float() + RATIO_EPS)
        low_rank = torch.bmm(b.float(), a.float())  # row and column effects (logit(mean map) is near this form)
        return low_rank + dense[:, :out_f, :in_f] - self.response_gain * log_w + self.response_bias

    def forward(self, w, depth, type_index, ctx):
        return self.forward_features(w, depth, type_index, ctx)[1]


class Stage2Net(_Trunk):
    """LoRA predictor: the Stage-I trunk plus Stage-I-feature injection and an alpha head."""

    def __init__(self, cfg: HyperNetConfig) -> None:
        if cfg.stage != 2:
            raise ValueError("Stage2Net needs a stage=2 config")
        super().__init__(cfg)
        self._make_factor_heads()
        self.cross_attn_blocks = nn.ModuleDict(
            {str(i): CrossResidualBlock(cfg.d_model, cfg.n_heads, cfg.mlp_ratio, cfg.qk_norm)
             for i in cfg.cross_attn_idxs}
        )
        self.head_alpha = nn.Linear(cfg.d_model, 1)
        nn.init.zeros_(self.head_alpha.weight)
        nn.init.constant_(self.head_alpha.bias, softplus_inverse(cfg.alpha_init))

    def run_blocks(self, x: torch.Tensor, ctx, stage1_features: torch.Tensor | None = None) -> torch.Tensor:
        """Stage-II's trunk: after each listed block, a cross-attention to `stage1_features`."""
        for i, (block, block_ctx) in enumerate(zip(self.blocks, self._per_block(ctx))):
            x = self._run_block(block, x, block_ctx)
            inject = self.cross_attn_blocks[str(i)] if str(i) in self.cross_attn_blocks else None
            if inject is not None:
                x = self._run_block(inject, x, stage1_features)
        return self.norm(x)

    def forward(self, w: torch.Tensor, depth: torch.Tensor, type_index: torch.Tensor, ctx: torch.Tensor,
                stage1_features: torch.Tensor | None, prepared: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (A [B, r, in], B [B, out, r], alpha [B, 1]); dW = alpha * B @ A."""
        tokens = self.run_blocks(self.embed_weights(w, depth, type_index, prepared), ctx, stage1_features)
        a, b = self.lora_factors(tokens, w.shape[-2], w.shape[-1])
        alpha = F.softplus(self.head_alpha(tokens.mean(dim=1)))
        return a, b, alpha


class LoFAHypernet(nn.Module):
    """Both stages in one module, so ComfyUI's model management can load and offload them together.

    `stage1` is None only for a single-stage model (the paper's "w/o res." ablation): a Stage-II that reads no
    Stage-I features.
    """

    def __init__(self, stage1: HyperNetConfig | None, stage2: HyperNetConfig | None) -> None:
        super().__init__()
        check_stages(stage1, stage2)
        self.stage1 = Stage1Net(stage1) if stage1 is not None else None
        self.stage2 = Stage2Net(stage2) if stage2 is not None else None

    @classmethod
    def from_stages(cls, stage1: Stage1Net | None, stage2: Stage2Net | None) -> LoFAHypernet:
        """Wrap already built (e.g. freshly trained) stages without re-initialising anything."""
        check_stages(stage1.cfg if stage1 is not None else None, stage2.cfg if stage2 is not None else None)
        net = cls.__new__(cls)
        nn.Module.__init__(net)
        net.stage1, net.stage2 = stage1, stage2
        return net

    @property
    def single_stage(self) -> bool:
        return self.stage1 is None

    def shape_problem(self, out_f: int, in_f: int) -> str | None:
        for net in (self.stage1, self.stage2):
            if net is not None and (problem := net.cfg.shape_problem(out_f, in_f)):
                return problem
        return None


def check_stages(stage1: HyperNetConfig | None, stage2: HyperNetConfig | None) -> None:
    """A model has Stage-I, or Stage-I and Stage-II, or (single-stage) a Stage-II that injects no features."""
    if stage1 is None:
        if stage2 is None:
            raise ValueError("a LoFA model needs Stage-I, Stage-II or both")
        if stage2.cross_attn_idxs:
            raise ValueError(f"a Stage-II without Stage-I cannot inject Stage-I features (cross_attn_idxs "
                             f"{list(stage2.cross_attn_idxs)})")
    elif stage2 is not None:
        check_stage_pair(stage1, stage2)


def check_stage_pair(stage1: HyperNetConfig, stage2: HyperNetConfig) -> None:
    """Stage-II reads Stage-I's tokens and the same condition, so these sizes must agree."""
    fields = ("d_model", "context_dim", "context_dim_2", "pooled_dim", "num_depths", "num_types", "condition")
    bad = [f"{f}: stage1 {getattr(stage1, f)} vs stage2 {getattr(stage2, f)}"
           for f in fields if getattr(stage1, f) != getattr(stage2, f)]
    if bad:
        raise ValueError("Stage-I and Stage-II configs do not fit together (" + "; ".join(bad) + ")")
