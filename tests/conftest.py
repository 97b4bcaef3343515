"""Test set-up: the real embedded ComfyUI runtime (imported in-process) and the pack loaded into it.

ComfyUI's top-level module `nodes` and this repository's `nodes/` package share a name, so the ComfyUI root
goes first on sys.path and the repository root after it; the pack itself is loaded the way ComfyUI loads
any custom node, through `nodes.load_custom_node` on a `custom_nodes/ComfyUI-LoFA` link.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RUNTIME = REPO / ".cache" / "comfyui-2024"
COMFY_ROOT = Path(os.environ.get("LOFA_COMFYUI_ROOT", DEFAULT_RUNTIME)).resolve()
PACK_NAME = "ComfyUI-LoFA"


def _arrange_sys_path() -> None:
    if not (COMFY_ROOT / "comfy").is_dir():
        if "LOFA_COMFYUI_ROOT" in os.environ:
            raise pytest.UsageError(f"LOFA_COMFYUI_ROOT={COMFY_ROOT} is not a ComfyUI folder")
        sys.path.insert(0, str(REPO / "scripts"))
        from fetch_comfyui import fetch

        fetch(COMFY_ROOT)
    repo_entries = {str(REPO), "", "."}
    sys.path[:] = [p for p in sys.path if p not in repo_entries and Path(p or ".").resolve() != REPO]
    sys.path[:0] = [str(COMFY_ROOT), str(REPO)]


def _import_comfy() -> None:
    """Import ComfyUI on the CPU. Its module-level `import torchvision` is served by the stand-in, which is
    then taken off the path again: transformers and diffusers must not mistake it for a real torchvision."""
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    try:  # settle transformers' cached "is torchvision installed?" answer while the stand-in is not on the path
        from transformers.utils import import_utils

        import_utils.is_torchvision_available()
    except ImportError:
        pass
    shims = str(COMFY_ROOT / "_shims")
    sys.path.insert(0, shims)
    try:
        import comfy.model_management  # noqa: F401  (must come after args.cpu)
        import comfy.sd  # noqa: F401

        import nodes  # noqa: F401
    finally:
        sys.path.remove(shims)
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]


_arrange_sys_path()
os.environ.setdefault("LOFA_TINY_CONFIG_DIR", str(REPO / ".cache" / "tiny_configs"))


@pytest.fixture(scope="session")
def comfy(tmp_path_factory) -> types.SimpleNamespace:
    """ComfyUI imported in-process on the CPU, with the LoFA pack loaded as a custom node."""
    _import_comfy()
    import folder_paths

    import nodes

    custom = tmp_path_factory.mktemp("custom_nodes")
    link = custom / PACK_NAME
    link.symlink_to(REPO, target_is_directory=True)
    loaded = nodes.load_custom_node(str(link))
    if inspect.iscoroutine(loaded):  # current ComfyUI loads custom nodes asynchronously
        loaded = asyncio.run(loaded)
    assert loaded is not False, "ComfyUI failed to import the LoFA pack"
    init = str(link / "__init__.py")
    pack = next(m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == init)
    import demo.tiny_sdxl as tiny_sdxl

    tiny_sdxl.register()
    return types.SimpleNamespace(nodes=nodes, folder_paths=folder_paths, pack=pack, root=COMFY_ROOT,
                                 tiny_sdxl=tiny_sdxl, mappings=nodes.NODE_CLASS_MAPPINGS)


@pytest.fixture
def model_dirs(comfy, tmp_path, monkeypatch):
    """Private models/loras and models/lofa folders for one test."""
    fp = comfy.folder_paths
    loras, lofa = tmp_path / "loras", tmp_path / "lofa"
    loras.mkdir()
    lofa.mkdir()
    monkeypatch.setitem(fp.folder_names_and_paths, "loras", ([str(loras)], set(fp.supported_pt_extensions)))
    monkeypatch.setitem(fp.folder_names_and_paths, "lofa", ([str(lofa)], {".safetensors"}))
    cache = getattr(fp, "filename_list_cache", None)
    if isinstance(cache, dict):
        monkeypatch.setattr(fp, "filename_list_cache", {})
    return types.SimpleNamespace(loras=loras, lofa=lofa)


def node(comfy, name: str):
    """An instance of a registered node class."""
    return comfy.mappings[name]()
