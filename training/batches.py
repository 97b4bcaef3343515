"""Assembling hypernetwork batches: matrices grouped by shape, one prompt context per LoRA sample."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from lofa_core.conditioning import Condition, stack_collapsed
from lofa_core.layers import Context
from lofa_core.targets import Target


@dataclass
class ShapeGroup:
    """Matrices of one shape, sample-major: entry m belongs to sample `sample[m]` and target `targets[m]`."""

    targets: list[Target]
    sample: torch.Tensor  # [M] index into the batch's samples
    w: torch.Tensor  # [M, out, in] base weights
    depth: torch.Tensor
    kind: torch.Tensor
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
            kind=torch.tensor([t.type_index for t in targets], device=device),
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
    return Context(ctx.values[index], ctx.log_counts[index])


@dataclass
class Prompts:
    """The prompts of a batch: collapsed tokens for the hypernetwork, full tokens for the base model."""

    tokens: torch.Tensor  # [S, L', D] collapsed (padding as one weighted row)
    log_counts: torch.Tensor  # [S, L']
    pooled: torch.Tensor | None  # [S, P]
    full: torch.Tensor  # [S, L, D] as the base model reads them

    def encode(self, net) -> Context:
        return net.encode_collapsed(self.tokens, self.log_counts, self.pooled)


def batch_prompts(conditions: list[Condition], device: torch.device) -> Prompts:
    lengths = {c.tokens.shape[0] for c in conditions}
    if len(lengths) != 1:
        raise ValueError(f"condition lengths differ within a batch ({sorted(lengths)}); use one token length")
    tokens, log_counts, pooled = stack_collapsed(conditions)
    return Prompts(tokens.to(device), log_counts.to(device), pooled.to(device) if pooled is not None else None,
                   torch.stack([c.tokens for c in conditions]).to(device))
