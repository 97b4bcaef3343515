"""The demo's handling of --checkpoint and of its cached training: the file given is the file used, bad input
gets one line that says what to do, and a second run does not claim to train."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import tiny_wan
from test_comfy_sdxl import make_checkpoint
from test_wan import wan_checkpoint

import demo.__main__ as demo_main


def run_demo(capsys, *argv) -> tuple[int, list[str]]:
    try:
        code = demo_main.main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("name,message", [
    ("missing.safetensors", "missing.safetensors: no such file"),
    ("stage2_preview.pth", "is a PyTorch .pth file .*convert it first: python -m lofa_core.convert_official"),
    ("folder", "is not a file"),
    ("weights.ckpt", "is not a .safetensors file"),
])
def test_unusable_checkpoint_argument_is_one_line_before_anything_runs(tmp_path, capsys, name, message):
    import re

    (tmp_path / "stage2_preview.pth").write_bytes(b"not used")
    (tmp_path / "weights.ckpt").write_bytes(b"not used")
    (tmp_path / "folder").mkdir()
    code, lines = run_demo(capsys, "--checkpoint", str(tmp_path / name), "--workdir", str(tmp_path / "work"))
    assert code == 2 and len(lines) == 1 and lines[0].startswith("python -m demo: error: --checkpoint"), lines
    assert re.search(message, lines[-1]) and "truncated or corrupt" not in lines[-1]
    assert not (tmp_path / "work").exists(), "nothing may be prepared for a checkpoint that cannot be used"


def test_a_checkpoint_that_does_not_fit_is_one_line(comfy, tmp_path, capsys):
    cut = tmp_path / "cut.safetensors"
    make_checkpoint(comfy, comfy.tiny_sdxl.build_model(seed=0), tmp_path / "good.safetensors")
    cut.write_bytes((tmp_path / "good.safetensors").read_bytes()[:300])
    code, lines = run_demo(capsys, "--checkpoint", str(cut), "--workdir", str(tmp_path / "work"))
    assert code == 1 and len(lines) == 1 and "'cut.safetensors'" in lines[0] and "truncated or corrupt" in lines[0]
    wan_patcher, _ = tiny_wan.build_view_patcher(seed=0)
    wan_checkpoint(wan_patcher, tmp_path / "wan.safetensors")
    code, lines = run_demo(capsys, "--checkpoint", str(tmp_path / "wan.safetensors"), "--workdir",
                           str(tmp_path / "work"))
    assert code == 1 and len(lines) == 1 and "trained for WAN 2.1 T2V" in lines[0], lines


def test_the_given_checkpoint_is_used_not_an_older_copy_of_the_same_name(comfy, tmp_path):
    root = tmp_path / "comfyui"
    model = comfy.tiny_sdxl.build_model(seed=0)
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    v1, v2 = tmp_path / "v1" / "mine.safetensors", tmp_path / "v2" / "mine.safetensors"
    make_checkpoint(comfy, model, v1, seed=1)
    make_checkpoint(comfy, model, v2, seed=2)
    assert v1.read_bytes() != v2.read_bytes()
    lofa_dir = root / "models" / "lofa"
    first = demo_main.build_models(root, tmp_path, v1, False).lofa
    second = demo_main.build_models(root, tmp_path, v2, False).lofa
    assert (lofa_dir / first).read_bytes() == v1.read_bytes(), "the older copy is never replaced"
    assert second != first and (lofa_dir / second).read_bytes() == v2.read_bytes()
    assert demo_main.build_models(root, tmp_path, v2, False).lofa == second
    assert demo_main.build_models(root, tmp_path, v1, False).lofa == first
    assert len(list(lofa_dir.iterdir())) == 2


def test_a_cached_second_run_does_not_say_it_is_training(comfy, tmp_path, capsys, monkeypatch):
    """The suite itself is too slow for this test: a stand-in with the suite's caching (it writes its checkpoint
    once, like `run_suite` on unchanged settings) shows what the demo says around it."""
    import training.suite

    calls = []

    def suite_once(workdir: Path, family, base_model, text_encoder, overrides, **options):
        assert options == {"ablation": False, "adaptation": False}, "the demo trains only what it uses"
        calls.append(overrides)
        out = workdir / "stage2" / "lofa.safetensors"
        if not out.exists():
            out.parent.mkdir(parents=True)
            make_checkpoint(comfy, comfy.tiny_sdxl.build_model(seed=0), out, seed=3)
        return {"checkpoint": str(out), "base_model": base_model}

    monkeypatch.setattr(training.suite, "run_suite", suite_once)
    root = tmp_path / "comfyui"
    models = demo_main.build_models(root, tmp_path, None, False)
    assert (models.lofa, models.trained, models.base) == (demo_main.TRAINED, True, demo_main.TRAINED_BASE)
    first = capsys.readouterr().out
    assert "training LoFA on the synthetic task suite" in first
    assert demo_main.build_models(root, tmp_path, None, False).lofa == demo_main.TRAINED
    second = capsys.readouterr().out
    assert "training LoFA" not in second and "using the LoFA checkpoint trained on an earlier run" in second
    assert len(calls) == 2 and calls[0] == demo_main.DEMO_TRAINING
    trained = root / "models" / "lofa" / demo_main.TRAINED
    assert trained.read_bytes() == (tmp_path / "train" / "stage2" / "lofa.safetensors").read_bytes()
