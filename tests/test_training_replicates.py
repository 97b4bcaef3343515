"""Averaged training targets (`training/replicates.py`): the mean of several LoRAs per training task, exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lofa_core.families.wan import TEXT_CONDITION as WAN_TEXT
from lofa_core.fileio import save_safetensors
from lofa_core.lora_formats import STYLE_COMFYUI, LoRAFactors, PredictedLoRA, to_state_dict
from lofa_core.targets import Target, TargetCatalog
from training.dataset import SampleStore, read_samples
from training.replicates import averaged_dataset, mean_factors

CATALOG = TargetCatalog("wan2.1-t2v", ("self_attn.q",), 1, ("attn",), (Target("blocks.0.self_attn.q", 6, 5, 0, 0),))
PATH = "blocks.0.self_attn.q"


def _dataset(folder: Path, groups: dict[str, str], seed: int) -> None:
    """A dataset folder: one random rank-2 LoRA (scale 0.5) per group, with the given splits."""
    gen = torch.Generator().manual_seed(seed)
    (folder / "loras").mkdir(parents=True)
    records = []
    for group, split in groups.items():
        factors = {PATH: LoRAFactors(torch.randn(6, 2, generator=gen), torch.randn(2, 5, generator=gen), 0.5)}
        save_safetensors(to_state_dict(PredictedLoRA("wan2.1-t2v", factors), STYLE_COMFYUI),
                         folder / "loras" / f"{group}.safetensors")
        records.append({"id": group, "group": group, "split": split, "lora": f"loras/{group}.safetensors",
                        "latents": f"latents/{group}.safetensors",
                        "condition": {"kind": "text", "prompt": f"a {group}", "embedding": f"conditions/{group}.st"}})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _store(folder: Path) -> SampleStore:
    return SampleStore(folder, read_samples(folder), CATALOG, WAN_TEXT)


def test_mean_factors_is_the_mean_of_the_deltas():
    gen = torch.Generator().manual_seed(0)
    loras = [{PATH: LoRAFactors(torch.randn(6, r, generator=gen), torch.randn(r, 5, generator=gen), s)}
             for r, s in ((2, 0.5), (3, 2.0), (4, 1.0))]
    mean = mean_factors(loras)[PATH]
    assert mean.rank == 9
    torch.testing.assert_close(mean.delta(), sum(lora[PATH].delta() for lora in loras) / 3, rtol=1e-5, atol=1e-6)


def test_training_tasks_get_the_mean_and_held_out_tasks_keep_their_own_lora(tmp_path):
    _dataset(tmp_path / "dataset", {"a": "train", "b": "train", "c": "test"}, seed=1)
    _dataset(tmp_path / "replicate", {"a": "train", "b": "train"}, seed=2)
    original, replicate = _store(tmp_path / "dataset"), _store(tmp_path / "replicate")
    out = averaged_dataset(tmp_path / "dataset", [tmp_path / "replicate"], tmp_path / "dataset_mean2", original)

    averaged = _store(out)
    for group in ("a", "b"):
        expected = (original.delta(original.by_id[group], PATH) + replicate.delta(replicate.by_id[group], PATH)) / 2
        torch.testing.assert_close(averaged.delta(averaged.by_id[group], PATH), expected, rtol=1e-5, atol=1e-6)
    held_out = averaged.by_id["c"]
    assert held_out.split == "test"
    assert held_out.lora.resolve() == (tmp_path / "dataset" / "loras" / "c.safetensors").resolve()
    assert torch.equal(averaged.delta(held_out, PATH), original.delta(original.by_id["c"], PATH))
    # latents and prompt caches are the original dataset's files, referenced, not copied
    assert averaged.by_id["a"].latents.resolve() == (tmp_path / "dataset" / "latents" / "a.safetensors").resolve()
    assert averaged.by_id["a"].embedding.resolve() == (tmp_path / "dataset" / "conditions" / "a.st").resolve()


def test_a_training_task_missing_from_a_replicate_is_named(tmp_path):
    _dataset(tmp_path / "dataset", {"a": "train", "b": "train"}, seed=1)
    _dataset(tmp_path / "replicate", {"a": "train"}, seed=2)
    with pytest.raises(SystemExit, match="no LoRA of group 'b' in .*replicate"):
        averaged_dataset(tmp_path / "dataset", [tmp_path / "replicate"], tmp_path / "out", _store(tmp_path / "dataset"))
