"""Hypernetwork configuration: every size lives here and is saved next to the weights.

One config describes one stage. Stage-I and Stage-II share the trunk fields; Stage-II adds where Stage-I's
features are injected and how alpha is produced. Two head layouts exist:

* ``"pooled"``: the authors' released design. One global token (mean of all tokens) feeds linear heads that
  emit A (r x in) and B (out x r) for a single fixed matrix shape (``head_shape``). Only that shape works.
* ``"axial"``: this pack's default for new checkpoints. Row-block and column-block tokens (means of the patch
  grid along each axis, plus the global token) emit B in row slices and A in column slices, so any (out, in),
  square or not, works with one network (SDXL mixes 640, 1280 and 640x2048 matrices).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

HEAD_POOLED = "pooled"
HEAD_AXIAL = "axial"
RESPONSE_SOFTPLUS_TAU = "softplus_tau"  # authors': logits = (softplus(B A) - tau) / temperature
# this pack's default: each weight token decodes the logits of its own patch, minus a learned multiple of log|W|
# (R = 1[|dW| > tau |W|] depends on |W| element by element); full resolution, unbounded both ways
RESPONSE_PATCH = "patch"


# R = 1[|dW| / (|W| + RATIO_EPS) > tau]: the paper's 2 % threshold, the one default for every stage and file
DEFAULT_TAU = 0.02
RATIO_EPS = 1e-8

@dataclass(frozen=True)
class HyperNetConfig:
    """Sizes and switches of one LoFA stage."""

    stage: int = 1
    d_model: int = 768
    n_heads: int = 12
    n_blocks: int = 8
    mlp_ratio: float = 4.0
    patch_size: int = 96
    rank: int = 32
    context_dim: int = 4096  # width of the condition tokens (umT5: 4096, SDXL CLIP L+G: 2048, CLIP vision width)
    pooled_dim: int = 0  # width of an extra pooled condition vector (SDXL: 1280); 0 = none
    condition: str = "text"  # "text" (linear projection), "image" (MLP) or "pose" (3D convolutions)
    condition_tokens: int = 1  # image: condition tokens made from each feature vector (pooled image_embeds)
    context_dim_2: int = 0  # image: width of a second pooled feature mixed in by a gate (DiffLoRA MIF); 0 = none
    pose_frames: int = 16  # pose: frames the 3D-conv encoder takes
    pose_size: int = 64  # pose: frame size (divisible by 16)
    num_depths: int = 30
    num_types: int = 8
    max_rows: int = 16  # patch-grid rows the positional table covers (ceil(max out / patch))
    max_cols: int = 16  # patch-grid cols (ceil(max in / patch))
    head: str = HEAD_POOLED
    head_shape: tuple[int, int] = (1536, 1536)  # (out, in) of the matrices a pooled head emits
    qk_norm: bool = True
    use_cls: bool = True
    response: str = RESPONSE_SOFTPLUS_TAU  # Stage-I only
    tau: float = DEFAULT_TAU
    temperature: float = 0.1
    cross_attn_idxs: tuple[int, ...] = ()  # Stage-II only: inject Stage-I features after these blocks
    alpha_init: float = 1e-3  # Stage-II only: alpha = softplus(bias) starts here

    def __post_init__(self) -> None:
        object.__setattr__(self, "head_shape", tuple(int(v) for v in self.head_shape))
        object.__setattr__(self, "cross_attn_idxs", tuple(int(v) for v in self.cross_attn_idxs))
        problems = self.problems()
        if problems:
            raise ValueError("invalid LoFA hypernetwork config: " + "; ".join(problems))

    def problems(self) -> list[str]:
        out = []
        if self.stage not in (1, 2):
            out.append(f"stage must be 1 or 2, got {self.stage}")
        if self.d_model % self.n_heads:
            out.append(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        for name in ("d_model", "n_heads", "n_blocks", "patch_size", "rank", "context_dim", "num_depths",
                     "num_types", "max_rows", "max_cols"):
            if getattr(self, name) <= 0:
                out.append(f"{name} must be positive")
        if self.head not in (HEAD_POOLED, HEAD_AXIAL):
            out.append(f"head must be '{HEAD_POOLED}' or '{HEAD_AXIAL}', got {self.head!r}")
        if self.response not in (RESPONSE_SOFTPLUS_TAU, RESPONSE_PATCH):
            out.append(f"response must be '{RESPONSE_SOFTPLUS_TAU}' or '{RESPONSE_PATCH}'")
        if self.head == HEAD_POOLED:
            rows, cols = (math.ceil(s / self.patch_size) for s in self.head_shape)
            if rows > self.max_rows or cols > self.max_cols:
                out.append(f"head_shape {self.head_shape} needs a {rows}x{cols} patch grid, more than "
                           f"max_rows/max_cols {self.max_rows}x{self.max_cols}")
        bad = [i for i in self.cross_attn_idxs if not 0 <= i < self.n_blocks]
        if bad:
            out.append(f"cross_attn_idxs {bad} outside 0..{self.n_blocks - 1}")
        if self.stage == 1 and self.cross_attn_idxs:
            out.append("cross_attn_idxs is a Stage-II setting")
        if self.alpha_init <= 0:
            out.append("alpha_init must be positive")
        if self.condition not in ("text", "image", "pose"):
            out.append(f"condition must be 'text', 'image' or 'pose', not {self.condition!r}")
        if self.context_dim_2 and self.condition != "image":
            out.append("context_dim_2 (a second image feature) needs condition 'image'")
        if self.condition == "pose" and (self.pose_size % 16 or self.pose_frames < 1):
            out.append("pose_size must be divisible by 16 and pose_frames positive")
        return out

    def grid(self, out_features: int, in_features: int) -> tuple[int, int]:
        """Patch-grid size of an (out, in) matrix (padded up to whole patches)."""
        return math.ceil(out_features / self.patch_size), math.ceil(in_features / self.patch_size)

    def shape_problem(self, out_features: int, in_features: int) -> str | None:
        """Why this network cannot take an (out, in) matrix, or None if it can."""
        if self.head == HEAD_POOLED and (out_features, in_features) != self.head_shape:
            return (f"this checkpoint's heads emit only {self.head_shape[0]}x{self.head_shape[1]} matrices, "
                    f"not {out_features}x{in_features}")
        rows, cols = self.grid(out_features, in_features)
        if rows > self.max_rows or cols > self.max_cols:
            return (f"a {out_features}x{in_features} matrix needs a {rows}x{cols} patch grid, but the "
                    f"positional table covers only {self.max_rows}x{self.max_cols}")
        return None

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["head_shape"] = list(self.head_shape)
        data["cross_attn_idxs"] = list(self.cross_attn_idxs)
        return data

    @classmethod
    def from_json(cls, data: Mapping) -> HyperNetConfig:
        data = dict(data)
        data.pop("extra", None)  # an unused field that checkpoints written before 2026-12 carry
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown hypernetwork config field(s) {unknown}; this checkpoint needs a newer "
                             f"ComfyUI-LoFA")
        return cls(**dict(data))

    def replace(self, **changes) -> HyperNetConfig:
        return dataclasses.replace(self, **changes)


def axial_config_for(catalog_shapes: list[tuple[int, int]], *, num_depths: int, num_types: int, stage: int,
                     **sizes) -> HyperNetConfig:
    """An axial-head config whose positional table covers every target shape of a catalog."""
    patch = int(sizes.pop("patch_size", 64))
    rows = max(math.ceil(o / patch) for o, _ in catalog_shapes)
    cols = max(math.ceil(i / patch) for _, i in catalog_shapes)
    base = dict(stage=stage, head=HEAD_AXIAL, patch_size=patch, max_rows=rows, max_cols=cols,
                num_depths=num_depths, num_types=num_types, response=RESPONSE_PATCH, alpha_init=1.0)
    if stage == 2:
        chosen = sizes.pop("cross_attn_idxs", None)  # None: the paper's default; () : no Stage-I features
        base["cross_attn_idxs"] = default_injection(int(sizes.get("n_blocks", 8))) if chosen is None else chosen
    base.update(sizes)
    if stage == 1:
        base.pop("cross_attn_idxs", None)
    return HyperNetConfig(**base)


def default_injection(n_blocks: int) -> tuple[int, ...]:
    """The paper's best setting is after the 4th and 8th of 8 blocks; scale that to other depths."""
    if n_blocks == 1:
        return (0,)
    return tuple(sorted({max(0, n_blocks // 2 - 1), n_blocks - 1}))
