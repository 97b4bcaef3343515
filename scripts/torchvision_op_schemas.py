"""Lets PyPI's torchvision import beside the CPU torch of the current-ComfyUI test environment.

scripts/setup_env.sh installs this module into .venv-current only, with a `.pth` line that imports it at
interpreter start-up. torchvision 0.28's compiled ops do not load with torch 2.13.0+cpu, and its import then fails
with "operator torchvision::nms does not exist": its Python part registers fake kernels for ops the missing
library would have declared. This finder waits until something first imports torchvision (ComfyUI, transformers,
a test, a training subprocess) and, only if the compiled ops cannot load, declares those two op schemas first.
ComfyUI never calls them. Importing this module costs nothing until torchvision is imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
           "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_libraries = []  # a torch.library.Library unregisters its schemas when it is garbage-collected


def _compiled_ops_load(package_dir: Path) -> bool:
    import torch

    for library in package_dir.glob("_C*.so"):
        try:
            torch.ops.load_library(str(library))
            return True
        except (OSError, RuntimeError):
            return False
    return False


class DeclareOpsBeforeTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)  # once; the regular finders then import torchvision itself
        spec = importlib.util.find_spec("torchvision")
        locations = list(spec.submodule_search_locations or []) if spec else []
        if locations and not _compiled_ops_load(Path(locations[0])):
            import torch

            library = torch.library.Library("torchvision", "FRAGMENT")
            for schema in SCHEMAS:
                library.define(schema)
            _libraries.append(library)
        return spec


if not any(isinstance(f, DeclareOpsBeforeTorchvision) for f in sys.meta_path):
    sys.meta_path.insert(0, DeclareOpsBeforeTorchvision())
