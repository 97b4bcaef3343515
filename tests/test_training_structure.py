"""The data analysis that says how much of a held-out task's LoRA a prompt-reading predictor can know."""

from __future__ import annotations

import itertools

import torch

from lofa_core.targets import Target, TargetCatalog
from training.dataset import Sample
from training.structure import interaction_energy

GROUPS = (("red", "blue", "green"), ("dots", "bars", "waves"), ("slow", "fast", "still"))
CONTRAST = torch.tensor([1.0, -1.0, 0.0])  # sums to 0 over each word group


class _Store:
    def __init__(self, deltas: dict[str, torch.Tensor]) -> None:
        self.catalog = TargetCatalog("wan2.1-t2v", ("self_attn.q",), 1, ("attn",),
                                     (Target("blocks.0.self_attn.q", 6, 5, 0, 0),))
        self.deltas = deltas
        self.by_id = {k: Sample(id=k, lora=None, condition={"kind": "text", "prompt": k}, group=None,
                                split="train", latents=None, line=1) for k in deltas}

    def delta(self, sample: Sample, path: str) -> torch.Tensor:
        return self.deltas[sample.id]


def _grid(three_way: float, noise: float, seed: int) -> tuple[_Store, _Store, float]:
    """Every task's dW: word and word-pair effects, plus `three_way` times a term only all three words make (a
    product of zero-sum contrasts, so no word or pair explains any of it), plus independent run noise; the
    replicate store holds a second run of every task. Returns the stores and the three-way term's energy."""
    gen = torch.Generator().manual_seed(seed)
    effect = {w: torch.randn(6, 5, generator=gen) for g in GROUPS for w in g}
    effect |= {pair: torch.randn(6, 5, generator=gen) for g1, g2 in itertools.combinations(GROUPS, 2)
               for pair in itertools.product(g1, g2)}
    triple = torch.randn(6, 5, generator=gen)
    first, second, triple_energy = {}, {}, 0.0
    for idx in itertools.product(range(3), repeat=3):
        words = tuple(GROUPS[g][i] for g, i in enumerate(idx))
        weight = three_way * float(CONTRAST[idx[0]] * CONTRAST[idx[1]] * CONTRAST[idx[2]])
        clean = (sum(effect[w] for w in words) + sum(effect[p] for p in itertools.combinations(words, 2))
                 + weight * triple)
        triple_energy += float((weight * triple).pow(2).sum()) / 27
        prompt = "a " + " ".join(words)
        first[prompt] = clean + noise * torch.randn(6, 5, generator=gen)
        second[prompt] = clean + noise * torch.randn(6, 5, generator=gen)
    return _Store(first), _Store(second), triple_energy


def _energy(store: _Store, replicates: _Store) -> dict[str, float]:
    return interaction_energy(store, list(store.by_id.values()), replicates)


def test_without_noise_what_pairs_leave_is_exactly_the_three_word_term():
    store, replicates, triple = _grid(three_way=3.0, noise=0.0, seed=0)
    total = sum(float(d.pow(2).sum()) for d in torch.stack(list(store.deltas.values())).sub(
        torch.stack(list(store.deltas.values())).mean(0))) / 27
    result = _energy(store, replicates)
    assert result["noise"] == 0.0 and result["replicates"] == 27
    assert abs(result["beyond_pairs"] - triple / total) < 1e-4
    assert triple / total > 0.05  # the term is large enough to matter
    assert result["words"] < result["pairs"] < 1.0


def test_noise_alone_is_not_mistaken_for_three_word_structure():
    store, replicates, _ = _grid(three_way=0.0, noise=0.5, seed=1)
    result = _energy(store, replicates)
    # 19 free terms over 27 tasks leave 8/27 of the noise in the residuals ...
    assert 0.15 * result["noise"] < result["left_by_pairs"] < 0.5 * result["noise"]
    assert result["beyond_pairs"] < 0.2 * result["left_by_pairs"]  # ... and it is counted as noise
    # with a three-word term as well, the noise does not hide it: about what the same grid without noise shows
    noisy = _energy(*_grid(three_way=3.0, noise=0.5, seed=1)[:2])["beyond_pairs"]
    clean = _energy(*_grid(three_way=3.0, noise=0.0, seed=1)[:2])["beyond_pairs"]
    assert clean > 0.1 and abs(noisy - clean) < 0.15 * clean
