"""What a hypernetwork has to beat: predictors built from the training LoRAs alone, without any network.

* the mean training response map and the mean training LoRA (per target): what every task shares;
* a norm-matched constant LoRA: the mean LoRA's direction at the typical training LoRA's norm (a "generic"
  LoRA as strong as a real one);
* the per-word additive LoRA: least squares `dW ~ c + sum over the prompt's words of b_word` over the
  training tasks, the strongest simple way to compose a new prompt from words seen in training.

All of them are linear in the training LoRAs. Their dense per-target tensors live in memory, so the number of
training LoRAs they read is capped (`max_samples`); at real model sizes keep it modest.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

import torch

from lofa_core.response import response_map

from .dataset import Sample, SampleStore

PER_WORD_MAX_ELEMENTS = 400_000_000  # coefficient tensors above this many floats: skip the per-word baseline


def task_words(sample: Sample) -> list[str]:
    """The words of a sample's task prompt: the text condition, else the caption the base model reads."""
    prompt = sample.condition.get("prompt") or (sample.extra.get("caption") or {}).get("prompt") or ""
    return re.findall(r"[\w']+", prompt.lower())


@dataclass
class WordModel:
    """Least-squares additive model of dW over prompt words: coefficients [1 + V, out, in] per target."""

    vocabulary: list[str]
    coefficients: dict[str, torch.Tensor]

    def features(self, words: list[str]) -> torch.Tensor:
        present = set(words)
        return torch.tensor([1.0] + [1.0 if w in present else 0.0 for w in self.vocabulary])

    def predict(self, words: list[str]) -> dict[str, torch.Tensor]:
        x = self.features(words)
        return {p: torch.tensordot(x, c, dims=1) for p, c in self.coefficients.items()}


@dataclass
class Baselines:
    mean_map: dict[str, torch.Tensor]
    mean_delta: dict[str, torch.Tensor]
    mean_norm: dict[str, float]  # mean Frobenius norm of the training dWs, per target
    words: WordModel | None
    samples: int

    def constant(self) -> dict[str, torch.Tensor]:
        """The mean LoRA rescaled, per target, to the training LoRAs' typical norm."""
        return {p: d * (self.mean_norm[p] / max(float(d.norm()), 1e-30)) for p, d in self.mean_delta.items()}

    def per_word(self, sample: Sample) -> dict[str, torch.Tensor] | None:
        return self.words.predict(task_words(sample)) if self.words is not None else None


def build_baselines(store: SampleStore, train: list[Sample], weights: dict[str, torch.Tensor], tau: float,
                    max_samples: int = 512) -> Baselines:
    """Every baseline from (up to `max_samples` of) the training LoRAs, reading each LoRA once."""
    train = train[:max_samples]
    targets = store.catalog.targets
    words = [task_words(s) for s in train]
    counts = defaultdict(int)
    for ws in words:
        for w in set(ws):
            counts[w] += 1
    # words that tell training tasks apart: seen at least twice and not in every task (the intercept covers those)
    vocabulary = sorted(w for w, c in counts.items() if 2 <= c < len(train))
    size = sum(t.out_features * t.in_features for t in targets)
    use_words = bool(vocabulary) and (1 + len(vocabulary)) * size <= PER_WORD_MAX_ELEMENTS
    if use_words:
        design = torch.stack([torch.tensor([1.0] + [1.0 if w in set(ws) else 0.0 for w in vocabulary])
                              for ws in words])
        solve = torch.linalg.pinv(design)  # [1 + V, n]: coefficients = solve @ dW (minimum-norm least squares)
    maps, deltas, norms, coef = defaultdict(float), defaultdict(float), defaultdict(float), {}
    for i, sample in enumerate(train):
        for t in targets:
            delta = store.delta(sample, t.path)
            deltas[t.path] = deltas[t.path] + delta
            norms[t.path] += float(delta.norm())
            maps[t.path] = maps[t.path] + response_map(delta, weights[t.path].cpu(), tau)
            if use_words:
                term = solve[:, i].view(-1, 1, 1) * delta
                coef[t.path] = coef[t.path] + term if t.path in coef else term
    n = max(1, len(train))
    return Baselines({p: m / n for p, m in maps.items()}, {p: d / n for p, d in deltas.items()},
                     {p: v / n for p, v in norms.items()}, WordModel(vocabulary, coef) if use_words else None,
                     len(train))


def shared_energy(store: SampleStore, samples: list[Sample], max_samples: int = 64) -> float:
    """||mean dW||^2 / mean ||dW||^2 over all targets (of up to `max_samples` LoRAs): 1 if every LoRA were the
    same, near 0 if they share nothing. Above ~0.5 a dW cosine mostly measures the shared part."""
    samples = samples[:max_samples]
    total, mean_sq = 0.0, 0.0
    for t in store.catalog.targets:
        deltas = torch.stack([store.delta(s, t.path) for s in samples])
        mean_sq += float(deltas.mean(0).pow(2).sum())
        total += float(deltas.pow(2).sum(dim=(1, 2)).mean())
    return mean_sq / total if total else 0.0
