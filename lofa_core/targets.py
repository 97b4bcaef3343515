"""Target catalogs: which weight matrices of a base model LoFA predicts a LoRA for.

A catalog is built from a model's state-dict *shapes* only (key -> shape), so it never needs the weights
themselves and works the same for a ComfyUI MODEL, a `.safetensors` file on disk or a meta-device model.
Every target carries its ComfyUI key (`diffusion_model.` prefix), its shape (out, in) and the two indices the
hypernetwork embeds: depth (block order through the network) and type (role of the matrix in its block).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .errors import ModelFamilyError

COMFY_PREFIX = "diffusion_model."
# Prefixes seen on base-model keys: ComfyUI MODEL state dicts, full checkpoints, original/ComfyUI files.
_KNOWN_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

GROUP_ATTENTION = "attn"
GROUP_FFN = "ffn"
TARGET_GROUPS = (GROUP_ATTENTION, GROUP_FFN)


@dataclass(frozen=True)
class Target:
    """One weight matrix that receives a LoRA."""

    path: str  # module path inside the diffusion model, e.g. "blocks.0.self_attn.q"
    out_features: int
    in_features: int
    depth: int
    type_index: int

    @property
    def key(self) -> str:
        """ComfyUI state-dict key of the weight (what ModelPatcher.add_patches expects)."""
        return f"{COMFY_PREFIX}{self.path}.weight"

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)


@dataclass(frozen=True)
class TargetCatalog:
    """Ordered targets (depth-major, then type) of one base model plus the vocabulary of types."""

    family: str
    type_names: tuple[str, ...]
    num_depths: int
    groups: tuple[str, ...]
    targets: tuple[Target, ...]
    summary: str = ""

    def __len__(self) -> int:
        return len(self.targets)

    def by_key(self) -> dict[str, Target]:
        return {t.key: t for t in self.targets}

    def by_path(self) -> dict[str, Target]:
        return {t.path: t for t in self.targets}

    def describe(self) -> str:
        return self.summary or f"{self.family} ({len(self.targets)} targets)"

    def to_json(self) -> dict:
        return {
            "family": self.family,
            "type_names": list(self.type_names),
            "num_depths": self.num_depths,
            "groups": list(self.groups),
            "summary": self.summary,
            "targets": [[t.path, t.out_features, t.in_features, t.depth, t.type_index] for t in self.targets],
        }

    @classmethod
    def from_json(cls, data: Mapping) -> TargetCatalog:
        targets = tuple(Target(str(p), int(o), int(i), int(d), int(ty)) for p, o, i, d, ty in data["targets"])
        return cls(
            family=str(data["family"]),
            type_names=tuple(data["type_names"]),
            num_depths=int(data["num_depths"]),
            groups=tuple(data.get("groups", (GROUP_ATTENTION,))),
            targets=targets,
            summary=str(data.get("summary", "")),
        )

    def subset(self, keep: Iterable[Target]) -> TargetCatalog:
        kept = set(keep)
        return TargetCatalog(
            self.family, self.type_names, self.num_depths, self.groups,
            tuple(t for t in self.targets if t in kept), self.summary,
        )


def strip_model_prefix(key: str) -> str:
    """Module key relative to the diffusion model, whichever container it came from."""
    for prefix in _KNOWN_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def relative_shapes(shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    return {strip_model_prefix(k): tuple(int(s) for s in v) for k, v in shapes.items()}


def describe_unknown_model(rel: Mapping[str, tuple[int, ...]]) -> str:
    """Best-effort name of a model LoFA does not support, for error messages."""
    keys = rel.keys()
    if any(k.startswith("img_emb.") for k in keys) and any(k.startswith("blocks.") for k in keys):
        return "WAN image-to-video (it has img_emb / k_img layers); LoFA's WAN support is text-to-video only"
    if any(k.startswith("double_blocks.") for k in keys):
        return "a Flux model (double_blocks.*)"
    if any(k.startswith("joint_blocks.") for k in keys):
        return "an SD3 model (joint_blocks.*)"
    if any(k.startswith("transformer.blocks.") or ".attn1.to_q" in k and k.startswith("blocks.") for k in keys):
        return "a diffusers-format transformer (attn1.to_q names); use the ComfyUI/original-format file"
    ctx = [v[1] for k, v in rel.items() if re.search(r"attn2\.to_k\.weight$", k) and len(v) == 2]
    if ctx:
        dim = ctx[0]
        name = {768: "an SD1.x UNet", 1024: "an SD2.x UNet", 1280: "an SDXL refiner UNet"}.get(dim, "a UNet")
        return f"{name} (cross-attention context dim {dim})"
    if not keys:
        return "an empty state dict (no weights were found)"
    sample = ", ".join(sorted(keys)[:3])
    return f"an unknown architecture (first keys: {sample})"


def select_targets(catalog: TargetCatalog, which: str) -> TargetCatalog:
    """Filter a catalog by attention kind: "all", "self-attention" or "cross-attention"."""
    if which == "all":
        return catalog
    marker = {"self-attention": ("self_attn.", "attn1."), "cross-attention": ("cross_attn.", "attn2.")}.get(which)
    if marker is None:
        raise ValueError(f"targets must be 'all', 'self-attention' or 'cross-attention', not {which!r}")
    keep = [t for t in catalog.targets if catalog.type_names[t.type_index].startswith(marker)]
    return catalog.subset(keep)


def check_compatible(trained: TargetCatalog, model: TargetCatalog, checkpoint_name: str) -> None:
    """Raise if a checkpoint's training targets do not exist with the same shapes in this model."""
    if trained.family != model.family:
        raise ModelFamilyError(
            f"LoFA checkpoint '{checkpoint_name}' was trained for {trained.describe()}, but the MODEL is "
            f"{model.describe()}. Use a LoFA checkpoint made for this base model, or load the base model it "
            f"was trained for."
        )
    present = model.by_path()
    problems = []
    for t in trained.targets:
        m = present.get(t.path)
        if m is None:
            problems.append(f"{t.key} is missing")
        elif m.shape != t.shape:
            problems.append(f"{t.key} is {list(m.shape)}, expected {list(t.shape)}")
        if len(problems) >= 3:
            break
    if problems:
        raise ModelFamilyError(
            f"LoFA checkpoint '{checkpoint_name}' was trained for {trained.describe()}, but this MODEL is "
            f"{model.describe()} and its layers differ ({'; '.join(problems)}). Load the base model the "
            f"checkpoint was trained for, or use a checkpoint trained for this model size."
        )
