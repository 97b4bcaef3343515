"""The synthetic suite's task grid: a fourth motion adds training tasks without touching the default grid's data."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
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


def test_sdxl_overlay_words_add_a_shape_instead_of_scaling_the_image(tmp_path):
    """With tasks.image_third "overlay" changing the third word changes a clip by the same shape whatever its
    palette and pattern (the words' effects add); with "intensity" it does not (they multiply)."""
    tasks = read_tasks(synthetic.make_tasks(tmp_path, sdxl.NAME, image_third="overlay"))
    assert {t["prompt"].rsplit(" ", 1)[1] for t in tasks} == set(synthetic.OVERLAYS)
    assert not (tmp_path / "latents").exists() and (tmp_path / "latents_overlay").is_dir()

    def change(palette: str, pattern: str, kind: str) -> torch.Tensor:  # framed minus shaded, same clip draws
        clips = [synthetic.make_latents(sdxl.NAME, palette, pattern, third, 2, 0, kind) for third in (0, 1)]
        return clips[0] - clips[1]

    assert torch.allclose(change("pale", "stripes", "overlay"), change("vivid", "rings", "overlay"), atol=1e-5)
    assert not torch.allclose(change("pale", "stripes", "intensity"), change("vivid", "rings", "intensity"),
                              atol=0.1)


def test_wan_refuses_the_image_overlay(tmp_path):
    with pytest.raises(SystemExit, match="image_third .*SDXL only"):
        synthetic.make_tasks(tmp_path, wan.NAME, image_third="overlay")
