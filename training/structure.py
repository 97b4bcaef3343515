"""What a prompt can tell about a task's LoRA: how much of the task-specific energy is word effects, word-pair
effects, what only all of a task's words together do, and run noise.

Fitting least squares over *all* tasks of a task grid (held-out ones included: this describes the data, it
chooses nothing) with one term per word, then also one per pair of words, leaves residuals. What the pairs leave
is run noise plus what no composition of words and pairs can express - the part of a held-out task that a
predictor reading the prompt can only learn if it is structured across tasks. Run noise is measured from a
second LoRA of some tasks (another run on fresh clips, `ceiling.py`): a fit with `rank` free terms over `n` tasks
leaves `(n - rank) / n` of i.i.d. noise in its residuals, so the residual beyond that is the real structure.
All figures are shares of the mean-removed energy per LoRA.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import torch

from .baselines import task_words
from .dataset import Sample, SampleStore


def _shared_words(words: Sequence[list[str]]) -> set[str]:
    return set.intersection(*(set(ws) for ws in words)) if words else set()


def design(words: Sequence[list[str]], with_pairs: bool) -> torch.Tensor:
    """[tasks, 1 + words (+ pairs)] indicators of each task's words (and pairs of words); words every task has are
    left to the intercept."""
    shared = _shared_words(words)
    own = [sorted(set(ws) - shared) for ws in words]
    vocabulary = sorted({w for ws in own for w in ws})
    pairs = sorted({p for ws in own for p in combinations(ws, 2)}) if with_pairs else []
    rows = [[1.0] + [float(w in ws) for w in vocabulary] + [float(a in ws and b in ws) for a, b in pairs]
            for ws in map(set, own)]
    return torch.tensor(rows)


def interaction_energy(store: SampleStore, samples: Sequence[Sample], replicates: SampleStore) -> dict[str, float]:
    """Shares of the mean-removed LoRA energy that words, words + pairs and run noise account for, and what is
    left beyond pairs once the noise's expected residual is subtracted (`beyond_pairs`)."""
    words = [task_words(s) for s in samples]
    fits = {name: design(words, with_pairs) for name, with_pairs in (("words", False), ("pairs", True))}
    residual_makers = {name: torch.eye(len(samples)) - x @ torch.linalg.pinv(x) for name, x in fits.items()}
    twins = [(s, replicates.by_id[s.id]) for s in samples if s.id in replicates.by_id]
    if not twins:
        raise ValueError("no task has a second LoRA among the replicates: run noise cannot be measured")
    total, noise = 0.0, 0.0
    residual = dict.fromkeys(fits, 0.0)
    for target in store.catalog.targets:
        y = torch.stack([store.delta(s, target.path).flatten() for s in samples])
        y = y - y.mean(0)
        total += float(y.pow(2).sum()) / len(samples)
        for name, maker in residual_makers.items():
            residual[name] += float((maker @ y).pow(2).sum()) / len(samples)
        # half the squared difference of two independent runs of a task is one run's noise energy
        noise += sum(float((store.delta(a, target.path) - replicates.delta(b, target.path)).pow(2).sum()) / 2
                     for a, b in twins) / len(twins)
    rank = int(torch.linalg.matrix_rank(fits["pairs"]))
    left_by_noise = noise * (len(samples) - rank) / len(samples)
    return {"tasks": float(len(samples)), "replicates": float(len(twins)),
            "words": 1 - residual["words"] / total, "pairs": 1 - residual["pairs"] / total,
            "noise": noise / total, "left_by_pairs": residual["pairs"] / total,
            "beyond_pairs": max(0.0, residual["pairs"] - left_by_noise) / total}
