"""SHA-256 of files, computed once per file version (name, size and modification time)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_known: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike) -> str:
    stat = os.stat(path)
    identity = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if identity not in _known:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
        _known[identity] = digest.hexdigest()
    return _known[identity]
