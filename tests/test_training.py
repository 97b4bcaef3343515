"""training/ on the tiny synthetic task suite: the real pipeline (per-task LoRAs trained with the diffusion loss
of a tiny WAN, Stage-I and Stage-II, held-out tasks), run once per session (a few minutes on 2 CPU cores)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import node
from safetensors.torch import load_file

from demo import tiny_wan
from lofa_core.checkpoint import load_checkpoint
from lofa_core.conditioning import prepare_condition
from lofa_core.predict import predict
from training.base_models import load_base_model
from training.dataset import load_embedding, read_samples
from training.plots import read_metrics
from training.suite import run_suite

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def suite(shared_dir):
    with shared_dir("suite") as workdir:  # trained once per scripts/test.sh run, shared by both runtimes' processes
        report = run_suite(workdir, "wan")
    return workdir, report


def losses(run: Path, key: str) -> list[float]:
    return [r[key] for r in read_metrics(run / "metrics.jsonl") if key in r]


def test_losses_go_down(suite):
    workdir, _ = suite
    bce = losses(workdir / "stage1", "bce")
    recon = losses(workdir / "stage2", "recon")
    assert sum(bce[-5:]) / 5 < 0.8 * sum(bce[:2]) / 2, bce
    assert sum(recon[-5:]) / 5 < 0.8 * sum(recon[:2]) / 2, recon
    for run in ("stage1", "stage2"):
        assert (workdir / run / "loss.png").stat().st_size > 1000


def test_held_out_tasks_beat_constant_baselines(suite):
    _, report = suite
    s1, s2 = report["stage1"], report["stage2"]
    assert s1["map_cos"] > s1["mean_map_cos"], s1  # Stage-I vs the training-set mean map
    assert s2["dw_cos"] > s2["mean_lora_dw_cos"], s2  # Stage-II vs the mean training LoRA
    assert s2["diff_pred"] < s2["diff_none"], s2  # the predicted LoRA helps the base model on unseen tasks
    held_out = [s for s in read_samples(Path(report["checkpoint"]).parents[1] / "dataset") if s.split == "val"]
    assert len(held_out) == 6


def test_exported_checkpoint_predicts_through_the_node_graph(suite, comfy, model_dirs):
    import comfy.model_management as mm

    workdir, report = suite
    target = model_dirs.lofa / "suite.safetensors"
    target.write_bytes(Path(report["checkpoint"]).read_bytes())
    ckpt = load_checkpoint(target)
    assert ckpt.trained and ckpt.catalog.family == "wan2.1-t2v" and ckpt.net.stage2 is not None
    base = load_base_model(workdir / "base" / "tiny_wan.safetensors")
    patcher, _ = tiny_wan.build_view_patcher(model=base.model)
    sample = next(s for s in read_samples(workdir / "dataset") if s.split == "val")
    tokens, _ = load_embedding(sample.embedding)
    cond = torch.zeros(1, 512, 4096)
    cond[0, : tokens.shape[0]] = tokens  # what CLIPTextEncode on umT5 hands over
    (handle,) = node(comfy, "LoFAModelLoader").load("suite.safetensors", "float32")
    lora, response = node(comfy, "LoFAPredictLoRA").predict(patcher, handle, [[cond, {}]], "all", 0, 8)
    (patched,) = node(comfy, "LoFAApplyLoRA").apply(patcher, lora, 1.0)
    before = {k: v.clone() for k, v in patcher.model.state_dict().items()}
    mm.load_models_gpu([patched])
    try:
        after = {k: v.clone() for k, v in patcher.model.state_dict().items()}
    finally:
        mm.unload_all_models()
    condition = prepare_condition(cond, None, ckpt.condition)
    expected = predict(ckpt, ckpt.catalog.targets, lambda t: before[t.key], condition, device=torch.device("cpu"),
                       dtype=torch.float32)
    for path, f in expected.lora.factors.items():
        key = f"diffusion_model.{path}.weight"
        torch.testing.assert_close(after[key] - before[key], f.delta(), rtol=1e-4, atol=1e-7)
        assert f.delta().abs().max() > 0
    assert len(response.maps) == len(ckpt.catalog)


def _stage1_cmd(workdir: Path, out: Path, steps: int, extra: list[str] = ()) -> list[str]:
    sets = [f"dataset={workdir / 'dataset'}", f"base_model={workdir / 'base' / 'tiny_wan.safetensors'}",
            f"out={out}", f"steps={steps}", "save_every=3", "log_every=1", "eval_every=1000", "batch_size=2",
            "layers_per_sample=4", 'hypernet={"d_model": 32, "n_heads": 2, "n_blocks": 2, "patch_size": 32, '
            '"rank": 2}', 'optim={"lr": 0.001, "warmup_steps": 2}']
    return [*extra, "-m", "training", "stage1", *[a for s in sets for a in ("--set", s)]]


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                          **kwargs)


def test_ctrl_c_then_resume_continues_identically(suite, tmp_path):
    workdir, _ = suite
    steps = 12
    assert _run(_stage1_cmd(workdir, tmp_path / "straight", steps)).returncode == 0
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, *_stage1_cmd(workdir, tmp_path / "interrupted", steps)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "interrupted" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "interrupted: stage1 saved at step" in err, err[-2000:]
    saved = sorted((tmp_path / "interrupted" / "checkpoints").glob("step_*"))
    assert saved and int(saved[-1].name.split("_")[1]) < steps
    resumed = _run(_stage1_cmd(workdir, tmp_path / "interrupted", steps, []) + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(tmp_path / "straight" / "checkpoints" / f"step_{steps:08d}" / "model.safetensors")
    b = load_file(tmp_path / "interrupted" / "checkpoints" / f"step_{steps:08d}" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"


def test_two_processes_end_with_identical_weights(suite, tmp_path):
    workdir, _ = suite
    out = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd = _stage1_cmd(workdir, out, 4)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launcher, *cmd[cmd.index("-m"):]], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    digests = [(out / f"weights_rank{r}.sha256").read_text() for r in (0, 1)]
    assert digests[0] == digests[1]
    assert json.loads((out / "config.json").read_text())["steps"] == 4


def test_bf16_autocast_keeps_float32_master_weights_and_export_cli(suite, tmp_path):
    workdir, _ = suite
    out = tmp_path / "bf16"
    result = _run(_stage1_cmd(workdir, out, 2) + ["--set", "mixed_precision=bf16"])
    assert result.returncode == 0, result.stderr[-2000:]
    weights = load_file(out / "checkpoints" / "step_00000002" / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in weights.values())
    exported = tmp_path / "exported.safetensors"
    assert _run(["-m", "training", "export", "--stage1", str(out), "--out", str(exported)]).returncode == 0
    assert load_checkpoint(exported).net.stage2 is None
    again = _run(["-m", "training", "export", "--stage1", str(out), "--out", str(exported)])
    assert again.returncode == 1 and "exists" in again.stderr


# pose in the other process than image / image-mix (which share the tiny CLIP vision model they create)
@pytest.mark.parametrize("variant", ["image", pytest.param("pose", marks=pytest.mark.balance_2024), "image-mix"])
def test_image_and_pose_prompts_beat_the_mean_lora_on_held_out_tasks(suite, variant):
    """The same tasks told by a style image (tiny CLIP vision features), by rendered pose frames (3D-conv
    encoder trained with the hypernetwork) or by the image through two CLIP vision models mixed by a gate:
    held-out predictions beat the mean training LoRA, as for text."""
    workdir, _ = suite
    report = run_suite(workdir, "wan", condition=variant)
    s2 = report["stage2"]
    assert s2["dw_cos"] > s2["mean_lora_dw_cos"], s2
    ckpt = load_checkpoint(report["checkpoint"])
    assert ckpt.condition.kind == variant.split("-")[0] and ckpt.trained
    assert ckpt.condition.second_dim == (24 if variant == "image-mix" else 0)
