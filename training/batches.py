"""Assembling hypernetwork batches: matrices grouped by shape, one prompt context per LoRA sample."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from lofa_core.conditioning import KIND_POSE, Condition, stack_collapsed
from lofa_core.layers import Context
from lofa_core.targets import Target

from .base_models import Captions, make_captions


@dataclass
class ShapeGroup:
    """Matrices of one shape, sample-major: entry m belongs to sample `sample[m]` and target `targets[m]`."""

    targets: list[Target]
    sample: torch.Tensor  # [M] index into the batch's samples
    w: torch.Tensor  # [M, out, in] base weights
    depth: torch.Tensor
    type_index: torch.Tensor
    extra: dict  # per-matrix tensors of the stage (response targets, dW targets, Stage-I features)


def make_groups(items: list[tuple[int, Target]], weights: dict[str, torch.Tensor], device: torch.device,
                extra: dict[str, list[torch.Tensor]] | None = None) -> list[ShapeGroup]:
    """items: (sample index, target) in sample-major order; extra: name -> per-item tensors, same order."""
    by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, (_, t) in enumerate(items):
        by_shape[t.shape].append(i)
    groups = []
    for rows in by_shape.values():
        targets = [items[i][1] for i in rows]
        groups.append(ShapeGroup(
            targets=targets,
            sample=torch.tensor([items[i][0] for i in rows], device=device),
            w=torch.stack([weights[t.path] for t in targets]).to(device),
            depth=torch.tensor([t.depth for t in targets], device=device),
            type_index=torch.tensor([t.type_index for t in targets], device=device),
            extra={name: torch.stack([values[i] for i in rows]).to(device) for name, values in (extra or {}).items()},
        ))
    return groups


def contexts_for(ctx: Context, sample: torch.Tensor) -> Context:
    """Contexts for a group: one per sample when the group holds equally many consecutive matrices of each
    sample (cross-attention then shares it without copies), else one per matrix."""
    counts = torch.bincount(sample)
    used = counts[counts > 0]
    if bool((sample[1:] >= sample[:-1]).all()) and bool((used == used[0]).all()):
        index = torch.unique_consecutive(sample)
    else:
        index = sample
    return Context(ctx.values[index], None if ctx.log_counts is None else ctx.log_counts[index])


@dataclass
class Prompts:
    """The prompts of a batch: the LoFA conditions for the hypernetwork (text/image tokens, collapsed padding;
    or pose frames) and the captions as the base model reads them (for the diffusion loss)."""

    tokens: torch.Tensor  # [S, L', D] collapsed tokens, or pose frames [S, 3, T, H, W]
    log_counts: torch.Tensor | None  # [S, L'] (None for pose frames)
    pooled: torch.Tensor | None  # [S, P]
    captions: Captions | None  # the captions as the base model reads them (None: no diffusion loss)

    def encode(self, net) -> Context:
        if self.log_counts is None:
            return Context(net.encode_context(self.tokens, self.pooled), None)
        return net.encode_collapsed(self.tokens, self.log_counts, self.pooled)


def jitter_pose_frames(frames: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Pose frames [S, 3, T, H, W], each sample shifted by its own random (dy, dx) of up to `max_shift` pixels
    (zero fill): the same pose slightly off-centre, so that a pose encoder trained on a few hundred fixed frame
    sets cannot tell them apart by exact pixels."""
    if max_shift <= 0:
        return frames
    m = max_shift
    padded = torch.nn.functional.pad(frames, (m, m, m, m))
    h, w = frames.shape[-2:]
    shifts = torch.randint(0, 2 * m + 1, (frames.shape[0], 2), generator=gen).tolist()
    return torch.stack([padded[i, ..., dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(shifts)])


def batch_prompts(conditions: list[Condition], device: torch.device,
                  captions: list[Condition] | None = None) -> Prompts:
    """Stack a batch's conditions and, when given, the captions the base model reads (diffusion loss only)."""
    if conditions[0].kind == KIND_POSE:
        tokens, log_counts = torch.stack([c.tokens for c in conditions]), None
        pooled = None
    else:
        tokens, log_counts, pooled = stack_collapsed(conditions)
    base_captions = None
    if captions:
        base_captions = make_captions([c.tokens for c in captions],
                                      [c.pooled for c in captions] if captions[0].pooled is not None else None
                                      ).to(device)
    return Prompts(tokens.to(device), None if log_counts is None else log_counts.to(device),
                   None if pooled is None else pooled.to(device), base_captions)
