"""File writing that loses nothing: atomic, and never over a user's existing file.

A file is written to a temporary name in the target directory, flushed, and then published with a hard link,
which fails if the name exists, so a concurrent writer or an existing file is never replaced. Readers never
see a half-written file. Files get the permissions a plain `open()` gives (0666 minus the umask), like every
other file ComfyUI writes.
"""

from __future__ import annotations

import os
import pickle
import re
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path, PurePath

import torch
from safetensors.torch import save_file

from .errors import LoFAError

NEW_FILE_MODE = 0o666  # the umask takes away what the user's set-up withholds, as with open()


def publish_new_file(path: str | os.PathLike, write: Callable[[str], None], overwrite: bool = False) -> Path:
    """Write via `write(tmp_path)` then publish at `path`; FileExistsError if it exists and not `overwrite`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path)
    mode = os.stat(tmp).st_mode & 0o777  # what the umask allows; writers that replace the file (safetensors) lose it
    try:
        write(tmp)
        os.chmod(tmp, mode)
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


def _create_temp(path: Path) -> str:
    """An empty, new temporary file next to `path` (a hidden name), created with the usual permissions."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, NEW_FILE_MODE))
            return str(tmp)
        except FileExistsError:
            continue


def _link_exclusive(tmp: str, path: Path) -> None:
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        # No hard links on this filesystem: reserve the name exclusively, then atomically replace our own
        # empty placeholder.
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, NEW_FILE_MODE)
        os.close(fd)
        os.replace(tmp, path)


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None, overwrite: bool = False) -> Path:
    """Atomically write a .safetensors file (contiguous CPU tensors, string metadata)."""
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    return publish_new_file(path, lambda tmp: save_file(clean, tmp, metadata=meta), overwrite=overwrite)


def save_numbered(tensors: Mapping[str, torch.Tensor], directory: str | os.PathLike, prefix: str,
                  metadata: Mapping[str, str] | None = None, digits: int = 5, default_name: str = "lofa",
                  label: str | None = None, suffix: str = "") -> Path:
    """Save as `<directory>/<prefix><suffix>_NNNNN.safetensors` with the next free number; never overwrites.

    `label` names `directory` in errors (e.g. "models/loras")."""
    folder, stem = numbered_location(directory, prefix, default_name, label)
    stem += suffix
    pattern = re.compile(rf"^{re.escape(stem)}_(\d+)\.safetensors$")
    existing = [int(m.group(1)) for p in folder.glob("*.safetensors") if (m := pattern.match(p.name))]
    counter = max(existing, default=0) + 1
    while True:
        target = folder / f"{stem}_{counter:0{digits}d}.safetensors"
        try:
            return save_safetensors(tensors, target, metadata)
        except FileExistsError:
            counter += 1


def numbered_location(directory: str | os.PathLike, prefix: str, default_name: str = "lofa",
                      label: str | None = None) -> tuple[Path, str]:
    """(folder, file stem) of a filename prefix, always inside `directory`.

    A prefix that names only a folder ("", ".", "./", "LoFA/") gets `default_name`; an absolute path, ".." or a
    NUL byte is refused, since those would write outside `directory` (or nowhere).
    """
    directory = Path(directory)
    where = label or str(directory)
    if "\0" in prefix:
        raise LoFAError(f"filename_prefix {prefix!r} contains a NUL character; type a name such as 'LoFA/lofa' "
                        f"(a path inside {where}).")
    sub = PurePath(prefix)
    if sub.is_absolute() or sub.anchor or ".." in sub.parts:
        raise LoFAError(f"filename_prefix {prefix!r} does not stay inside {where}: use a relative path without "
                        f"'..', such as 'LoFA/lofa'.")
    names_folder_only = not sub.parts or prefix.rstrip().endswith(("/", os.sep))
    parts = sub.parts if names_folder_only else sub.parts[:-1]
    stem = default_name if names_folder_only else sub.name
    return directory.joinpath(*parts), stem


def load_torch_weights_only(path: str | os.PathLike, error: type[Exception] = LoFAError) -> object:
    """torch.load restricted to tensors and plain containers (no arbitrary pickled code).

    Any failure becomes `error` with a message naming the file and saying whether it is damaged or holds pickled
    objects that a weights-only load refuses (torch raises RuntimeError, UnpicklingError, EOFError, struct.error,
    OSError, ... depending on where a file is cut)."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise error(f"'{path}' does not exist.") from err
    except Exception as err:
        text = str(err)
        if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in text:
            detail = next((line.strip() for line in text.splitlines() if "GLOBAL" in line or "Unsupported" in line),
                          "")
            raise error(  # a cut file can end in a garbled opcode, so both causes are named
                f"'{path.name}' was refused by the weights-only loader{f' ({detail[:160]})' if detail else ''}: it "
                f"holds pickled objects other than tensors, or it is truncated or corrupt. LoFA never runs pickled "
                f"code: save it with tensors only (or as .safetensors), or copy it again."
            ) from err
        raise error(
            f"'{path.name}' could not be read as a PyTorch weights file ({type(err).__name__}: "
            f"{text.splitlines()[0] if text else 'no detail'}). It is truncated or corrupt: copy or download it "
            f"again."
        ) from err
