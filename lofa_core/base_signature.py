"""Which base model a LoFA checkpoint was trained on, beyond shapes.

Shapes and key names do not tell every base model apart: WAN 2.1 T2V 14B and the WAN 2.2 A14B high- and
low-noise experts are identical in both, as are SDXL and its fine-tunes. A LoRA predicted from the wrong one's
weights is wrong. So a checkpoint records a value signature of its training base: the weights at fixed positions
of a few target matrices (first, middle and last block; a self- and a cross-attention projection). Before
predicting, the same positions are read from the MODEL (dequantised, as ComfyUI reads them). A copy of the same
model in another precision differs from the signature by little (fp16/bf16 well under 1 %, scaled fp8 a few %,
GGUF Q4 around 10 %); another model or a fine-tune differs by more than `SAME_MODEL_TOLERANCE`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .errors import ModelFamilyError
from .families import get_family
from .targets import Target, TargetCatalog

VERSION = 1
SAMPLES_PER_MATRIX = 64
SAME_MODEL_TOLERANCE = 0.2


@dataclass(frozen=True)
class BaseSignature:
    """A base model's name in words and its weights at fixed positions of a few target matrices."""

    name: str
    samples: dict[str, list[float]]  # target path -> values at `positions(numel)`

    def to_json(self) -> dict:
        return {"version": VERSION, "name": self.name, "samples_per_matrix": SAMPLES_PER_MATRIX,
                "samples": self.samples}

    @classmethod
    def from_json(cls, data: Mapping) -> BaseSignature:
        if data.get("version") != VERSION or data.get("samples_per_matrix") != SAMPLES_PER_MATRIX:
            raise ValueError(f"base-model signature version {data.get('version')} is not one this ComfyUI-LoFA reads")
        samples = {str(path): [float(v) for v in values] for path, values in dict(data["samples"]).items()}
        if not samples or any(len(v) != SAMPLES_PER_MATRIX for v in samples.values()):
            raise ValueError("the base-model signature has no samples or a wrong number of them")
        return cls(str(data["name"]), samples)


def signature_targets(catalog: TargetCatalog) -> list[Target]:
    """First, middle and last depth; the family's signature types (a self-attention query and a cross-attention
    key) where the catalog has them, else its first and sixth type."""
    depths = {0, catalog.num_depths // 2, catalog.num_depths - 1}
    try:
        names = get_family(catalog.family).signature_types
    except ModelFamilyError:
        names = ()
    types = {catalog.type_names.index(n) for n in names if n in catalog.type_names}
    types = types or {0, min(5, len(catalog.type_names) - 1)}
    return [t for t in catalog.targets if t.depth in depths and t.type_index in types]


def positions(numel: int) -> torch.Tensor:
    """Evenly spaced flat indices: they fall into many different rows and columns of a matrix."""
    return torch.arange(SAMPLES_PER_MATRIX) * (numel - 1) // (SAMPLES_PER_MATRIX - 1)


def _sample(weight: torch.Tensor) -> torch.Tensor:
    flat = weight.reshape(-1)
    return flat[positions(flat.numel()).to(flat.device)].float().cpu()


def compute(catalog: TargetCatalog, read_weight: Callable[[Target], torch.Tensor], name: str) -> BaseSignature:
    """The signature of a base model, from its target weights (real values, e.g. float32)."""
    return BaseSignature(name, {t.path: _sample(read_weight(t)).tolist() for t in signature_targets(catalog)})


def distance(signature: BaseSignature, catalog: TargetCatalog,
             read_weight: Callable[[Target], torch.Tensor]) -> float:
    """Relative L2 distance between the signature and the same positions of another model's weights."""
    by_path = catalog.by_path()
    stored, seen = [], []
    for path, values in signature.samples.items():
        if path in by_path:
            stored.append(torch.tensor(values, dtype=torch.float32))
            seen.append(_sample(read_weight(by_path[path])))
    if not stored:
        return float("inf")
    reference = torch.cat(stored)
    return float((torch.cat(seen) - reference).norm() / reference.norm().clamp_min(1e-30))
