"""The registry of base-model families LoFA supports: find a model's family and its LoRA targets.

Everything family-specific lives in the family's own module (`wan.py`, `sdxl.py`) as one `ModelFamily`; code
elsewhere asks the registry. Adding a family is one new module, listed in `FAMILIES`, plus its tests.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from ..errors import ModelFamilyError
from ..targets import GROUP_ATTENTION, TARGET_GROUPS, TargetCatalog, describe_unknown_model, relative_shapes
from . import sdxl, wan
from .spec import ModelFamily

FAMILIES: tuple[ModelFamily, ...] = (wan.FAMILY, sdxl.FAMILY)  # detection order


def family_names() -> list[str]:
    """Every accepted spelling (names and aliases), for command-line choices."""
    return [n for f in FAMILIES for n in (f.name, *f.aliases)]


def get_family(name: str) -> ModelFamily:
    """The family called `name` (its stored name or an alias)."""
    for family in FAMILIES:
        if name == family.name or name in family.aliases:
            return family
    raise ModelFamilyError(f"unknown model family {name!r}; this ComfyUI-LoFA knows {family_names()}")


def build_catalog(shapes: Mapping[str, Sequence[int]], groups: Sequence[str] = (GROUP_ATTENTION,)) -> TargetCatalog:
    """Detect the model family from state-dict shapes and list its LoRA targets.

    `shapes` maps state-dict keys (with or without `diffusion_model.` / `model.diffusion_model.`) to
    shapes. `groups` selects target groups: "attn" (default, what LoFA is trained on) and "ffn" (opt-in).
    """
    unknown = [g for g in groups if g not in TARGET_GROUPS]
    if unknown or not groups:
        raise ValueError(f"unknown target group(s) {unknown or list(groups)}; choose from {list(TARGET_GROUPS)}")
    rel = relative_shapes(shapes)
    for family in FAMILIES:
        if family.matches(rel):
            return family.build_catalog(rel, tuple(groups))
    raise ModelFamilyError(
        f"LoFA supports WAN 2.1 text-to-video and SDXL base models, but this model looks like "
        f"{describe_unknown_model(rel)}. Load a WAN 2.1 T2V or SDXL model for LoFA."
    )


def family_of_module_paths(paths: Iterable[str]) -> ModelFamily:
    """The family whose module paths a LoRA uses (for a LORA_MODEL that arrives without its model); a LoRA
    whose paths no family claims is treated as the first family's (WAN: `diffusion_model.<path>` names)."""
    paths = list(paths)
    counts = [sum(map(family.owns_module_path, paths)) for family in FAMILIES]
    best = max(range(len(FAMILIES)), key=lambda i: counts[i])
    return FAMILIES[best] if counts[best] else FAMILIES[0]
