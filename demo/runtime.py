"""The embedded ComfyUI runtime: import it in-process, or run it as a headless server with the pack installed.

Used by the tests and by the demo. ComfyUI's own top-level module `nodes` shares its name with this
repository's `nodes/` package, so ComfyUI's root always comes first on sys.path.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ROOT = REPO / ".cache" / "comfyui-2024"
WORKFLOWS = REPO / "example_workflows"  # UI workflows and thumbnails; API format in api/
PACK_NAME = "ComfyUI-LoFA"
TINY_MODELS_NODE = "lofa_tiny_models.py"


def runtime_root() -> Path:
    """ComfyUI root to use: $LOFA_COMFYUI_ROOT, or the embedded 2024 runtime (fetched on first use)."""
    if "LOFA_COMFYUI_ROOT" in os.environ:
        root = Path(os.environ["LOFA_COMFYUI_ROOT"]).resolve()
        if not (root / "comfy").is_dir():
            raise SystemExit(f"LOFA_COMFYUI_ROOT={root} is not a ComfyUI folder (no comfy/ inside)")
        return root
    if not (DEFAULT_ROOT / "comfy").is_dir():
        sys.path.insert(0, str(REPO / "scripts"))
        from fetch_comfyui import fetch

        fetch(DEFAULT_ROOT)
    return DEFAULT_ROOT


def arrange_sys_path(root: Path) -> None:
    """ComfyUI root first, then this repository (for `lofa_core` and `demo`), never the other way round."""
    drop = {str(REPO), "", "."}
    sys.path[:] = [p for p in sys.path if p not in drop and Path(p or ".").resolve() != REPO]
    sys.path[:0] = [str(root), str(REPO)]


def import_comfy(root: Path) -> None:
    """Import ComfyUI on the CPU in this process.

    The 2024 runtime imports torchvision at module level (only Stable Cascade and upscalers use it) but has none
    installed: a stand-in (`_shims/`, written by scripts/fetch_comfyui.py) serves that import and is taken off the
    path again, after transformers has cached that no real torchvision is installed, so transformers and
    diffusers never mistake the stand-in for one. Current ComfyUI's environment has the real torchvision.
    """
    arrange_sys_path(root)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    shims = root / "_shims"
    if not shims.is_dir():
        import comfy.model_management  # noqa: F401  (after args.cpu)
        import comfy.sd  # noqa: F401
        import nodes  # noqa: F401
        return
    try:
        from transformers.utils import import_utils

        import_utils.is_torchvision_available()
    except ImportError:
        pass
    sys.path.insert(0, str(shims))
    try:
        import comfy.model_management  # noqa: F401  (after args.cpu)
        import comfy.sd  # noqa: F401
        import nodes  # noqa: F401
    finally:
        sys.path.remove(str(shims))
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]


TINY_MODEL_REGISTRATIONS = ("demo.tiny_sdxl",)  # the demo's; tests add their own (tests/support)


def prepare_server_root(source: Path, dest: Path, registrations: tuple[str, ...] = TINY_MODEL_REGISTRATIONS,
                        import_paths: tuple[Path, ...] = ()) -> Path:
    """A private copy of the ComfyUI root with the pack (linked) and a helper node that registers tiny models.

    `registrations` name modules whose `register()` teaches ComfyUI's loaders a tiny model (found on
    `import_paths`, appended to sys.path, or in this repository); real models never need them.
    """
    if not (dest / "main.py").exists():
        staging = dest.with_name(dest.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging, ignore=shutil.ignore_patterns("__pycache__", "output", "temp"))
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)
    (dest / "custom_nodes").mkdir(exist_ok=True)
    link = dest / "custom_nodes" / PACK_NAME
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    (dest / "custom_nodes" / TINY_MODELS_NODE).write_text(
        '"""Lets ComfyUI load the tiny models of the LoFA demo and tests (not needed with real models)."""\n'
        "import importlib\nimport sys\n\n"
        f"sys.path.extend({[str(p) for p in import_paths]!r})\n"
        f"for name in {list(registrations)!r}:\n    importlib.import_module(name).register()\n"
        "NODE_CLASS_MAPPINGS = {}\n"
    )
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ComfyUI server process on 127.0.0.1 (started with --cpu), stopped by its own PID."""

    def __init__(self, root: Path, output_dir: Path, log_path: Path, port: int | None = None) -> None:
        self.root, self.port = root, port or free_port()
        env = dict(os.environ)
        shims = [str(root / "_shims")] if (root / "_shims").is_dir() else []  # the 2024 runtime's torchvision
        inherited = [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []
        env["PYTHONPATH"] = os.pathsep.join(shims + [str(REPO)] + inherited)
        env.setdefault("LOFA_TINY_CONFIG_DIR", str(REPO / ".cache" / "tiny_configs"))
        self.log = open(log_path, "wb")  # noqa: SIM115  (closed in stop())
        self.proc = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--disable-auto-launch", "--output-directory", str(output_dir)],
            cwd=root, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.proc.returncode}; see {self.log.name}")
            try:
                self.get("/object_info/LoFAModelLoader")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not start within {timeout:.0f}s; see {self.log.name}")

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=30) as resp:
            return json.loads(resp.read())

    def post(self, path: str, payload: dict) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    def queue(self, graph: dict) -> str:
        status, body = self.post("/prompt", {"prompt": graph, "client_id": "lofa"})
        if status != 200:
            raise RuntimeError(f"ComfyUI rejected the workflow ({status}): {json.dumps(body)[:2000]}")
        return body["prompt_id"]

    def wait_done(self, prompt_id: str, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                    entry["status"].get("completed") or entry["status"].get("status_str") == "error"):
                return entry
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI crashed while running the workflow; see {self.log.name}")
            time.sleep(0.5)
        raise TimeoutError(f"workflow {prompt_id} did not finish within {timeout:.0f}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def substitute(graph: dict, values: dict[str, dict]) -> dict:
    """Copy of an API graph with widget values replaced per class_type or node id: {"KSampler": {"steps": 2}}."""
    out = json.loads(json.dumps(graph))
    for node_id, node in out.items():
        for name, value in {**values.get(node["class_type"], {}), **values.get(node_id, {})}.items():
            if name not in node["inputs"]:
                raise KeyError(f"{node['class_type']} has no input {name!r} in this workflow")
            node["inputs"][name] = value
    return out


def load_pack(nodes_module, custom_nodes_dir: Path | None = None):
    """Load this repository into an imported ComfyUI as the custom node `ComfyUI-LoFA`; return its module."""
    import asyncio
    import inspect
    import tempfile

    folder = Path(custom_nodes_dir or tempfile.mkdtemp(prefix="lofa_custom_nodes_"))
    link = folder / PACK_NAME
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    loaded = nodes_module.load_custom_node(str(link))
    if inspect.iscoroutine(loaded):  # current ComfyUI loads custom nodes asynchronously
        loaded = asyncio.run(loaded)
    if loaded is False:
        raise RuntimeError("ComfyUI failed to import the LoFA pack (see the log above)")
    init = str(link / "__init__.py")
    return next(m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == init)
