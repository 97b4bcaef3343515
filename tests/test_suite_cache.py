"""The suite's step cache: a finished step is reused when its settings are unchanged (also settings holding
tuples, which read back from JSON as lists), and redone from an empty folder when they change."""

from __future__ import annotations

from training.suite import _once, goals


def test_finished_step_is_reused_with_the_same_settings(tmp_path):
    calls = []

    def make():
        calls.append(1)
        (tmp_path / "step" / "out.txt").write_text(str(len(calls)))

    key = {"betas": (0.9, 0.95), "groups": ("attn",), "steps": 3}
    _once(tmp_path / "step", tmp_path / "step" / "out.txt", key, make)
    _once(tmp_path / "step", tmp_path / "step" / "out.txt", dict(key), make)
    assert len(calls) == 1
    (tmp_path / "step" / "extra.txt").write_text("left by the old settings")
    _once(tmp_path / "step", tmp_path / "step" / "out.txt", {**key, "steps": 4}, make)
    assert len(calls) == 2 and not (tmp_path / "step" / "extra.txt").exists()


def test_retrieval_goal_counts_tasks_not_rounded_fractions():
    s2 = {"retrieval_heldout": 0.8333, "tasks": 6.0, "gt_own_task_best": 1.0, "dw_cos_centered": 0.5,
          "per_word_dw_cos_centered": 0.4, "gap_pred": 0.5, "gap_mean": 0.0, "gap_constant": 0.0, "gap_swap": 0.0,
          "mean_lora_dw_cos": 0.1, "dw_cos": 0.6}
    report = {"condition": "text", "data": {"shared_energy": 0.2}, "stage1": {"test": {"map_cos": 0.8,
              "mean_map_cos": 0.7}}, "stage2": {"test": s2}}
    (retrieval,) = [g for g in goals(report) if g.text.startswith("retrieval")]
    assert retrieval.passed and retrieval.value == "5/6"
    s2["retrieval_heldout"] = 0.6667
    (retrieval,) = [g for g in goals(report) if g.text.startswith("retrieval")]
    assert not retrieval.passed


def test_dw_goal_fails_when_the_prediction_only_reaches_the_empty_loras_floor():
    """A mean-removed cosine that an empty LoRA (predicting nothing) also reaches is no evidence of learning."""
    s2 = {"retrieval_heldout": 1.0, "tasks": 6.0, "gt_own_task_best": 1.0, "dw_cos_centered": 0.85,
          "per_word_dw_cos_centered": 0.4, "zero_dw_cos_centered": 0.9, "gap_pred": 0.9, "gap_mean": 0.0,
          "gap_constant": 0.0, "gap_swap": 0.0, "mean_lora_dw_cos": 0.1, "dw_cos": 0.6}
    report = {"condition": "text", "data": {"shared_energy": 0.2}, "stage1": {"test": {"map_cos": 0.8,
              "mean_map_cos": 0.7}}, "stage2": {"test": s2}}

    def dw_goal():
        (goal,) = [g for g in goals(report) if g.text.startswith("Stage-II dW cosine, training mean removed")]
        return goal

    assert not dw_goal().passed and "empty LoRA 0.900" in dw_goal().value
    s2["zero_dw_cos_centered"] = 0.05
    assert dw_goal().passed


def test_lora_goals_judge_the_averaged_members_and_show_one_model_beside():
    """With several Stage-II members the LoRA goals are met or missed by their averaged LoRA (the suite's model),
    and the first member's own figure is printed next to it, so one model's shortfall stays visible."""
    one = {"retrieval_heldout": 1.0, "tasks": 6.0, "gt_own_task_best": 1.0, "dw_cos_centered": 0.76,
           "per_word_dw_cos_centered": 0.7, "zero_dw_cos_centered": 0.1, "gap_pred": 0.78, "gap_mean": 0.0,
           "gap_constant": 0.0, "gap_swap": 0.0, "mean_lora_dw_cos": 0.1, "dw_cos": 0.8}
    report = {"condition": "text", "data": {"shared_energy": 0.2}, "stage1": {"test": {"map_cos": 0.8,
              "mean_map_cos": 0.7}}, "stage2": {"test": one},
              "ensemble": {"checkpoints": ["a", "b"], "seeds": [0, 1],
                           "test": {**one, "dw_cos_centered": 0.81, "gap_pred": 0.79}}}
    by_text = {g.text.split(" dW cosine")[0] if "dW cosine" in g.text else g.text: g for g in goals(report)}
    dw = by_text["Stage-II (2 models averaged)"]
    assert dw.passed and dw.value.startswith("0.810, one model 0.760")
    (gap,) = [g for g in goals(report) if "gap closed >= 0.8" in g.text]
    assert not gap.passed and gap.text.startswith("Stage-II (2 models averaged)") and "one model 0.780" in gap.value
    del report["ensemble"]
    (dw,) = [g for g in goals(report) if g.text.startswith("Stage-II dW cosine, training mean removed")]
    assert not dw.passed and "one model" not in dw.value
