"""The synthetic suite's task grid: a fourth motion adds training tasks without touching the default grid's data."""

from __future__ import annotations

from collections import Counter

import pytest
from safetensors.torch import load_file

from lofa_core.families import sdxl, wan
from training import synthetic
from training.lora_builder import read_tasks


def test_a_fourth_motion_adds_one_training_example_per_palette_pattern_pair(tmp_path):
    three = read_tasks(synthetic.make_tasks(tmp_path / "three", wan.NAME))
    four = read_tasks(synthetic.make_tasks(tmp_path / "four", wan.NAME, motions=4))
    assert len(four) == len(three) // 3 * 4
    held_out = {t["group"]: t["split"] for t in three if t["split"] != "train"}
    assert {t["group"]: t["split"] for t in four if t["split"] != "train"} == held_out
    pairs = Counter(t["group"].rsplit("_", 1)[0] for t in four if t["split"] == "train")
    for group in held_out:
        assert pairs[group.rsplit("_", 1)[0]] == 3, group  # its other three motions
    fading = [t for t in four if t["group"].endswith("_3")]
    assert fading and all(t["prompt"].endswith("that is fading") for t in fading)
    # the groups both grids share keep their clips bit for bit, so the default suite's figures stay reproducible
    for task in three:
        a = load_file(tmp_path / "three" / task["latents"])
        b = load_file(tmp_path / "four" / task["latents"])
        assert all(a[k].equal(b[k]) for k in a), task["group"]


@pytest.mark.parametrize("family, motions", [(wan.NAME, 5), (wan.NAME, 2), (sdxl.NAME, 4)])
def test_an_impossible_motion_count_is_refused_with_the_range_to_use(tmp_path, family, motions):
    with pytest.raises(SystemExit, match=r"tasks\.motions is .*use 3 to"):
        synthetic.make_tasks(tmp_path, family, motions=motions)
