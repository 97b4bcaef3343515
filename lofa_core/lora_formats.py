"""LoRA representations: the predicted factors, ComfyUI's LORA_MODEL dict, files stock loaders read.

Scale convention. A predicted update is dW = scale * up @ down with up = B [out, r], down = A [r, in] and
scale = the hypernetwork's alpha (no rank scaling). ComfyUI applies `(alpha_stored / r) * up @ down`, so
LORA_MODEL dicts store `alpha_stored = scale * r`; patches carry the same value. Files fold the scale into the
factors and store alpha 1 (see `to_file_state_dict`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .errors import LoRAFormatError
from .families import FAMILIES
from .lora_keys import STYLE_COMFYUI, lora_base_name
from .targets import strip_model_prefix

# (up suffix, down suffix) pairs in the order ComfyUI checks them.
_PAIR_SUFFIXES = (
    (".lora_up.weight", ".lora_down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora_B.default.weight", ".lora_A.default.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
)
_EXTRA_PREFIXES = ("base_model.model.", "transformer.", "unet.")


@dataclass
class LoRAFactors:
    """One target's update: dW = scale * up @ down."""

    up: torch.Tensor  # [out, r]
    down: torch.Tensor  # [r, in]
    scale: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> torch.Tensor:
        return self.scale * (self.up.float() @ self.down.float())


@dataclass
class PredictedLoRA:
    """A whole LoRA keyed by module path inside the diffusion model (e.g. "blocks.0.self_attn.q")."""

    family: str
    factors: dict[str, LoRAFactors]

    def __len__(self) -> int:
        return len(self.factors)


class LoRAModel(dict):
    """A LORA_MODEL: ComfyUI's plain dict of tensors (what every stock node sees), plus `metadata`, where the
    LoRA came from (written into the file by LoFA Save LoRA)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(tensors)
        self.metadata = dict(metadata or {})


def to_lora_model(lora: PredictedLoRA, dtype: torch.dtype | None = None,
                  metadata: Mapping[str, str] | None = None) -> LoRAModel:
    """ComfyUI LORA_MODEL dict: `diffusion_model.<path>.lora_up.weight`, `.lora_down.weight`, `.alpha`."""
    return LoRAModel(to_state_dict(lora, STYLE_COMFYUI, dtype), metadata)


def average_loras(loras: Sequence[PredictedLoRA]) -> PredictedLoRA:
    """The LoRA whose every update is the mean of the given LoRAs' updates, exactly: their factors side by side
    (rank = the sum of their ranks), each up scaled by its scale / n. Averaging the LoRAs of several LoFA models
    (an ensemble) lowers each model's own error the way averaging several training runs lowers run noise."""
    if not loras:
        raise ValueError("average_loras needs at least one LoRA")
    family, paths = loras[0].family, list(loras[0].factors)
    for i, lora in enumerate(loras[1:], 1):
        if lora.family != family or set(lora.factors) != set(paths):
            missing = sorted(set(paths) ^ set(lora.factors))[:3]
            raise LoRAFormatError(f"LoRA {i} cannot be averaged with LoRA 0: it is for {lora.family} (LoRA 0: "
                                  f"{family}) or targets other layers ({', '.join(missing) or 'none differ'}); "
                                  f"average only LoRAs of checkpoints trained for the same base model and targets")
    n = len(loras)
    factors = {}
    for path in paths:
        parts = [lora.factors[path] for lora in loras]
        factors[path] = LoRAFactors(torch.cat([f.up.float() * (f.scale / n) for f in parts], dim=1),
                                    torch.cat([f.down.float() for f in parts], dim=0), 1.0)
    return PredictedLoRA(family, factors)


def fold_scale(f: LoRAFactors) -> LoRAFactors:
    """The same update with scale 1/rank: the factor `scale * rank` moved into up and down, balanced so both get
    the same norm (good for fp16 storage and for training on from them)."""
    target = f.scale * f.rank
    up, down = f.up.float(), f.down.float()
    up_norm, down_norm = up.norm().item(), down.norm().item()
    if target == 0 or up_norm == 0 or down_norm == 0:
        return LoRAFactors(up * target, down, 1.0 / f.rank)
    balance = math.sqrt(abs(target) * down_norm / up_norm)
    return LoRAFactors(up * math.copysign(balance, target), down * (abs(target) / balance), 1.0 / f.rank)


def to_file_state_dict(lora: PredictedLoRA, style: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a LoRA file that every reader applies identically: the scale folded into the factors, alpha 1.

    ComfyUI's LoRA loaders read `<name>.alpha` (scale alpha / rank), but Train LoRA's `existing_lora` reads
    `<name>.weight.alpha` and otherwise uses 1: only alpha 1 means the same update to both (and to the 2024
    loaders and other tools, which read `.alpha`).
    """
    return to_state_dict(PredictedLoRA(lora.family, {p: fold_scale(f) for p, f in lora.factors.items()}), style,
                         dtype)


def to_state_dict(lora: PredictedLoRA, style: str = STYLE_COMFYUI,
                  dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """File/LORA_MODEL tensors in the chosen key style; `alpha` stored as scale * rank (float32 scalar)."""
    out: dict[str, torch.Tensor] = {}
    for path, f in lora.factors.items():
        base = lora_base_name(path, style)
        up, down = f.up.detach(), f.down.detach()
        if dtype is not None:
            up, down = up.to(dtype), down.to(dtype)
        out[f"{base}.lora_up.weight"] = up.contiguous().cpu()
        out[f"{base}.lora_down.weight"] = down.contiguous().cpu()
        out[f"{base}.alpha"] = torch.tensor(f.scale * f.rank, dtype=torch.float32)
    return out


def read_lora_state_dict(sd: Mapping[str, torch.Tensor], module_paths: Iterable[str] | None,
                         source: str = "the LoRA") -> tuple[dict[str, LoRAFactors], list[str]]:
    """Parse a LoRA state dict in any common naming into factors keyed by this model's module paths.

    Understands lora_up/lora_down(+alpha), lora_A/lora_B (PEFT, diffusion-pipe), ComfyUI's
    `diffusion_model.` prefix or none, `transformer.`/`base_model.model.` prefixes, kohya `lora_unet_`
    names and diffusers WAN names (attn1.to_q, ...). Returns (factors, keys that matched no target). With
    `module_paths` None any `diffusion_model.`-style name is accepted as is (kohya names then stay unresolved).
    """
    known = set(module_paths) if module_paths is not None else None
    by_kohya = {p.replace(".", "_"): p for p in known or ()}
    factors: dict[str, LoRAFactors] = {}
    used: set[str] = set()
    for key in sd:
        for up_suffix, down_suffix in _PAIR_SUFFIXES:
            if not key.endswith(up_suffix):
                continue
            base = key[: -len(up_suffix)]
            down_key = base + down_suffix
            if down_key not in sd:
                raise LoRAFormatError(f"{source}: '{key}' has no matching '{down_key}'.")
            path = _resolve_path(base, known, by_kohya)
            if path is None:
                break
            up, down = sd[key], sd[down_key]
            if up.dim() != 2 or down.dim() != 2 or up.shape[1] != down.shape[0]:
                raise LoRAFormatError(f"{source}: '{key}' {list(up.shape)} and '{down_key}' {list(down.shape)} "
                                      f"are not a LoRA pair of a linear layer ([out, r] and [r, in]).")
            alpha_key = base + ".alpha"
            if down.shape[0] == 0:
                raise LoRAFormatError(f"{source}: '{key}' has rank 0 (no columns), so its "
                                      f"{'alpha cannot be scaled by the rank and ' if alpha_key in sd else ''}"
                                      f"the LoRA is empty. Predict or save it again with rank 1 or more.")
            scale = 1.0
            if alpha_key in sd:
                scale = float(sd[alpha_key]) / down.shape[0]
                used.add(alpha_key)
            factors[path] = LoRAFactors(up, down, scale)
            used.update((key, down_key))
            break
    leftovers = [k for k in sd if k not in used]
    return factors, leftovers


def _resolve_path(base: str, known: set[str] | None, by_kohya: Mapping[str, str]) -> str | None:
    if base.startswith("lora_unet_"):
        return by_kohya.get(base[len("lora_unet_"):])
    rel = strip_model_prefix(base)
    for prefix in _EXTRA_PREFIXES:
        if rel.startswith(prefix):
            rel = rel[len(prefix):]
            break
    if known is None:
        return rel
    if rel in known:
        return rel
    for family in FAMILIES:  # other tools' names for the same module (diffusers WAN: attn1.to_q)
        converted = family.to_module_path(rel)
        if converted in known:
            return converted
    return None


def check_lora_shapes(factors: Mapping[str, LoRAFactors], shapes: Mapping[str, tuple[int, int]],
                      source: str) -> None:
    """Raise if a LoRA pair does not fit the weight it patches."""
    for path, f in factors.items():
        out_f, in_f = shapes[path]
        if f.up.shape[0] != out_f or f.down.shape[1] != in_f:
            raise LoRAFormatError(
                f"{source}: the LoRA for '{path}' is {f.up.shape[0]}x{f.down.shape[1]} but the model's weight is "
                f"{out_f}x{in_f}. This LoRA was made for a different base model."
            )


def check_finite(factors: Mapping[str, LoRAFactors], source: str) -> None:
    """Raise if any factor or scale is NaN/Inf: such a LoRA turns every image it touches black."""
    for path, f in factors.items():
        for label, x in (("lora_up", f.up), ("lora_down", f.down)):
            if not torch.isfinite(x).all():
                raise LoRAFormatError(f"{source}: {label} of '{path}' contains NaN or Inf values, so the LoRA would "
                                      f"break the model. Predict it again (see the log of LoFA Predict LoRA).")
        if not math.isfinite(f.scale):
            raise LoRAFormatError(f"{source}: the alpha of '{path}' is {f.scale}; the LoRA is broken.")


def check_fits_dtype(factors: Mapping[str, LoRAFactors], dtype: torch.dtype, source: str, fix: str) -> None:
    """Raise if a factor would turn into Inf when stored as `dtype` (float16 ends at 65504), or its stored alpha
    (float32) would."""
    limit = torch.finfo(dtype).max
    alpha_limit = torch.finfo(torch.float32).max
    for path, f in factors.items():
        for label, x in (("lora_up", f.up), ("lora_down", f.down)):
            largest = float(x.abs().max()) if x.numel() else 0.0
            if largest > limit:
                raise LoRAFormatError(f"{source}: {label} of '{path}' has values up to {largest:.3g}, beyond "
                                      f"{str(dtype).removeprefix('torch.')}'s range (+-{limit:.6g}); {fix}.")
        if abs(f.scale * f.rank) > alpha_limit:
            raise LoRAFormatError(f"{source}: the alpha of '{path}' ({f.scale * f.rank:.3g}) does not fit float32.")
