"""What a saved LoRA file says about itself: LoFA's own `lofa.*` keys and the SAI model-spec `modelspec.*` keys
that LoRA managers and trainers read (architecture, title, description, date)."""

from __future__ import annotations

import datetime
from collections.abc import Mapping

from . import __version__
from .families import get_family

STRENGTH_HINT = "1.0"  # strength 1 applies exactly the predicted update


def prediction_metadata(*, checkpoint: str, checkpoint_sha256: str, base_model: str, prompt_kind: str,
                        prompt_digest: str, targets: str, layers: int) -> dict[str, str]:
    """Where a predicted LoRA came from (kept with the LORA_MODEL until it is saved)."""
    return {"lofa.checkpoint": checkpoint, "lofa.checkpoint_sha256": checkpoint_sha256,
            "lofa.base_model": base_model, "lofa.prompt_kind": prompt_kind, "lofa.prompt_blake2b": prompt_digest,
            "lofa.targets": f"{targets} ({layers} layers)", "lofa.strength_hint": STRENGTH_HINT}


def averaged_metadata(members: list[Mapping[str, str]]) -> dict[str, str]:
    """Where an average of several predicted LoRAs came from: each field the members disagree on lists theirs,
    joined by " + " (e.g. two checkpoints), and `lofa.averaged_loras` says how many were averaged."""
    keys = [k for k in members[0] if all(k in m for m in members)] if members else []
    out = {}
    for key in keys:
        values = [m[key] for m in members]
        out[key] = values[0] if len(set(values)) == 1 else " + ".join(values)
    return {**out, "lofa.averaged_loras": str(len(members))}


def file_metadata(prediction: Mapping[str, str], *, family: str, rank: int, key_style: str,
                  title: str) -> dict[str, str]:
    """All string metadata of a saved LoRA file (`prediction` may be empty: a LORA_MODEL from another node)."""
    base = prediction.get("lofa.base_model", "")
    architecture, implementation = get_family(family).modelspec(base)
    if "lofa.checkpoint" in prediction:
        averaged = prediction.get("lofa.averaged_loras")
        description = (f"The average of {averaged} LoRAs predicted" if averaged else "Predicted in one forward pass")
        description += (f" by the LoFA checkpoint {prediction['lofa.checkpoint']} from a "
                       f"{prediction['lofa.prompt_kind']} prompt, for {base}. Use at strength "
                       f"{prediction['lofa.strength_hint']}.")
    else:
        description = "A LoRA saved by ComfyUI-LoFA."
    return {
        **prediction,
        "lofa.generator": f"ComfyUI-LoFA {__version__}", "lofa.family": family, "lofa.rank": str(rank),
        "lofa.key_style": key_style,
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": architecture,
        "modelspec.implementation": implementation, "modelspec.title": title,
        "modelspec.description": description,
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
    }
