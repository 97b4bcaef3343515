"""Loss curves of a run as a PNG (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path

# what the plot shows of each evaluation: the model next to its strongest simple baselines
HEADLINE = ("map_cos", "mean_map_cos", "per_word_map_cos", "dw_cos_centered", "per_word_dw_cos_centered",
            "per_pair_dw_cos_centered", "gap_pred", "gap_mean", "gap_per_pair")


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl records; a step logged again after a resume replaces the earlier record."""
    if not path.exists():
        return []
    by_step: dict[tuple[int, bool], dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            is_eval = any(k.startswith("eval/") for k in rec)
            by_step[(rec["step"], is_eval)] = rec
    return [by_step[k] for k in sorted(by_step)]


def plot_metrics(metrics: Path, out: Path, title: str = "") -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    if not train:
        return None
    keys = [k for k in train[-1] if k not in ("step", "lr", "grad_norm", "seconds")]
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(12 if evals else 7, 4), squeeze=False)
    ax = axes[0][0]
    for key in keys:
        ax.plot([r["step"] for r in train], [r[key] for r in train], label=key)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.set_title(f"{title} training losses")
    ax.legend()
    if evals:
        ax = axes[0][1]
        for key in [f"eval/val/{k}" for k in HEADLINE if any(f"eval/val/{k}" in r for r in evals)]:
            shown = [r for r in evals if key in r]
            ax.plot([r["step"] for r in shown], [r[key] for r in shown], marker="o", label=key[9:])
        ax.set_xlabel("step")
        ax.set_title("val tasks (test tasks: metrics.jsonl, last record)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
