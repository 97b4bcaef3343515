"""Averaged training targets: more than one LoRA per training task, averaged into one target dW.

A task's LoRA is one noisy draw of what the task does: of the clips it was trained on and of its run (on the
text suite that noise is 8.7 % of a LoRA's task-specific energy, `structure.py`). A predictor that fits single
draws fits their noise too; the mean of k LoRAs of the same task, each trained by the recipe of the noise
ceiling (`ceiling.py`: newly drawn clips, other seeds), holds 1/k of it. The average is stored as one LoRA of
k times the rank (factors side by side, the up factors divided by k), so its dW is the mean exactly and every
reader of LoRA files takes it as it is. Held-out tasks keep their single ground-truth LoRA: what is scored does
not change, only what is learnt from.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from lofa_core.fileio import save_safetensors
from lofa_core.lora_formats import STYLE_COMFYUI, LoRAFactors, PredictedLoRA, to_state_dict

from .config import BuildConfig
from .dataset import Sample, SampleStore, read_records, read_samples
from .encoding import write_metadata


def select_tasks(tasks: Path, out: Path, held_out: bool) -> Path:
    """The held-out (`val`, `test`) or the training lines of a tasks.jsonl, with latents paths made absolute."""
    lines = []
    for line in tasks.read_text().splitlines():
        if line.strip():
            task = json.loads(line)
            if (task.get("split", "train") != "train") == held_out:
                task["latents"] = str((tasks.parent / task["latents"]).resolve())
                lines.append(json.dumps(task))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(f"{line}\n" for line in lines))
    return out


def replicate_build(build: BuildConfig, tasks: Path, out: Path, replicate: int = 1) -> BuildConfig:
    """The `replicate`-th extra LoRA of every task in `tasks` (give it newly drawn clips): the same recipe as
    another run, seeds shifted by `replicate` (1 is the noise ceiling's run)."""
    return dataclasses.replace(build, tasks=str(tasks), out=str(out), seed=build.seed + replicate,
                               init_seed=build.init_seed + replicate)


def mean_factors(loras: list[dict[str, LoRAFactors]]) -> dict[str, LoRAFactors]:
    """One LoRA whose dW is exactly the mean of the given LoRAs' dWs (ranks add up)."""
    k = len(loras)
    out = {}
    for path in loras[0]:
        ups = [lora[path].scale * lora[path].up.float() for lora in loras]
        downs = [lora[path].down.float() for lora in loras]
        out[path] = LoRAFactors(torch.cat(ups, dim=1) / k, torch.cat(downs, dim=0), 1.0)
    return out


Replicates = list[tuple[SampleStore, dict[str, Sample]]]


def load_replicates(folders: list[str] | list[Path], store: SampleStore, train: list[Sample]) -> Replicates:
    """Each replicate folder's samples by task group; every training task must have its LoRA in every folder."""
    out = []
    for folder in folders:
        other = SampleStore(folder, read_samples(folder), store.catalog, store.spec)
        groups = {s.group: s for s in other.samples}
        missing = [s.group for s in train if s.group not in groups]
        if missing:
            raise SystemExit(f"replicate dataset {folder} has no LoRA for {len(missing)} training task(s), e.g. no "
                             f"LoRA of group {missing[0]!r} in {folder}: build it from the same tasks "
                             "(training/replicates.py) or leave it out")
        out.append((other, groups))
    return out


def averaged_dataset(dataset: Path, replicates: list[Path], out: Path, store: SampleStore) -> Path:
    """A dataset folder like `dataset` whose training samples' LoRAs are the mean of their own LoRA and the same
    group's LoRA in each of `replicates`; everything else (held-out LoRAs, latents, conditions) is `dataset`'s,
    referenced, not copied."""
    others = load_replicates(replicates, store, store.split("train"))  # all checked before anything is written
    rel = Path("..") / dataset.name
    (out / "loras").mkdir(parents=True, exist_ok=True)
    records = []
    for rec, listed in zip(read_records(dataset), read_samples(dataset), strict=True):
        rec, sample = json.loads(json.dumps(rec)), store.by_id[listed.id]
        for key in ("lora", "latents"):
            if rec.get(key):
                rec[key] = str(rel / rec[key])
        for part, keys in (("condition", ("embedding", "embedding_2", "frames", "image")), ("caption", ("embedding",))):
            for key in keys:
                if (rec.get(part) or {}).get(key):
                    rec[part][key] = str(rel / rec[part][key])
        if sample.split == "train":
            loras = [store.factors(sample)] + [other.factors(groups[sample.group]) for other, groups in others]
            name = f"loras/{sample.group}.safetensors"
            save_safetensors(to_state_dict(PredictedLoRA(store.catalog.family, mean_factors(loras)), STYLE_COMFYUI),
                             out / name, overwrite=True)
            rec["lora"] = name
        records.append(rec)
    write_metadata(out, records)
    return out
