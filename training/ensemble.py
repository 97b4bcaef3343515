"""Held-out scores of one LoFA checkpoint, or of several whose LoRAs are averaged (an ensemble).

`python -m training evaluate --config RUN.json --checkpoint A.safetensors [--checkpoint B.safetensors ...]`
scores the checkpoints' averaged prediction exactly as a run scores itself after its last step (same tasks,
baselines, latents and noise), so a figure printed here is comparable with the run's own. In ComfyUI the same
average is two predicted LoRAs applied at strength 1/2 each.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from lofa_core.checkpoint import LoFACheckpoint, load_checkpoint
from lofa_core.fileio import publish_new_file
from lofa_core.lora_formats import average_loras
from lofa_core.targets import check_compatible

from .config import RunConfig
from .evaluate import predict_task, score_splits

SPLITS = ("val", "test")


def load_members(paths: Sequence[str | Path]) -> list[LoFACheckpoint]:
    """The checkpoints, checked to be interchangeable: same targets and condition input. (Their response
    thresholds may differ a little - a single-stage run sets its own from its data - and the maps are scored
    with the first checkpoint's.)"""
    if not paths:
        raise SystemExit("give at least one --checkpoint")
    members = [load_checkpoint(p) for p in paths]
    first = members[0]
    for path, m in zip(paths[1:], members[1:]):
        check_compatible(m.catalog, first.catalog, str(path))
        if m.condition != first.condition:
            raise SystemExit(f"{path} reads another condition ({m.condition}) than {paths[0]} ({first.condition}); "
                             f"average only checkpoints trained on the same kind of prompt")
    return members


def evaluate_checkpoints(run: RunConfig, paths: Sequence[str | Path], splits: Sequence[str] = SPLITS,
                         device: torch.device | None = None) -> dict[str, dict[str, float]]:
    """{split: metrics} of the checkpoints' averaged LoRA (their averaged Stage-I maps, where they have Stage-I)
    on the run's held-out tasks."""
    from .base_models import load_base_model
    from .runs import Data

    for split in splits:
        if split not in SPLITS:
            raise SystemExit(f"unknown split {split!r}: use val or test")
    members = load_members(paths)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = Data(run, need_latents=True, spec=members[0].condition, catalog=members[0].catalog)
    base = load_base_model(run.base_model, run.target_groups).to(device)
    base.shift = run.flow_shift
    weights = data.on(device)
    for m in members:
        m.net.to(device).eval()

    def predictor(sample):
        predictions = [predict_task(m, data.store, sample, weights, device) for m in members]
        maps = [p[0] for p in predictions if p[0] is not None]
        loras = [p[1] for p in predictions if p[1] is not None]
        mean_maps = {path: sum(m[path] for m in maps) / len(maps) for path in maps[0]} if maps else None
        return mean_maps, average_loras(loras) if loras else None

    return score_splits(run, data, weights, base, predictor, members[0].tau, splits)


def write_scores(scores: dict, paths: Sequence[str | Path], out: Path, overwrite: bool = False) -> None:
    """Atomically, and never over an existing file unless `overwrite`."""
    text = json.dumps({"checkpoints": [str(p) for p in paths], **scores}, indent=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    publish_new_file(out, lambda tmp: Path(tmp).write_text(text), overwrite=overwrite)
