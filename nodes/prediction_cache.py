"""Reuse a prediction when the same checkpoint, base weights and prompt come again (e.g. only the LoRA strength
or the sampler changed, or an upstream node re-ran with equal output).

The key holds the checkpoint file's identity, a content fingerprint of every targeted base weight (so a
different or modified model is never served a stale LoRA), the prepared condition's bytes and the options.

The cache is bounded by the bytes of the tensors it holds (least recently used entries go first), not by a count:
one rank-32 prediction of WAN 2.1 1.3B is ~96 MB, of SDXL ~190 MB, of WAN 2.1 14B ~420 MB (see the README). The
bound is LOFA_PREDICTION_CACHE_MB (default 1024; 0 turns the cache off). An entry larger than the bound is not kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from ..lofa_core.conditioning import Condition
from ..lofa_core.targets import Target

log = logging.getLogger("ComfyUI-LoFA")

SAMPLES_PER_WEIGHT = 256
ENV_MAX_MB = "LOFA_PREDICTION_CACHE_MB"
DEFAULT_MAX_MB = 1024.0
_entries: OrderedDict[str, tuple[tuple, int]] = OrderedDict()  # key -> (node output, bytes)


def max_bytes() -> int:
    """The bound from LOFA_PREDICTION_CACHE_MB (read on every store, so a running server can be told)."""
    text = os.environ.get(ENV_MAX_MB, "")
    try:
        megabytes = float(text) if text.strip() else DEFAULT_MAX_MB
    except ValueError:
        log.warning("LoFA: %s=%r is not a number of megabytes; using %g", ENV_MAX_MB, text, DEFAULT_MAX_MB)
        megabytes = DEFAULT_MAX_MB
    return max(0, int(megabytes * 2**20))


def tensor_bytes(value: object, seen: set[int] | None = None) -> int:
    """Bytes of the distinct tensor storages inside dicts, lists, tuples and dataclasses (views count once)."""
    seen = set() if seen is None else seen
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(value, dict):
        return sum(tensor_bytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(tensor_bytes(getattr(value, f.name), seen) for f in dataclasses.fields(value))
    return 0


def total_bytes() -> int:
    return sum(size for _, size in _entries.values())


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
    _shrink(max_bytes())  # the bound may have been lowered since the last store
    if cache_key in _entries:
        _entries.move_to_end(cache_key)
        return _entries[cache_key][0]
    return None


def put(cache_key: str, value: tuple) -> None:
    """Keep `value`, then drop the least recently used entries until the cache fits its bound."""
    limit, size = max_bytes(), tensor_bytes(value)
    _entries.pop(cache_key, None)
    if size > limit:
        log.debug("LoFA: not caching a %.1f MB prediction (bound %.1f MB)", size / 2**20, limit / 2**20)
    else:
        _entries[cache_key] = (value, size)
    _shrink(limit)


def _shrink(limit: int) -> None:
    while _entries and total_bytes() > limit:
        _entries.popitem(last=False)


def clear() -> None:
    _entries.clear()
