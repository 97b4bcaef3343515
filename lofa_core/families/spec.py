"""What LoFA needs to know about one family of base models, in one place.

Each family module (`wan.py`, `sdxl.py`) builds one `ModelFamily`; the registry (`lofa_core.families`) finds
the family of a model, a checkpoint or a LoRA. A new family is one new module plus its entry in the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..conditioning import ConditionSpec
from ..targets import TargetCatalog

Shapes = Mapping[str, tuple[int, ...]]  # state-dict key (relative to the diffusion model) -> shape


def _same_path(path: str) -> str:
    return path


@dataclass(frozen=True)
class ModelFamily:
    """A base-model family: how to recognise it, its LoRA targets, its prompt, its LoRA files."""

    name: str  # as stored in checkpoints, catalogs and LoRA metadata ("wan2.1-t2v")
    aliases: tuple[str, ...]  # other spellings accepted on the command line ("wan")
    matches: Callable[[Shapes], bool]  # is this state dict (shapes, relative keys) one of ours?
    build_catalog: Callable[[Shapes, tuple[str, ...]], TargetCatalog]  # its LoRA targets, for the given groups
    text_condition: ConditionSpec  # the text prompt as its text encoder gives it in ComfyUI
    lora_key_style: str  # default key style of saved LoRA files (lofa_core.lora_formats.STYLE_*)
    latent_channels_key: str  # base-model key whose second dimension is the latent channel count
    signature_types: tuple[str, str]  # a self- and a cross-attention type: where the base-model signature is read
    owns_module_path: Callable[[str], bool]  # is this module path (of a LoRA without a model) one of ours?
    modelspec: Callable[[str], tuple[str, str]]  # base-model description -> (modelspec architecture, implementation)
    to_module_path: Callable[[str], str] = _same_path  # other tools' module names (diffusers) -> ComfyUI's

    def latent_channels(self, shapes: Shapes) -> int:
        return int(shapes[self.latent_channels_key][1])
