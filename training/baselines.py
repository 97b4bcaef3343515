"""What a hypernetwork has to beat: predictors built from the training LoRAs alone, without any network.

* the mean training response map and the mean training LoRA (per target): what every task shares;
* the per-word response map: the same least squares over the training tasks' binary maps, clipped to [0, 1] (a
  soft map: the share of such tasks whose weight would respond), Stage-I's strongest simple competitor;
* a norm-matched constant LoRA: the mean LoRA's direction at the typical training LoRA's norm (a "generic"
  LoRA as strong as a real one);
* the per-word additive LoRA: least squares `dW ~ c + sum over the prompt's words of b_word` over the
  training tasks, the simplest way to compose a new prompt from words seen in training;
* the per-pair LoRA: the same plus one term per pair of words seen together in training tasks (ridge-shrunk),
  so what two words do together is learnt wherever the training tasks show that pair - on the synthetic suite the
  strongest simple predictor found, the one a hypernetwork has to beat to show it composes more than pairs.

All of them are linear in the training LoRAs. Their dense per-target tensors live in memory, so the number of
training LoRAs they read is capped (`max_samples`); at real model sizes keep it modest.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import combinations

import torch

from lofa_core.response import response_map

from .dataset import Sample, SampleStore

PER_WORD_MAX_ELEMENTS = 400_000_000  # coefficient tensors above this many floats: skip that composed baseline
# Ridge on the per-pair model's pair terms (the word terms and the intercept are not shrunk). Chosen on the `val`
# tasks of the WAN suite's 168-task grid (mean-removed dW cosine 0.763 / 0.775 / 0.771 at 0.3 / 1 / 3; without
# ridge 0.750): a pair seen in 3 training tasks keeps 3/4 of its least-squares term.
PAIR_RIDGE = 1.0


def task_words(sample: Sample) -> list[str]:
    """The words of a sample's task prompt: the text condition, else the caption the base model reads."""
    prompt = sample.condition.get("prompt") or (sample.extra.get("caption") or {}).get("prompt") or ""
    return re.findall(r"[\w']+", prompt.lower())


@dataclass
class WordModel:
    """Linear model of dW over prompt words (and, if `pairs`, pairs of words): coefficients [1 + V + P, out, in]
    per target."""

    vocabulary: list[str]
    coefficients: dict[str, torch.Tensor]
    pairs: list[tuple[str, str]] = field(default_factory=list)

    def features(self, words: list[str]) -> torch.Tensor:
        return design_row(words, self.vocabulary, self.pairs)

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
    word_pairs: WordModel | None = None
    map_words: WordModel | None = None  # the per-word model fitted to the training tasks' binary response maps

    def constant(self) -> dict[str, torch.Tensor]:
        """The mean LoRA rescaled, per target, to the training LoRAs' typical norm."""
        return {p: d * (self.mean_norm[p] / max(float(d.norm()), 1e-30)) for p, d in self.mean_delta.items()}

    def per_word(self, sample: Sample) -> dict[str, torch.Tensor] | None:
        return self.words.predict(task_words(sample)) if self.words is not None else None

    def per_pair(self, sample: Sample) -> dict[str, torch.Tensor] | None:
        return self.word_pairs.predict(task_words(sample)) if self.word_pairs is not None else None

    def per_word_map(self, sample: Sample) -> dict[str, torch.Tensor] | None:
        """Per target, the per-word least-squares response map of the sample's prompt, clipped to [0, 1]."""
        if self.map_words is None:
            return None
        return {p: m.clamp(0, 1) for p, m in self.map_words.predict(task_words(sample)).items()}

    def composed(self) -> dict[str, WordModel]:
        """The composed-from-words baselines that could be built, by report prefix."""
        return {name: m for name, m in (("per_word", self.words), ("per_pair", self.word_pairs)) if m is not None}


def design_row(words: list[str], vocabulary: list[str], pairs: list[tuple[str, str]]) -> torch.Tensor:
    """[1, one indicator per vocabulary word, one per pair of words] for a prompt's words."""
    present = set(words)
    return torch.tensor([1.0] + [1.0 if w in present else 0.0 for w in vocabulary]
                        + [1.0 if a in present and b in present else 0.0 for a, b in pairs])


def word_pairs(words: list[list[str]], vocabulary: list[str]) -> list[tuple[str, str]]:
    """Pairs of vocabulary words that occur together in at least two training tasks (one task would make the pair
    term that task's own LoRA) and not in every task."""
    counts: dict[tuple[str, str], int] = defaultdict(int)
    known = set(vocabulary)
    for ws in words:
        for pair in combinations(sorted(set(ws) & known), 2):
            counts[pair] += 1
    return sorted(p for p, c in counts.items() if 2 <= c < len(words))


def solve_matrix(design: torch.Tensor, ridge: torch.Tensor | None = None) -> torch.Tensor:
    """[features, tasks] matrix S with coefficients = S @ dW: minimum-norm least squares, or ridge with the
    per-feature penalty `ridge`."""
    if ridge is None or not bool(ridge.any()):
        return torch.linalg.pinv(design)
    gram = design.T @ design + torch.diag(ridge)
    return torch.linalg.pinv(gram) @ design.T


def build_baselines(store: SampleStore, train: list[Sample], weights: dict[str, torch.Tensor], tau: float,
                    max_samples: int = 512, pair_ridge: float = PAIR_RIDGE) -> Baselines:
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
    pairs = word_pairs(words, vocabulary)
    size = sum(t.out_features * t.in_features for t in targets)
    models: dict[str, tuple[list[tuple[str, str]], torch.Tensor]] = {}  # name -> (pairs, solve matrix [F, n])
    for name, model_pairs in (("words", []), ("pairs", pairs)):
        features = 1 + len(vocabulary) + len(model_pairs)
        if not vocabulary or (name == "pairs" and not pairs) or features * size > PER_WORD_MAX_ELEMENTS:
            continue
        design = torch.stack([design_row(ws, vocabulary, model_pairs) for ws in words])
        ridge = torch.cat([torch.zeros(1 + len(vocabulary)), torch.full((len(model_pairs),), pair_ridge)])
        models[name] = (model_pairs, solve_matrix(design, ridge))
    maps, deltas, norms = defaultdict(float), defaultdict(float), defaultdict(float)
    coef: dict[str, dict[str, torch.Tensor]] = {name: {} for name in models}
    map_coef: dict[str, torch.Tensor] = {}
    for i, sample in enumerate(train):
        for t in targets:
            delta = store.delta(sample, t.path)
            deltas[t.path] = deltas[t.path] + delta
            norms[t.path] += float(delta.norm())
            response = response_map(delta, weights[t.path].cpu(), tau)
            maps[t.path] = maps[t.path] + response
            if "words" in models:
                term = models["words"][1][:, i].view(-1, 1, 1) * response
                map_coef[t.path] = map_coef[t.path] + term if t.path in map_coef else term
            for name, (_, solve) in models.items():
                term = solve[:, i].view(-1, 1, 1) * delta
                coef[name][t.path] = coef[name][t.path] + term if t.path in coef[name] else term
    n = max(1, len(train))
    composed = {name: WordModel(vocabulary, coef[name], model_pairs) for name, (model_pairs, _) in models.items()}
    return Baselines({p: m / n for p, m in maps.items()}, {p: d / n for p, d in deltas.items()},
                     {p: v / n for p, v in norms.items()}, composed.get("words"), len(train), composed.get("pairs"),
                     WordModel(vocabulary, map_coef) if map_coef else None)


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
