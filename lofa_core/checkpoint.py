"""LoFA checkpoint files: one `.safetensors` per model, `stage1.*` and `stage2.*` tensors plus JSON metadata.

Metadata key "lofa" holds: format name and version, both stage configs, the base-model family and the exact
target list the model was trained on, optionally a value signature of that base model (`base_signature`), the
condition it expects and tau. Loading checks every tensor against
the shapes the stored config implies and names the file, the tensor and the expected shape on any mismatch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .base_signature import BaseSignature
from .conditioning import ConditionSpec
from .config import DEFAULT_TAU, HyperNetConfig
from .errors import CheckpointError
from .fileio import save_safetensors
from .hypernet import LoFAHypernet
from .targets import TargetCatalog

FORMAT_NAME = "lofa-checkpoint"
FORMAT_VERSION = 1
METADATA_KEY = "lofa"


@dataclass
class LoFACheckpoint:
    """A loaded LoFA model with everything needed to use it safely."""

    net: LoFAHypernet
    catalog: TargetCatalog
    condition: ConditionSpec
    tau: float
    name: str
    provenance: dict = field(default_factory=dict)
    base_signature: BaseSignature | None = None  # None: trained before signatures existed, or the authors' release

    @property
    def trained(self) -> bool:
        return bool(self.provenance.get("trained", False))


def build_metadata(net: LoFAHypernet, catalog: TargetCatalog, condition: ConditionSpec, tau: float,
                   provenance: Mapping | None = None, base_signature: BaseSignature | None = None) -> dict:
    extra = {"base_signature": base_signature.to_json()} if base_signature is not None else {}
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "stage1": net.stage1.cfg.to_json() if net.stage1 is not None else None,
        "stage2": net.stage2.cfg.to_json() if net.stage2 is not None else None,
        "base_model": catalog.to_json(),
        "condition": condition.to_json(),
        "tau": float(tau),
        "provenance": dict(provenance or {}),
        **extra,
    }


def save_checkpoint(path: str | os.PathLike, net: LoFAHypernet, catalog: TargetCatalog,
                    condition: ConditionSpec, tau: float = DEFAULT_TAU, provenance: Mapping | None = None,
                    dtype: torch.dtype | None = None, overwrite: bool = False,
                    base_signature: BaseSignature | None = None) -> Path:
    """Write a checkpoint atomically; refuses to replace an existing file unless `overwrite`. `base_signature`
    (lofa_core.base_signature.compute on the training base model) lets the nodes recognise that model."""
    check_consistency(net.stage1.cfg if net.stage1 is not None else None, net.stage2.cfg if net.stage2 else None,
                      catalog, condition, str(path))
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
               for k, v in net.state_dict().items()}
    meta = build_metadata(net, catalog, condition, tau, provenance, base_signature)
    return save_safetensors(tensors, path, {METADATA_KEY: json.dumps(meta)}, overwrite=overwrite)


def read_metadata(path: str | os.PathLike) -> dict:
    """The parsed "lofa" metadata of a checkpoint, with clear errors for unreadable or foreign files."""
    name = Path(path).name
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"'{name}' is not a readable .safetensors file ({err}). It may be truncated or corrupt: download "
            f"or copy it again."
        ) from err
    if raw is None:
        raise CheckpointError(
            f"'{name}' is a .safetensors file but not a LoFA checkpoint (it has no '{METADATA_KEY}' metadata). "
            f"Put LoRA files in models/loras and LoFA checkpoints in models/lofa."
        )
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"'{name}': the LoFA metadata is not valid JSON ({err}); the file is damaged.") from err
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"'{name}': metadata format is {meta.get('format')!r}, expected {FORMAT_NAME!r}.")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"'{name}' uses LoFA checkpoint format version {version}, but this ComfyUI-LoFA reads up to "
            f"version {FORMAT_VERSION}. Update ComfyUI-LoFA."
        )
    return meta


def load_checkpoint(path: str | os.PathLike, dtype: torch.dtype | None = None) -> LoFACheckpoint:
    """Load and validate a checkpoint onto the CPU (callers move it with their device manager)."""
    name = Path(path).name
    meta = read_metadata(path)
    try:
        stage1 = HyperNetConfig.from_json(meta["stage1"]) if meta.get("stage1") else None
        stage2 = HyperNetConfig.from_json(meta["stage2"]) if meta.get("stage2") else None
        catalog = TargetCatalog.from_json(meta["base_model"])
        condition = ConditionSpec.from_json(meta["condition"])
        tau = float(meta.get("tau", (stage1 or stage2).tau))
        signature = BaseSignature.from_json(meta["base_signature"]) if meta.get("base_signature") else None
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"'{name}': the LoFA metadata is incomplete or invalid ({err}).") from err
    check_consistency(stage1, stage2, catalog, condition, name)
    try:
        with torch.device("meta"):
            net = LoFAHypernet(stage1, stage2)
    except ValueError as err:
        raise CheckpointError(f"'{name}': {err}") from err
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    tensors = _read_tensors(path, name, expected)
    net.load_state_dict(tensors, strict=True, assign=True)
    if dtype is not None:
        net.to(dtype)
    net.eval().requires_grad_(False)
    return LoFACheckpoint(net, catalog, condition, tau, name, dict(meta.get("provenance") or {}), signature)


def _read_tensors(path: str | os.PathLike, name: str, expected: Mapping[str, tuple]) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            present = set(fh.keys())
            missing = sorted(set(expected) - present)
            unexpected = sorted(present - set(expected))
            if missing or unexpected:
                parts = []
                if missing:
                    parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
                if unexpected:
                    parts.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[:3]}")
                raise CheckpointError(
                    f"'{name}' does not match the architecture its own metadata describes: {'; '.join(parts)}. "
                    f"The file is damaged or was written by incompatible code."
                )
            out = {}
            for key in expected:
                shape = tuple(fh.get_slice(key).get_shape())
                if shape != expected[key]:
                    raise CheckpointError(
                        f"'{name}': tensor '{key}' has shape {list(shape)}, but the config stored in the file "
                        f"expects {list(expected[key])}. The file is damaged or its metadata was edited."
                    )
                tensor = fh.get_tensor(key)
                if not tensor.is_floating_point():
                    raise CheckpointError(f"'{name}': tensor '{key}' is {tensor.dtype}, expected floating point.")
                if not torch.isfinite(tensor).all():
                    raise CheckpointError(f"'{name}': tensor '{key}' contains NaN or Inf; the checkpoint is "
                                          f"broken (diverged training?).")
                out[key] = tensor
            return out
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"'{name}' could not be read ({err}); it may be truncated. Copy it again.") from err


def check_consistency(stage1: HyperNetConfig | None, stage2: HyperNetConfig | None, catalog: TargetCatalog,
                      condition: ConditionSpec, name: str) -> None:
    """Configs, target list and condition must describe one usable model."""
    problems = []
    for cfg in (stage1, stage2):
        if cfg is None:
            continue
        label = f"stage{cfg.stage}"
        if cfg.num_depths < catalog.num_depths:
            problems.append(f"{label} embeds {cfg.num_depths} depths but the targets span {catalog.num_depths}")
        if cfg.num_types < len(catalog.type_names):
            problems.append(f"{label} embeds {cfg.num_types} types but the targets use {len(catalog.type_names)}")
        if cfg.context_dim != condition.token_dim:
            problems.append(f"{label} takes {cfg.context_dim}-wide condition tokens, condition spec says "
                            f"{condition.token_dim}")
        if cfg.context_dim_2 != condition.second_dim:
            problems.append(f"{label} mixes a second image feature {cfg.context_dim_2} wide, the condition spec "
                            f"says {condition.second_dim}")
        if cfg.pooled_dim != condition.pooled_dim:
            problems.append(f"{label} pooled_dim {cfg.pooled_dim} vs condition {condition.pooled_dim}")
        if cfg.condition != condition.kind:
            problems.append(f"{label} encodes {cfg.condition} conditions, the condition spec says {condition.kind}")
        if condition.kind == "pose" and (cfg.pose_frames, cfg.pose_size) != (condition.frames, condition.frame_size):
            problems.append(f"{label} takes {cfg.pose_frames} frames of {cfg.pose_size}px, the condition spec says "
                            f"{condition.frames} of {condition.frame_size}px")
        for t in catalog.targets:
            if problem := cfg.shape_problem(t.out_features, t.in_features):
                problems.append(f"{label}: {problem} ({t.key})")
                break
    if (stage1 is not None and stage1.stage != 1) or (stage2 is not None and stage2.stage != 2):
        problems.append("stage configs are swapped or mislabelled")
    if stage1 is None and stage2 is None:
        problems.append("it holds neither Stage-I nor Stage-II")
    if not catalog.targets:
        problems.append("the target list is empty")
    if problems:
        raise CheckpointError(f"'{name}' is inconsistent: " + "; ".join(problems) + ".")
