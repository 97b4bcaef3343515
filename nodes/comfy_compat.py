"""Everything that touches ComfyUI internals, written to work on March-2024 and 2025-26 ComfyUI alike.

Version differences handled here (see comfyui-internals notes): the LoRA patch value (`LoRAAdapter` since
April 2025, a tuple before), `add_patches` return values, the shape of `ModelPatcher.backup` entries, and
`load_models_gpu` keyword arguments.
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths
import torch

from ..lofa_core.checkpoint import LoFACheckpoint
from ..lofa_core.errors import LoFAError

log = logging.getLogger("ComfyUI-LoFA")

LOFA_FOLDER = "lofa"
LOFA_EXTENSIONS = {".safetensors", ".pth"}  # .pth: the authors' release, converted on first use

try:  # ComfyUI >= April 2025 (PR #7540): weight adapters; the tuple form is ignored there.
    from comfy.weight_adapter import LoRAAdapter
except ImportError:  # older ComfyUI: ("lora", tuple) patches
    LoRAAdapter = None


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


def make_lora_patch(up: torch.Tensor, down: torch.Tensor, alpha: float | None):
    """A patch value meaning `(alpha / rank) * up @ down` (alpha None = scale 1) on any ComfyUI version."""
    weights = (up, down, alpha, None, None, None)  # mid, dora_scale, reshape: unused
    if LoRAAdapter is not None:
        return LoRAAdapter(set(), weights)
    return ("lora", weights)


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
    """Shapes of the diffusion model's state dict, without copying any tensor."""
    sd = model.model_state_dict(filter_prefix="diffusion_model.")
    return {k: tuple(v.shape) for k, v in sd.items()}


def base_weight(model, key: str) -> torch.Tensor:
    """The unpatched weight of `key`, as the base model has it; never modifies the model.

    If ComfyUI has the model loaded with patches merged, the original sits in `backup` (a tensor in 2024, a
    namedtuple with `.weight` later). Scaled-fp8 checkpoints keep a per-layer `scale_weight` next to it.
    """
    backup = getattr(model, "backup", {}).get(key)
    weight = getattr(backup, "weight", backup) if backup is not None else comfy.utils.get_attr(model.model, key)
    weight = weight.detach()
    scale_key = key[: -len("weight")] + "scale_weight"
    try:
        scale = comfy.utils.get_attr(model.model, scale_key)
    except AttributeError:
        scale = None
    if isinstance(scale, torch.Tensor) and weight.dtype.itemsize == 1:
        return weight.float() * scale.float().to(weight.device)
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
