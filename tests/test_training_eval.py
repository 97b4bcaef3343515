"""The baselines held-out figures are reported next to, and the suite's cache of finished steps."""

from __future__ import annotations

import itertools
import json
from collections import defaultdict

import pytest
import torch

from lofa_core.lora_formats import LoRAFactors, PredictedLoRA
from lofa_core.targets import Target, TargetCatalog
from training.baselines import build_baselines, task_words
from training.dataset import Sample
from training.evaluate import _weight_space_scores
from training.suite import _once


class _Store:
    """The SampleStore interface build_baselines reads: a catalog and each sample's LoRA factors."""

    def __init__(self, factors: dict[str, dict[str, LoRAFactors]]) -> None:
        self.catalog = TargetCatalog("wan2.1-t2v", ("self_attn.q",), 1, ("attn",),
                                     (Target("blocks.0.self_attn.q", 6, 5, 0, 0),))
        self._factors = factors

    def delta(self, sample: Sample, path: str) -> torch.Tensor:
        return self._factors[sample.id][path].delta()


def _sample(words: tuple[str, ...]) -> Sample:
    prompt = "a " + " ".join(words)
    return Sample(id=prompt, lora=None, condition={"kind": "text", "prompt": prompt}, group=None, split="train",
                  latents=None, line=1)


def test_per_word_baseline_recovers_unseen_combinations_of_additive_tasks():
    """When every task's dW is a sum of one matrix per word, least squares over the training tasks predicts a
    held-out combination exactly, and the mean LoRA does not."""
    gen = torch.Generator().manual_seed(0)
    colours, shapes = ("red", "blue", "green"), ("dots", "bars", "waves")
    effect = {w: torch.randn(6, 5, generator=gen) for w in colours + shapes}
    combos = list(itertools.product(colours, shapes))
    held_out = ("green", "waves")
    samples = {c: _sample(c) for c in combos}
    factors = {samples[c].id: {"blocks.0.self_attn.q": LoRAFactors(effect[c[0]] + effect[c[1]], torch.eye(5), 1.0)}
               for c in combos}
    store = _Store(factors)
    train = [samples[c] for c in combos if c != held_out]
    weights = {"blocks.0.self_attn.q": torch.ones(6, 5)}
    baselines = build_baselines(store, train, weights, tau=0.02)
    assert task_words(samples[held_out]) == ["a", "green", "waves"]
    assert "a" not in baselines.words.vocabulary  # in every task: the intercept covers it
    truth = store.delta(samples[held_out], "blocks.0.self_attn.q")
    predicted = baselines.per_word(samples[held_out])["blocks.0.self_attn.q"]
    torch.testing.assert_close(predicted, truth, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(baselines.mean_delta["blocks.0.self_attn.q"], truth, atol=1e-2)
    constant = baselines.constant()["blocks.0.self_attn.q"]
    mean_norm = sum(float(store.delta(s, "blocks.0.self_attn.q").norm()) for s in train) / len(train)
    assert abs(float(constant.norm()) - mean_norm) < 1e-4


def test_per_word_map_recovers_the_response_map_of_an_unseen_combination():
    """Each colour makes one of the first three rows respond and each shape one of the last three: the held-out
    task's binary map is the sum of its two words' maps, which the per-word map recovers exactly while the mean
    map blurs it."""
    path = "blocks.0.self_attn.q"
    colours, shapes = ("red", "blue", "green"), ("dots", "bars", "waves")
    row = {w: torch.zeros(6, 5).index_fill_(0, torch.tensor([i]), 1.0) for i, w in enumerate(colours + shapes)}
    mask = {(c, s): row[c] + row[s] for c in colours for s in shapes}
    samples = {c: _sample(c) for c in mask}
    # dW: 0.5 where the task responds (|dW| / |W| = 0.5 > tau), 0.001 elsewhere (below tau)
    factors = {samples[c].id: {path: LoRAFactors(0.001 + 0.499 * m, torch.eye(5), 1.0)} for c, m in mask.items()}
    held_out = ("green", "waves")
    train = [samples[c] for c in mask if c != held_out]
    baselines = build_baselines(_Store(factors), train, {path: torch.ones(6, 5)}, tau=0.02)
    truth = mask[held_out]
    predicted = baselines.per_word_map(samples[held_out])[path]
    assert float(predicted.min()) >= 0.0 and float(predicted.max()) <= 1.0
    torch.testing.assert_close(predicted, truth, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(baselines.mean_map[path], truth, atol=0.1)
    scores = defaultdict(list)
    lora = PredictedLoRA("wan2.1-t2v", factors[samples[held_out].id])
    _weight_space_scores(scores, _Store(factors), samples[held_out], {path: torch.ones(6, 5)}, baselines,
                         {path: baselines.mean_map[path]}, lora, tau=0.02)
    assert scores["per_word_map_cos"] == [pytest.approx(1.0, abs=1e-5)]
    assert scores["mean_map_cos"][0] < 0.95


def test_suite_steps_rerun_from_scratch_only_when_their_settings_change(tmp_path):
    folder, result = tmp_path / "step", tmp_path / "step" / "out.txt"
    runs = []

    def make(value: str):
        def run():
            runs.append(value)
            (folder / "partial.txt").write_text(value)
            result.write_text(value)
        return run

    _once(folder, result, {"lr": 1}, make("first"))
    _once(folder, result, {"lr": 1}, make("again"))  # cached: not run
    assert runs == ["first"]
    result.unlink()  # an interrupted run with the same settings resumes in its folder
    (folder / "checkpoint").write_text("kept")
    _once(folder, result, {"lr": 1}, make("resumed"))
    assert (folder / "checkpoint").exists() and runs[-1] == "resumed"
    _once(folder, result, {"lr": 2}, make("new settings"))  # other settings: nothing of the old run survives
    assert not (folder / "checkpoint").exists() and result.read_text() == "new settings"
    assert json.loads((folder / "suite_config.json").read_text()) == {"lr": 2}


def test_an_empty_prediction_scores_its_floor_not_zero_with_the_mean_removed():
    """A predictor that outputs nothing still gets cos(-mean, gt - mean) > 0 when a held-out task leans away
    from the training mean: the evaluation reports that floor (and |pred| / |gt|) so such a score is seen as
    the empty LoRA's, while the true LoRA scores 1 at norm ratio 1."""
    path = "blocks.0.self_attn.q"
    gen = torch.Generator().manual_seed(1)
    shared = torch.randn(6, 5, generator=gen)
    trained = {f"t{i}": shared + 0.3 * torch.randn(6, 5, generator=gen) for i in range(4)}
    held_out = 0.2 * shared + 0.3 * torch.randn(6, 5, generator=gen)  # leans away from the training mean
    deltas = {**trained, "held": held_out}
    store = _Store({k: {path: LoRAFactors(d, torch.eye(5), 1.0)} for k, d in deltas.items()})
    samples = {k: Sample(id=k, lora=None, condition={"kind": "text", "prompt": f"a {k}"}, group=None,
                         split="train", latents=None, line=1) for k in deltas}
    baselines = build_baselines(store, [samples[k] for k in trained], {path: torch.ones(6, 5)}, tau=0.02)
    mean = baselines.mean_delta[path]
    for prediction, expected_cos, expected_ratio in ((torch.zeros(6, 5), None, 0.0), (held_out, 1.0, 1.0)):
        scores = defaultdict(list)
        lora = PredictedLoRA("wan2.1-t2v", {path: LoRAFactors(prediction, torch.eye(5), 1.0)})
        _weight_space_scores(scores, store, samples["held"], {path: torch.ones(6, 5)}, baselines, None, lora, 0.02)
        floor = torch.nn.functional.cosine_similarity((-mean).flatten(), (held_out - mean).flatten(), dim=0).item()
        assert abs(scores["zero_dw_cos_centered"][0] - floor) < 1e-5
        assert floor > 0.5  # the empty LoRA's floor is far above 0 here
        assert abs(scores["dw_cos_centered"][0] - (floor if expected_cos is None else expected_cos)) < 1e-5
        assert abs(scores["dw_norm_ratio"][0] - expected_ratio) < 1e-5


def test_per_pair_baseline_recovers_what_two_words_do_together_and_per_word_cannot():
    """When a task's dW is a sum of one matrix per word and one per pair of words, the per-pair model (without its
    ridge) predicts a held-out combination exactly, since each of its pairs occurs in other training tasks; the
    per-word model misses the pair terms; the default ridge only shrinks the pair terms, so it still lands far
    closer than the per-word model."""
    gen = torch.Generator().manual_seed(1)
    groups = (("red", "blue", "green"), ("dots", "bars", "waves"), ("slow", "fast", "still"))
    effect = {w: torch.randn(6, 5, generator=gen) for g in groups for w in g}
    effect |= {pair: torch.randn(6, 5, generator=gen) for g1, g2 in itertools.combinations(groups, 2)
               for pair in itertools.product(g1, g2)}
    combos = list(itertools.product(*groups))
    held_out = ("green", "waves", "still")
    samples = {c: _sample(c) for c in combos}

    def truth_of(c):
        return sum(effect[w] for w in c) + sum(effect[pair] for pair in itertools.combinations(c, 2))

    store = _Store({samples[c].id: {"blocks.0.self_attn.q": LoRAFactors(truth_of(c), torch.eye(5), 1.0)}
                    for c in combos})
    train = [samples[c] for c in combos if c != held_out]
    weights = {"blocks.0.self_attn.q": torch.ones(6, 5)}
    truth = truth_of(held_out)
    exact = build_baselines(store, train, weights, tau=0.02, pair_ridge=0.0)
    assert ("green", "waves") in exact.word_pairs.pairs and ("green", "red") not in exact.word_pairs.pairs
    torch.testing.assert_close(exact.per_pair(samples[held_out])["blocks.0.self_attn.q"], truth, rtol=1e-3,
                               atol=1e-3)
    default = build_baselines(store, train, weights, tau=0.02)
    word_error = float((default.per_word(samples[held_out])["blocks.0.self_attn.q"] - truth).norm())
    pair_error = float((default.per_pair(samples[held_out])["blocks.0.self_attn.q"] - truth).norm())
    assert word_error > 0.3 * float(truth.norm())
    assert pair_error < 0.5 * word_error
