"""Untrained networks that still predict something: for the demo's --untrained mode, benchmarks and tests of the
plumbing. A freshly built LoFA network predicts exactly zero (its output heads start at zero, as in training);
these give its heads random values, so the LoRA and the response map it predicts are non-zero. Never part of
prediction in the nodes.
"""

from __future__ import annotations

import torch

from lofa_core.hypernet import LoFAHypernet


def randomise_lora_heads_(net: LoFAHypernet, seed: int = 0, std: float = 0.02) -> LoFAHypernet:
    """Replace the zero-initialised output heads (B, and Stage-I's map head) with noise, so an untrained network
    predicts a non-zero LoRA and a non-trivial response map.

    Only for demos and tests of the plumbing: a trained checkpoint never needs this.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for stage in (net.stage1, net.stage2):
            for name in ("head_B", "head_map"):
                head = getattr(stage, name, None) if stage is not None else None
                if head is not None:
                    head.weight.copy_(std * torch.randn(head.weight.shape, generator=gen))
                    head.bias.copy_(std * torch.randn(head.bias.shape, generator=gen))
    return net
