"""training/ on the tiny synthetic task suite: the real pipeline (a tiny WAN taught the domain, per-task LoRAs
trained with its flow-matching loss, Stage-I and Stage-II, held-out test tasks), run once per session with the
suite's settings shortened for CI (the full figures in the README come from `python -m training suite`)."""

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
from safetensors.torch import load_file
from support import tiny_wan
from support.comfy_nodes import node

from lofa_core.checkpoint import load_checkpoint
from lofa_core.conditioning import prepare_text_condition
from lofa_core.lora_formats import read_lora_state_dict
from lofa_core.predict import predict
from training.base_models import load_base_model
from training.dataset import load_embedding, read_samples
from training.plots import read_metrics
from training.suite import SMALL_GRID, run_suite

REPO = Path(__file__).resolve().parent.parent
# The suite shortened to a few minutes on 2 CPU cores (every stage runs; fewer tasks and steps).
CI_SUITE = [f"tasks={json.dumps(SMALL_GRID)}",
            "base.steps=300", "build.steps=150", "stage1.steps=200", "text.stage1.steps=200", "stage1.eval_every=200",
            "stage1.log_every=5",
            "stage2.steps=300", "stage2.batch_size=2", "stage2.eval_every=300", "stage2.log_every=5",
            "single_stage.steps=20", "adaptation.eval_every=25", "loras_per_task=2",
            # a 200-step Stage-I at the text suite's 20 % gives Stage-II a trunk it barely leaves in 300 steps
            # (training reconstruction 0.96 of a zero LoRA's, 0.78 at 35 %); at full length 20 % starts it faster
            "text.stage1.response_fraction=0.35",
            # the text suite averages three Stage-II models; two show the same (member seeds, configs, scoring)
            "text.stage2_members=2"]
CI_VARIANTS = [f"{v}.{stage}.steps={n}" for v in ("image", "pose", "image-mix")
               for stage, n in (("stage1", 60), ("stage2", 100))] + [
    "pose.loras_per_task=2"]  # pose learns from averaged LoRAs (3 in the suite); CI trains 2 per task


@pytest.fixture(scope="session")
def suite(shared_dir):
    with shared_dir("suite") as workdir:  # trained once per scripts/test.sh run, shared by both runtimes' processes
        report = run_suite(workdir, "wan", overrides=CI_SUITE + CI_VARIANTS, jobs=2)  # LoRA sets, ablation beside
    return workdir, report


def losses(run: Path, key: str) -> list[float]:
    return [r[key] for r in read_metrics(run / "metrics.jsonl") if key in r]


def test_losses_go_down(suite):
    workdir, _ = suite
    bce = losses(workdir / "stage1", "bce")
    recon = losses(workdir / "stage2", "recon")
    assert sum(bce[-5:]) / 5 < 0.8 * sum(bce[:2]) / 2, bce
    # Stage-II's normalised L1 starts at 1 (a zero LoRA); the CI run is short (300 steps of 2), so less than 0.8
    assert sum(recon[-5:]) / 5 < 0.85 * sum(recon[:2]) / 2, recon
    for run in ("stage1", "stage2"):
        assert (workdir / run / "loss.png").stat().st_size > 1000


def test_ground_truth_loras_are_task_specific(suite):
    """The data can show learning: most of each LoRA is its own (not the part all LoRAs share), and each test
    task's own LoRA is the best of all test tasks' LoRAs on its held-out clips."""
    _, report = suite
    assert report["data"]["shared_energy"] < 0.4, report["data"]
    assert report["stage2"]["test"]["gt_own_task_best"] >= 0.8, report["stage2"]["test"]
    assert report["data"]["test_tasks"] == 6 and report["data"]["val_tasks"] == 6
    assert report["stage2"]["test"]["latents_held_out"] == 1.0


def test_stage2_learns_from_the_mean_of_two_loras_per_training_task(suite):
    """The text suite's Stage-II trains on the mean of each training task's LoRA and a second LoRA of the task
    (fresh clips, another run); held-out tasks keep their own LoRA, so what is scored does not change."""
    from training.config import Stage2Config, load_config
    from training.dataset import SampleStore
    from training.runs import Data

    workdir, report = suite
    assert report["data"]["loras_per_task"] == 2
    run = load_config(Stage2Config, workdir / "configs" / "stage2.json")
    assert Path(run.dataset) == workdir / "dataset_mean2"
    averaged = Data(run, need_latents=False)
    first = Data(load_config(Stage2Config, workdir / "configs" / "stage2.json", [f"dataset={workdir / 'dataset'}"]),
                 need_latents=False).store
    folder = workdir / "dataset_train_replicate1"
    second = SampleStore(folder, read_samples(folder), averaged.catalog, averaged.spec)
    by_group = {s.group: s for s in second.samples}
    assert set(by_group) == {s.group for s in first.split("train")}  # every training task, no held-out one
    path = averaged.catalog.targets[0].path
    sample = averaged.train[0]
    one, two = first.delta(first.by_id[sample.id], path), second.delta(by_group[sample.group], path)
    torch.testing.assert_close(averaged.store.delta(sample, path), (one + two) / 2, rtol=1e-5, atol=1e-8)
    assert float((one - two).norm()) > 0.05 * float(one.norm())  # another run, not a copy
    test = averaged.test[0]
    assert torch.equal(averaged.store.delta(test, path), first.delta(first.by_id[test.id], path))


def test_stage1_learns_a_tasks_response_rate_over_its_replicate_loras(suite, tmp_path):
    """The suite's Stage-I learns from `replicates`: its target for a training task is the mean of the task's
    LoRAs' binary response maps (a rate: where the runs disagree it lies strictly between 0 and 1); a replicate
    dataset that lacks a training task is refused with the folder named."""
    from lofa_core.response import response_map
    from training.config import Stage1Config, load_config
    from training.replicates import load_replicates
    from training.runs import Data
    from training.stage1 import response_target, stage1_batch

    workdir, _ = suite
    folder = workdir / "dataset_train_replicate1"
    cfg = load_config(Stage1Config, workdir / "configs" / "stage1.json")
    assert cfg.replicates == [str(folder)]  # the suite's Stage-I learns rates (two LoRAs per training task in CI)
    data = Data(cfg, need_latents=False)
    replicates = load_replicates(cfg.replicates, data.store, data.train)
    gen = torch.Generator().manual_seed(0)
    groups, _ = stage1_batch(data.store, data.train, data.weights, cfg, gen, torch.device("cpu"), replicates)
    target = groups[0].extra["target"][0]
    gen = torch.Generator().manual_seed(0)  # the same draw, binary maps of the first LoRAs
    first, _ = stage1_batch(data.store, data.train, data.weights, cfg, gen, torch.device("cpu"))
    one = first[0].extra["target"][0]
    assert set(target.unique().tolist()) <= {0.0, 0.5, 1.0} and (target == 0.5).any()
    assert torch.equal(one, (one > 0.5).float())  # a binary map, which the rate agrees with where the runs do
    assert (one[target == 1] == 1).all() and (one[target == 0] == 0).all()
    other, groups_by_name = replicates[0]
    sample = data.train[0]
    t = data.catalog.targets[0]
    rate = (response_map(data.store.delta(sample, t.path), data.weights[t.path], cfg.tau)
            + response_map(other.delta(groups_by_name[sample.group], t.path), data.weights[t.path], cfg.tau)) / 2
    assert torch.equal(response_target(data.store, replicates, sample, t.path, data.weights[t.path], cfg.tau), rate)
    partial = tmp_path / "partial"
    partial.mkdir()
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    (partial / "metadata.jsonl").write_text("\n".join(lines[1:]) + "\n")
    (partial / "loras").symlink_to(folder / "loras")
    with pytest.raises(SystemExit, match="partial.*no LoRA for 1 training task"):
        load_replicates([str(partial)], data.store, data.train)


def test_noise_ceiling_is_another_lora_of_the_same_tasks_on_fresh_clips(suite):
    """The report scores a second LoRA of each held-out task, trained on newly drawn clips of that task by another
    run, like the predictions: it is nearest to its own task's LoRA and closes more of the loss gap than the mean
    LoRA, so the ceiling measures what a task (not its clips) determines; and it is printed next to the goals."""
    workdir, report = suite
    ceiling = report["ceiling"]["test"]
    assert ceiling["tasks"] == 6 and ceiling["retrieval_heldout"] >= 5 / 6, ceiling
    assert ceiling["gap_pred"] > ceiling["gap_mean"], ceiling
    replicates = {s.id: s for s in read_samples(workdir / "dataset_replicate")}
    originals = {s.id: s for s in read_samples(workdir / "dataset") if s.split != "train"}
    assert sorted(replicates) == sorted(originals)
    for task, replicate in replicates.items():
        assert replicate.condition["prompt"] == originals[task].condition["prompt"]
        fresh, first = load_file(str(replicate.latents))["latents"], load_file(str(originals[task].latents))["latents"]
        assert fresh.shape == first.shape and not torch.allclose(fresh, first, atol=0.05), task
    assert "another LoRA of the same task" in (workdir / "report.md").read_text()


def test_report_says_how_much_of_the_loras_words_and_word_pairs_explain(suite):
    """The suite measures the data's structure on all tasks, with run noise from the ceiling's second LoRAs of the
    12 held-out tasks: word pairs explain more than words alone, and the shares are shares."""
    workdir, report = suite
    e = report["structure"]
    assert e["tasks"] == report["data"]["train_tasks"] + 12 and e["replicates"] == 12, e
    assert 0 < e["words"] < e["pairs"] < 1 and 0 < e["noise"] < 1, e
    assert 0 <= e["beyond_pairs"] <= e["left_by_pairs"], e
    assert abs(e["pairs"] + e["left_by_pairs"] - 1) < 1e-3, e
    assert "What a prompt can tell" in (workdir / "report.md").read_text()


def test_held_out_predictions_beat_the_constant_baselines(suite):
    """On test tasks the task-specific part of the prediction resembles the task's LoRA's, and the prediction
    closes more of the diffusion-loss gap than the mean LoRA, the norm-matched constant LoRA and another task's
    LoRA."""
    _, report = suite
    s2 = report["stage2"]["test"]
    assert s2["dw_cos_centered"] > 0.2, s2  # the task-specific part of the prediction points the right way
    assert s2["dw_cos_centered"] > s2["zero_dw_cos_centered"] + 0.1, s2  # ... beyond what predicting nothing gets
    assert s2["dw_norm_ratio"] > 0.2, s2  # and the prediction is not a collapsed near-zero LoRA
    assert s2["gap_pred"] > max(s2["gap_mean"], s2["gap_constant"], s2["gap_swap"]), s2
    assert s2["retrieval_heldout"] > 1 / 6, s2  # above chance
    goals = report["goals"]
    assert goals and all(set(g) == {"text", "value", "passed"} for g in goals)
    lines = (Path(report["checkpoint"]).parents[1] / "report.md").read_text()
    assert lines.count("PASS") + lines.count("FAIL") == len(goals)
    held_out = [s for s in read_samples(Path(report["checkpoint"]).parents[1] / "dataset") if s.split == "test"]
    assert len(held_out) == 6


def test_single_stage_ablation_trains_without_stage1_and_predicts(suite, comfy, model_dirs):
    """`stage2 --single-stage` exports a checkpoint without Stage-I; the node predicts a LoRA from it and reports
    that LoRA's own response map."""
    workdir, report = suite
    assert "dw_cos_centered" in report["single_stage"]["test"]
    target = model_dirs.lofa / "single.safetensors"
    target.write_bytes((workdir / "single_stage" / "lofa.safetensors").read_bytes())
    ckpt = load_checkpoint(target)
    assert ckpt.net.stage1 is None and ckpt.net.stage2 is not None and not ckpt.net.stage2.cfg.cross_attn_idxs
    patcher, _ = tiny_wan.build_view_patcher(model=load_base_model(report["base_model"]).model)
    cond = torch.zeros(1, 512, 4096)
    sample = next(s for s in read_samples(workdir / "dataset") if s.split == "test")
    tokens, _ = load_embedding(sample.embedding)
    cond[0, : tokens.shape[0]] = tokens
    (handle,) = node(comfy, "LoFAModelLoader").load("single.safetensors", "float32")
    lora, response = node(comfy, "LoFAPredictLoRA").predict(patcher, handle, [[cond, {}]], "all", 0, 8)
    assert len(response.maps) == len(ckpt.catalog) and 0 < response.mean_active() < 1
    assert any(k.endswith("lora_up.weight") for k in lora)


def test_evaluate_scores_a_checkpoint_as_its_run_did_and_averages_several(suite, tmp_path):
    """`python -m training evaluate` reproduces the run's own final test figures for its checkpoint; given the
    two-stage and the single-stage checkpoint it scores the average of their LoRAs (something else); and it
    does not overwrite an existing --out file."""
    from training.config import Stage2Config, load_config
    from training.ensemble import evaluate_checkpoints

    workdir, report = suite
    run = load_config(Stage2Config, workdir / "configs" / "stage2.json")
    two_stage, single = workdir / "stage2" / "lofa.safetensors", workdir / "single_stage" / "lofa.safetensors"
    own = evaluate_checkpoints(run, [two_stage], ["test"])["test"]
    for key in ("dw_cos_centered", "gap_pred", "map_cos", "retrieval_heldout"):
        assert own[key] == pytest.approx(report["stage2"]["test"][key], abs=1e-4), key
    both = evaluate_checkpoints(run, [two_stage, single], ["test"])["test"]
    assert both["map_cos"] == pytest.approx(own["map_cos"], abs=1e-4)  # only the two-stage model has maps
    assert abs(both["dw_cos_centered"] - own["dw_cos_centered"]) > 1e-3
    out = tmp_path / "scores.json"
    out.write_text("mine")
    again = _run(["-m", "training", "evaluate", "--config", str(workdir / "configs" / "stage2.json"),
                  "--checkpoint", str(two_stage), "--out", str(out)])
    assert again.returncode == 1 and "--overwrite" in again.stderr and out.read_text() == "mine"


def test_the_text_suites_model_is_its_stage2_members_averaged(suite):
    """The text suite trains more Stage-II models on the same Stage-I with the next seeds (CI: one more; configs
    saved beside the others), and judges the LoRA goals on the average of the models' LoRAs: exactly what
    `python -m training evaluate` gives for the exported checkpoints."""
    from safetensors.torch import load_file

    from training.config import Stage2Config, load_config
    from training.ensemble import evaluate_checkpoints

    workdir, report = suite
    ensemble = report["ensemble"]
    first, second = ensemble["checkpoints"]
    assert ensemble["seeds"] == [0, 1] and Path(first) == Path(report["checkpoint"])
    member = load_config(Stage2Config, workdir / "configs" / "stage2_member2.json")
    assert member.seed == 1 and Path(member.out) == Path(second).parent and member.stage1 == str(workdir / "stage1")
    a, b = load_file(first), load_file(second)
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)  # another seed, another model
    run = load_config(Stage2Config, workdir / "configs" / "stage2.json")
    scored = evaluate_checkpoints(run, [first, second], ["test"])["test"]
    for key in ("dw_cos_centered", "gap_pred", "retrieval_heldout"):
        assert ensemble["test"][key] == pytest.approx(scored[key], abs=1e-4), key
    (dw,) = [g for g in report["goals"] if "dW cosine, training mean removed" in g["text"]]
    assert dw["text"].startswith("Stage-II (2 models averaged)")
    assert f"one model {report['stage2']['test']['dw_cos_centered']:.3f}" in dw["value"]
    assert "one model" in (workdir / "report.md").read_text()


def test_fine_tuning_starts_closer_from_the_lofa_prior(suite):
    """Fine-tuning a test task's LoRA from LoFA's prediction starts with part of the gap already closed and
    reaches the task's LoRA loss no later than from the usual start (on most tasks)."""
    _, report = suite
    a = report["adaptation"]
    assert a["gap_closed_at_start"] > 0.2, a
    faster = sum(p <= u for p, u in zip(a["steps_prior"], a["steps_usual"]))
    assert faster >= 4, a
    assert (Path(report["checkpoint"]).parents[1] / "adaptation.png").stat().st_size > 1000


def test_build_from_the_lofa_prior_starts_at_the_prediction(suite, tmp_path):
    """`python -m training build --init-from-lofa CKPT` starts each LoRA at LoFA's prediction for its prompt: with
    0 steps the saved LoRA is exactly the predicted update."""
    workdir, report = suite
    build = json.loads((workdir / "configs" / "build.json").read_text())
    tasks = [json.loads(line) for line in Path(build["tasks"]).read_text().splitlines()][:2]
    (tmp_path / "tasks.jsonl").write_text("".join(json.dumps({**t, "latents": str(Path(build["tasks"]).parent /
                                                                                  t["latents"])}) + "\n"
                                                  for t in tasks))
    sets = [f"tasks={tmp_path / 'tasks.jsonl'}", f"base_model={report['base_model']}", f"out={tmp_path / 'data'}",
            f"text_encoder={build['text_encoder']}", "steps=0", f"rank={build['rank']}"]
    result = _run(["-m", "training", "build", "--init-from-lofa", report["checkpoint"],
                   *[a for s in sets for a in ("--set", s)]])
    assert result.returncode == 0, result.stderr[-2000:]
    ckpt = load_checkpoint(report["checkpoint"])
    base = load_base_model(report["base_model"])
    targets = ckpt.catalog.by_path()
    for sample in read_samples(tmp_path / "data"):
        tokens, pooled = load_embedding(sample.embedding)
        expected = predict(ckpt, ckpt.catalog.targets, lambda t: base.weight(t.path),
                           prepare_text_condition(tokens, pooled, ckpt.condition), device=torch.device("cpu"),
                           dtype=torch.float32).lora
        saved, _ = read_lora_state_dict(load_file(sample.lora), targets, source=sample.lora.name)
        for path, f in expected.factors.items():
            torch.testing.assert_close(saved[path].delta(), f.delta(), rtol=1e-5, atol=1e-8)


def test_exported_checkpoint_predicts_through_the_node_graph(suite, comfy, model_dirs):
    import comfy.model_management as mm

    workdir, report = suite
    target = model_dirs.lofa / "suite.safetensors"
    target.write_bytes(Path(report["checkpoint"]).read_bytes())
    ckpt = load_checkpoint(target)
    assert ckpt.trained and ckpt.catalog.family == "wan2.1-t2v" and ckpt.net.stage2 is not None
    base = load_base_model(report["base_model"])
    patcher, _ = tiny_wan.build_view_patcher(model=base.model)
    sample = next(s for s in read_samples(workdir / "dataset") if s.split == "test")
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
    condition = prepare_text_condition(cond, None, ckpt.condition)
    expected = predict(ckpt, ckpt.catalog.targets, lambda t: before[t.key], condition, device=torch.device("cpu"),
                       dtype=torch.float32)
    for path, f in expected.lora.factors.items():
        key = f"diffusion_model.{path}.weight"
        # W + dW is rounded to float32 at |W|'s scale, so the recovered dW carries that much noise.
        noise = 4 * torch.finfo(torch.float32).eps * before[key].abs().max().item()
        torch.testing.assert_close(after[key] - before[key], f.delta(), rtol=1e-4, atol=noise)
        assert f.delta().abs().max() > 0
    assert len(response.maps) == len(ckpt.catalog)


def _stage1_cmd(workdir: Path, out: Path, steps: int, extra: list[str] = ()) -> list[str]:
    sets = [f"dataset={workdir / 'dataset'}", f"base_model={workdir / 'base_pretrained' / 'base.safetensors'}",
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
    test-task predictions close more of the diffusion gap than the mean and the constant training LoRA."""
    workdir, _ = suite
    report = run_suite(workdir, "wan", overrides=CI_SUITE + CI_VARIANTS, condition=variant)
    s2 = report["stage2"]["test"]
    assert s2["gap_pred"] > max(s2["gap_mean"], s2["gap_constant"]), s2
    assert "single_stage" not in report and "adaptation" not in report
    ckpt = load_checkpoint(report["checkpoint"])
    assert ckpt.condition.kind == variant.split("-")[0] and ckpt.trained
    assert ckpt.condition.second_dim == (24 if variant == "image-mix" else 0)
