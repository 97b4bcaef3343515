"""Differentiable LoRA injection into a frozen base model, without touching its weights.

While `inject(...)` is active, each targeted Linear returns `base(x) + alpha * (x A^T) B^T`, computed in low
rank from the *predicted* factors, so gradients flow into A, B and alpha (and through them into the
hypernetwork) while the base model stays frozen and unmodified. The batch may hold one LoRA per sample: with
S LoRAs and a batch of S*k inputs, each consecutive group of k inputs gets its sample's LoRA.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # A [S, r, in], B [S, out, r], alpha [S] or [S, 1]


def _hook(factors: Factors):
    a, b, alpha = factors

    def add_lora(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        samples = a.shape[0]
        grouped = x.reshape(samples, -1, x.shape[-1])  # [S, k*N, in]
        low = torch.bmm(grouped.to(a.dtype), a.transpose(1, 2))  # [S, k*N, r]
        delta = torch.bmm(low, b.transpose(1, 2)) * alpha.reshape(samples, 1, 1)  # [S, k*N, out]
        return output + delta.reshape(output.shape).to(output.dtype)

    return add_lora


@contextmanager
def inject(modules: Mapping[str, nn.Module], factors: Mapping[str, Factors]) -> Iterator[None]:
    """Add per-sample LoRA updates to `modules[path]` for every path in `factors` inside the block."""
    with _forward_hooks(modules, {path: _hook(f) for path, f in factors.items()}):
        yield


@contextmanager
def inject_deltas(modules: Mapping[str, nn.Module], deltas: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Add one dense update dW [out, in] to `modules[path]` for the whole batch inside the block (for LoRAs
    that are not low rank, such as averages of LoRAs)."""

    def hook(delta: torch.Tensor):
        def add(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            return output + (inputs[0].to(delta.dtype) @ delta.T).to(output.dtype)

        return add

    with _forward_hooks(modules, {path: hook(d) for path, d in deltas.items()}):
        yield


@contextmanager
def _forward_hooks(modules: Mapping[str, nn.Module], hooks: Mapping[str, Callable]) -> Iterator[None]:
    """`hooks[path]` on `modules[path]` as forward hooks inside the block; every target must exist."""
    missing = [p for p in hooks if p not in modules]
    if missing:
        raise KeyError(f"no base-model module for LoRA targets {missing[:3]}")
    handles = [modules[path].register_forward_hook(h) for path, h in hooks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
