"""Reuse a prediction when the same checkpoint, base weights and prompt come again (e.g. only the LoRA strength
or the sampler changed, or an upstream node re-ran with equal output).

The key holds the checkpoint file's identity, a content fingerprint of every targeted base weight (so a
different or modified model is never served a stale LoRA), the prepared condition's bytes and the options.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from ..lofa_core.conditioning import Condition
from ..lofa_core.targets import Target

SAMPLES_PER_WEIGHT = 256
MAX_ENTRIES = 4
_entries: OrderedDict[str, tuple] = OrderedDict()


def weights_fingerprint(targets: Sequence[Target], read_weight: Callable[[Target], torch.Tensor]) -> str:
    """Digest of shape, dtype and 256 evenly spaced values of each weight: cheap, and different for any two
    models that differ in more than a handful of entries per matrix."""
    digest = hashlib.blake2b(digest_size=16)
    for t in targets:
        weight = read_weight(t)
        w = weight.reshape(-1)
        step = max(1, w.numel() // SAMPLES_PER_WEIGHT)
        sample = w[::step][:SAMPLES_PER_WEIGHT].float().cpu()
        digest.update(f"{t.key}:{tuple(weight.shape)}:{weight.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def condition_digest(condition: Condition) -> str:
    digest = hashlib.blake2b(condition.tokens.contiguous().numpy().tobytes(), digest_size=16)
    if condition.pooled is not None:
        digest.update(condition.pooled.contiguous().numpy().tobytes())
    return digest.hexdigest()


def file_identity(path: str) -> str:
    stat = os.stat(path)
    return f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}"


def key(*parts: object) -> str:
    return hashlib.blake2b(repr(parts).encode(), digest_size=16).hexdigest()


def get(cache_key: str) -> tuple | None:
    if cache_key in _entries:
        _entries.move_to_end(cache_key)
        return _entries[cache_key]
    return None


def put(cache_key: str, value: tuple) -> None:
    _entries[cache_key] = value
    while len(_entries) > MAX_ENTRIES:
        _entries.popitem(last=False)


def clear() -> None:
    _entries.clear()
