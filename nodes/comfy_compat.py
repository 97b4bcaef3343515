"""Everything that touches ComfyUI internals, written to work on March-2024 and 2025-26 ComfyUI alike.

Version differences handled here (see comfyui-internals notes): LoRA patches are built by ComfyUI's own
`comfy.lora.load_lora` (a `LoRAAdapter` since April 2025, a tuple before), `add_patches` return values, the
shape of `ModelPatcher.backup` entries, reading a stored weight (`get_key_weight` and its convert function since
late 2024), and `load_models_gpu` keyword arguments.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import comfy.lora
import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths
import torch

from ..lofa_core.checkpoint import LoFACheckpoint
from ..lofa_core.errors import LoFAError
from ..lofa_core.gguf_weights import dequantize as dequantize_gguf
from ..lofa_core.gguf_weights import is_gguf_tensor, logical_shape
from ..lofa_core.targets import COMFY_PREFIX

log = logging.getLogger("ComfyUI-LoFA")

LOFA_FOLDER = "lofa"
LOFA_EXTENSIONS = {".safetensors", ".pth"}  # .pth: the authors' release, converted on first use

try:  # ComfyUI since late 2024: a layer's stored weight plus the function that turns it into the real one
    from comfy.model_patcher import get_key_weight as _get_key_weight
except ImportError:
    _get_key_weight = None

def register_model_folder() -> None:
    """Add `models/lofa`, keeping paths that extra_model_paths.yaml already added."""
    default = os.path.join(folder_paths.models_dir, LOFA_FOLDER)
    entry = folder_paths.folder_names_and_paths.get(LOFA_FOLDER)
    if entry is None:
        folder_paths.folder_names_and_paths[LOFA_FOLDER] = ([default], set(LOFA_EXTENSIONS))
    else:  # an extra_model_paths.yaml entry: ComfyUI gives it an empty extension set, which lists every file
        paths, extensions = entry
        if default not in paths:
            paths.append(default)
        extensions.update(LOFA_EXTENSIONS)
    try:
        os.makedirs(default, exist_ok=True)
    except OSError:  # read-only install: the folder can still come from extra_model_paths.yaml
        pass


def lora_patches(tensors: Mapping[str, torch.Tensor], paths: Iterable[str]) -> dict:
    """ComfyUI's own patches for a LoRA in ComfyUI key names (`diffusion_model.<path>.lora_up.weight`, `...down...`,
    `.alpha`), made by `comfy.lora.load_lora` as its LoRA loaders make them; every path must yield one."""
    to_load = {f"{COMFY_PREFIX}{p}": f"{COMFY_PREFIX}{p}.weight" for p in paths}
    patches = comfy.lora.load_lora(tensors, to_load)
    missing = [key for key in to_load.values() if key not in patches]
    if missing:
        raise LoFAError(f"ComfyUI made no LoRA patch for {len(missing)} of {len(to_load)} layers (e.g. {missing[:3]}).")
    return patches


def add_patches_checked(model, patches: dict, strength: float):
    """Clone the MODEL, add the patches and verify ComfyUI accepted every key (it skips unknown ones)."""
    patched = model.clone()
    accepted = set(patched.add_patches(patches, strength, 1.0))
    rejected = [k for k in patches if k not in accepted]
    if rejected:
        raise LoFAError(f"ComfyUI did not accept {len(rejected)} of {len(patches)} LoRA weights for this MODEL "
                        f"(e.g. {rejected[:3]}); the LoRA was made for a different model.")
    return patched


def model_weight_shapes(model) -> dict[str, tuple[int, ...]]:
    """Shapes of the diffusion model's state dict, without copying any tensor.

    A layer's shape is read from its own weight where it has one: quantised storage (e.g. ComfyUI-GGUF's raw
    blocks) reports its logical shape there, while its state-dict placeholder may have the storage's shape.
    """
    sd = model.model_state_dict(filter_prefix="diffusion_model.")
    shapes = {}
    for key, value in sd.items():
        try:
            stored = comfy.utils.get_attr(model.model, key)
        except AttributeError:
            stored = value
        shapes[key] = logical_shape(stored if isinstance(stored, torch.Tensor) else value)
    return shapes


def model_file_name(model) -> str | None:
    """The file a MODEL was loaded from, where ComfyUI records it (its loaders do since 2026)."""
    init = getattr(model, "cached_patcher_init", None)
    args = init[1] if isinstance(init, tuple) and len(init) > 1 else ()
    path = args[0] if args and isinstance(args[0], str) else None
    return os.path.basename(path) if path else None


def base_weight(model, key: str) -> torch.Tensor:
    """The base model's own weight `key` as real values, read the way ComfyUI reads it; the MODEL is never modified.

    As in ComfyUI's `get_key_patches`: when ComfyUI has merged patches into the loaded model, the original sits in
    `backup` (a tensor in 2024, a namedtuple with `.weight` later) or `hook_backup`; otherwise it is the layer's
    parameter. Where the layer has a convert function (`get_key_weight`, ComfyUI since late 2024), e.g. scaled fp8
    or a QuantizedTensor (2026 fp8/int8/fp4 checkpoints), it turns the stored form into the weight, applied as
    ComfyUI applies it: to a float32 copy. A plain float weight without one is returned as stored (no copy).
    GGUF storage (ComfyUI-GGUF) is decoded by `lofa_core.gguf_weights`.
    """
    if _get_key_weight is not None:
        stored, _, convert = _get_key_weight(model.model, key)
    else:  # March-2024 ComfyUI: no convert functions
        stored, convert = comfy.utils.get_attr(model.model, key), None
    backup = getattr(model, "backup", {}).get(key)
    hook_backup = getattr(model, "hook_backup", {}).get(key)
    if backup is not None:
        stored = getattr(backup, "weight", backup)
    elif hook_backup is not None:
        stored = hook_backup[0]
    if is_gguf_tensor(stored):
        return dequantize_gguf(stored, key)
    plain = type(stored) in (torch.Tensor, torch.nn.Parameter) and stored.dtype.itemsize >= 2
    if convert is None and plain:
        return stored.detach()
    weight = mm.cast_to_device(stored.detach(), stored.device, torch.float32, copy=True)
    if convert is not None:
        weight = convert(weight, inplace=True)
    return weight


def choose_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto": bf16 where ComfyUI says the device runs it well, else float32 (never fp64)."""
    if name == "auto":
        return torch.bfloat16 if mm.should_use_bf16(device) else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


@dataclass
class LoFAModelHandle:
    """The LOFA_MODEL socket value: a loaded checkpoint managed by ComfyUI's model management."""

    checkpoint: LoFACheckpoint
    patcher: object  # comfy.model_patcher.ModelPatcher around checkpoint.net
    dtype: torch.dtype
    path: str

    @classmethod
    def create(cls, checkpoint: LoFACheckpoint, dtype_name: str, path: str) -> LoFAModelHandle:
        load_device = mm.get_torch_device()
        dtype = choose_dtype(dtype_name, load_device)
        checkpoint.net.to(dtype)
        patcher = comfy.model_patcher.ModelPatcher(checkpoint.net, load_device=load_device,
                                                   offload_device=mm.unet_offload_device())
        return cls(checkpoint, patcher, dtype, path)

    def load(self) -> torch.device:
        """Ask ComfyUI to place the hypernetwork on its device (it offloads others if memory is short)."""
        kwargs = {}
        if "force_full_load" in inspect.signature(mm.load_models_gpu).parameters:
            kwargs["force_full_load"] = True
        mm.load_models_gpu([self.patcher], **kwargs)
        device = torch.device(self.patcher.load_device)
        stray = [n for n, p in self.checkpoint.net.named_parameters() if p.device != device]
        if stray:  # a partial (low-VRAM) load leaves some tensors behind; the hypernet needs them all
            log.info("LoFA: moving %d hypernetwork tensors ComfyUI left on the offload device", len(stray))
            self.checkpoint.net.to(device)
        return device


class Progress:
    """ComfyUI progress bar plus the Cancel button, for loops that report (done, total)."""

    def __init__(self, total: int) -> None:
        self.bar = comfy.utils.ProgressBar(total)

    def __call__(self, done: int, total: int) -> None:
        mm.throw_exception_if_processing_interrupted()
        self.bar.update_absolute(done, total)


def intermediate_device() -> torch.device:
    return mm.intermediate_device()
