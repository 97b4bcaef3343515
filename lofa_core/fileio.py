"""File writing that loses nothing: atomic, and never over a user's existing file.

A file is written to a temporary name in the target directory, flushed, and then published with a hard link,
which fails if the name exists, so a concurrent writer or an existing file is never replaced. Readers never
see a half-written file.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file


def publish_new_file(path: str | os.PathLike, write: Callable[[str], None], overwrite: bool = False) -> Path:
    """Write via `write(tmp_path)` then publish at `path`; FileExistsError if it exists and not `overwrite`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_exclusive(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _link_exclusive(tmp: str, path: Path) -> None:
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        # No hard links on this filesystem: reserve the name exclusively, then atomically replace our own
        # empty placeholder.
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.close(fd)
        os.replace(tmp, path)


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None, overwrite: bool = False) -> Path:
    """Atomically write a .safetensors file (contiguous CPU tensors, string metadata)."""
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    return publish_new_file(path, lambda tmp: save_file(clean, tmp, metadata=meta), overwrite=overwrite)


def save_numbered(tensors: Mapping[str, torch.Tensor], directory: str | os.PathLike, prefix: str,
                  metadata: Mapping[str, str] | None = None, digits: int = 5) -> Path:
    """Save as `<directory>/<prefix>_NNNNN.safetensors` with the next free number; never overwrites."""
    directory = Path(directory)
    sub = Path(prefix)
    if sub.is_absolute() or ".." in sub.parts:
        raise ValueError(f"filename prefix {prefix!r} must stay inside {directory}")
    folder = (directory / sub).parent
    stem = sub.name
    pattern = re.compile(rf"^{re.escape(stem)}_(\d+)\.safetensors$")
    existing = [int(m.group(1)) for p in folder.glob(f"{stem}_*.safetensors") if (m := pattern.match(p.name))]
    counter = max(existing, default=0) + 1
    while True:
        target = folder / f"{stem}_{counter:0{digits}d}.safetensors"
        try:
            return save_safetensors(tensors, target, metadata)
        except FileExistsError:
            counter += 1


def load_torch_weights_only(path: str | os.PathLike) -> object:
    """torch.load restricted to tensors and plain containers (no arbitrary pickled code)."""
    return torch.load(path, map_location="cpu", weights_only=True)
