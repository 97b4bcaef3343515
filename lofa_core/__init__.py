"""LoFA core: hypernetwork, target catalogs, response maps, LoRA formats and checkpoint I/O.

Pure torch + safetensors (+ einops); importable and testable without ComfyUI. Modules use relative imports so
the package works both top-level (`import lofa_core`) and inside the ComfyUI node pack.
"""

__version__ = "0.2.0"
