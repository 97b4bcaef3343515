"""Test set-up: a real ComfyUI runtime (imported in-process) and the pack loaded into it.

The pack is loaded the way ComfyUI loads any custom node, through `nodes.load_custom_node` on a
`custom_nodes/ComfyUI-LoFA` link. The runtime is the embedded 2024 ComfyUI, or the one LOFA_COMFYUI_ROOT names
(scripts/test.sh runs the suite on both). Two switches, set by scripts/test.sh:

* LOFA_RUN_PART=2024 or current: this process is one of two. Tests that never touch ComfyUI run once: in the
  current process, except those marked `balance_2024` (heavy ones the 2024 process, which has less to do, runs);
  the 2024 process starts with the tests that share results with the other process (`shared_dir`);
* LOFA_NO_SKIPS=1 turns every skip into a failure (on current ComfyUI nothing may be skipped);
* LOFA_SHARED_TMP names a folder both processes share (see the `shared_dir` fixture).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import resource
import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from support import tiny_wan  # noqa: E402
from support.comfy_nodes import require_native_wan  # noqa: E402

from demo import runtime  # noqa: E402

COMFY_ROOT = runtime.runtime_root()
runtime.arrange_sys_path(COMFY_ROOT)
# one folder per runtime: two runtimes' test processes may write these files at the same time
os.environ.setdefault("LOFA_TINY_CONFIG_DIR", str(runtime.REPO / ".cache" / "tiny_configs" / COMFY_ROOT.name))
RUN_PART = os.environ.get("LOFA_RUN_PART", "")
NO_SKIPS = os.environ.get("LOFA_NO_SKIPS") == "1"


def _uses(item, fixture: str) -> bool:
    return fixture in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(config, items):
    if RUN_PART == "2024":
        keep = [i for i in items if _uses(i, "comfy") or i.get_closest_marker("balance_2024")]
        keep.sort(key=lambda i: not _uses(i, "shared_dir"))  # stable: start the shared computations early
    elif RUN_PART == "current":
        keep = [i for i in items if _uses(i, "comfy") or not i.get_closest_marker("balance_2024")]
    else:
        return
    dropped = [i for i in items if i not in keep]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if NO_SKIPS and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped on {COMFY_ROOT}, where every test must run: {reason}"


def pytest_terminal_summary(terminalreporter):
    """CPU seconds this run used (its own and its subprocesses', e.g. ComfyUI servers): on a shared machine the
    wall time says little, the CPU time says what the run costs."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    terminalreporter.write_line(f"CPU time on {COMFY_ROOT.name}: {own.ru_utime + own.ru_stime:.0f} s in pytest, "
                                f"{children.ru_utime + children.ru_stime:.0f} s in subprocesses")


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory):
    """`with shared_dir(name) as folder:` a folder for an expensive, runtime-independent result (e.g. the training
    suite) that both runtimes' processes of one scripts/test.sh run use (under $LOFA_SHARED_TMP): the first to get
    there computes it under an exclusive lock while the other waits, then finds it done. Elsewhere: a private
    temporary folder."""

    @contextlib.contextmanager
    def claim(name: str):
        shared = os.environ.get("LOFA_SHARED_TMP")
        if not shared:
            yield tmp_path_factory.mktemp(name)
            return
        folder = Path(shared) / name
        folder.mkdir(parents=True, exist_ok=True)
        with open(Path(shared) / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield folder

    return claim


@pytest.fixture(scope="session")
def comfy(tmp_path_factory) -> types.SimpleNamespace:
    """ComfyUI imported in-process on the CPU, with the LoFA pack loaded as a custom node."""
    runtime.import_comfy(COMFY_ROOT)
    import folder_paths
    import nodes

    pack = runtime.load_pack(nodes, tmp_path_factory.mktemp("custom_nodes"))
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
    extensions = set(comfy.pack.nodes.comfy_compat.LOFA_EXTENSIONS)
    monkeypatch.setitem(fp.folder_names_and_paths, "lofa", ([str(lofa)], extensions))
    if isinstance(getattr(fp, "filename_list_cache", None), dict):
        monkeypatch.setattr(fp, "filename_list_cache", {})
    return types.SimpleNamespace(loras=loras, lofa=lofa)


@pytest.fixture
def native_wan(comfy):
    """(ComfyUI's own WAN 2.1 model loaded with a tiny diffusers WAN's weights, that diffusers model)."""
    require_native_wan()
    return tiny_wan.build_native(seed=5)





@pytest.fixture
def unet_dir(comfy, tmp_path, monkeypatch):
    """A private models/diffusion_models folder for one test."""
    folder = tmp_path / "diffusion_models"
    folder.mkdir()
    fp = comfy.folder_paths
    monkeypatch.setitem(fp.folder_names_and_paths, "diffusion_models", ([str(folder)], {".safetensors"}))
    if isinstance(getattr(fp, "filename_list_cache", None), dict):
        monkeypatch.setattr(fp, "filename_list_cache", {})
    return folder
