"""Build a fresh (untrained) LoFA hypernetwork sized for a base model's target catalog."""

from __future__ import annotations

from .conditioning import ConditionSpec
from .config import axial_config_for
from .hypernet import LoFAHypernet
from .targets import TargetCatalog

SMALL = dict(d_model=64, n_heads=4, n_blocks=2, patch_size=32, rank=4)


def new_hypernet(catalog: TargetCatalog, condition: ConditionSpec, **sizes) -> LoFAHypernet:
    """Axial-head Stage-I and Stage-II covering every target shape of `catalog`."""
    shapes = sorted({t.shape for t in catalog.targets})
    common = dict(num_depths=catalog.num_depths, num_types=len(catalog.type_names), **condition_sizes(condition),
                  **sizes)
    stage1 = axial_config_for(shapes, stage=1, **{k: v for k, v in common.items() if k != "cross_attn_idxs"})
    stage2 = axial_config_for(shapes, stage=2, **common)
    return LoFAHypernet(stage1, stage2)


def condition_sizes(condition: ConditionSpec) -> dict:
    """Hypernetwork config fields that follow from the condition a checkpoint takes."""
    sizes = dict(context_dim=condition.token_dim, pooled_dim=condition.pooled_dim, condition=condition.kind)
    if condition.kind == "pose":
        sizes |= dict(pose_frames=condition.frames, pose_size=condition.frame_size)
    if condition.kind == "image" and condition.image_feature == "image_embeds":
        sizes |= dict(condition_tokens=4, context_dim_2=condition.second_dim)
    return sizes
