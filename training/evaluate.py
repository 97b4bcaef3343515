"""Held-out evaluation of a LoFA model next to the baselines it has to beat, through the prediction code users run.

Predictions come from `lofa_core.predict.predict`, the function the ComfyUI node calls. On each held-out task:

* Stage-I: cosine and IoU of the predicted response map with the ground truth, next to the training mean map.
* Stage-II, weight space: cosine of the predicted dW with the ground truth, raw and with the training-mean LoRA
  removed from both (what is specific to the task), next to the mean LoRA, the per-word and per-pair LoRAs
  composed from the training tasks' words (`baselines.py`) and the empty LoRA (a prediction of nothing scores
  cos(-mean, gt - mean) once the mean is removed, above 0 where held-out tasks lean away from the training mean);
  |predicted dW| / |dW_gt| (near 0: a collapsed predictor); retrieval: is the task's own ground truth the closest
  (mean removed) among all evaluated tasks, and among all tasks including the training ones; the predicted LoRA's
  response map against the ground truth's and against Stage-I's (the paper reports 0.83 and 0.91).
* Stage-II, function: the base model's diffusion loss on the task's held-out latents (same latents, noise and
  timesteps for every candidate) with no LoRA, the ground-truth LoRA, the prediction, the mean LoRA, the
  norm-matched constant LoRA, the per-word and per-pair LoRAs and every other evaluated task's ground-truth LoRA
  (task swap).
  `gap_<x> = sum(none - x) / sum(none - gt)`: the share of the ground-truth LoRA's improvement that x reaches.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

import torch

from lofa_core.checkpoint import LoFACheckpoint
from lofa_core.conditioning import ConditionSpec
from lofa_core.hypernet import LoFAHypernet, Stage1Net, Stage2Net
from lofa_core.lora_formats import LoRAFactors, PredictedLoRA
from lofa_core.predict import predict
from lofa_core.response import cosine_similarity, iou, response_map
from lofa_core.targets import TargetCatalog

from .base_models import BaseModel, make_captions
from .baselines import Baselines, task_words
from .dataset import Sample, SampleStore
from .injection import inject, inject_deltas
from .trainer import step_generator

DIFFUSION_CANDIDATES = ("none", "gt", "pred", "mean", "constant", "per_word", "per_pair")


def as_checkpoint(stage1: Stage1Net | None, stage2: Stage2Net | None, catalog: TargetCatalog, spec: ConditionSpec,
                  tau: float) -> LoFACheckpoint:
    """The networks being trained, seen as the checkpoint the nodes would load."""
    return LoFACheckpoint(LoFAHypernet.from_stages(stage1, stage2), catalog, spec, tau, "(training run)")


def predict_task(model: LoFACheckpoint, store: SampleStore, sample: Sample, weights: Mapping[str, torch.Tensor],
                 device: torch.device):
    """(full-resolution Stage-I maps {path: probabilities} or None, PredictedLoRA or None) for one task."""
    net = model.net
    result = predict(model, store.catalog.targets, lambda t: weights[t.path], store.condition(sample), device=device,
                     dtype=torch.float32, with_lora=net.stage2 is not None, with_response=net.stage1 is not None,
                     response_side=None)
    maps = None
    if result.response is not None:
        by_key = dict(zip(result.response.keys, result.response.maps))
        maps = {t.path: by_key[t.key] for t in store.catalog.targets}
    return maps, result.lora


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / max(1, len(values)))


@torch.no_grad()
def evaluate(model: LoFACheckpoint, store: SampleStore, samples: Sequence[Sample], weights: Mapping[str, torch.Tensor],
             baselines: Baselines, device: torch.device, *, base: BaseModel | None = None,
             retrieval_pool: Sequence[Sample] = (), seed: int = 0, latents_per_task: int = 8,
             noise_draws: int = 4) -> dict[str, float]:
    """Every held-out metric of `model` on `samples` (see the module docstring); keys are flat names."""
    nets = [n for n in (model.net.stage1, model.net.stage2) if n is not None]
    modes = [n.training for n in nets]
    for n in nets:
        n.eval()
    try:
        return score_predictions(lambda s: predict_task(model, store, s, weights, device), store, samples, weights,
                                 baselines, model.tau, base=base, retrieval_pool=retrieval_pool, seed=seed,
                                 latents_per_task=latents_per_task, noise_draws=noise_draws)
    finally:
        for n, mode in zip(nets, modes):
            n.train(mode)


Predictor = Callable[[Sample], tuple[dict[str, torch.Tensor] | None, PredictedLoRA | None]]


@torch.no_grad()
def score_predictions(predictor: Predictor, store: SampleStore, samples: Sequence[Sample],
                      weights: Mapping[str, torch.Tensor], baselines: Baselines, tau: float, *,
                      base: BaseModel | None = None, retrieval_pool: Sequence[Sample] = (), seed: int = 0,
                      latents_per_task: int = 8, noise_draws: int = 4) -> dict[str, float]:
    """The held-out metrics of any predictor of (response maps, LoRA) per task: a LoFA model, or another LoRA of
    the same task (`ceiling.py`)."""
    scores: dict[str, list[float]] = defaultdict(list)
    predictions: list[PredictedLoRA] = []
    for sample in samples:
        maps, lora = predictor(sample)
        _weight_space_scores(scores, store, sample, weights, baselines, maps, lora, tau)
        if lora is not None:
            predictions.append(lora)
    out = {k: _mean(v) for k, v in scores.items()}
    if predictions:
        out |= retrieval(store, samples, predictions, baselines, retrieval_pool)
        if base is not None:
            out |= diffusion_gaps(base, store, samples, predictions, baselines, seed, latents_per_task, noise_draws)
    out["tasks"] = float(len(samples))
    return out


def score_splits(run, data, weights: Mapping[str, torch.Tensor], base: BaseModel | None, predictor: Predictor,
                 tau: float, splits: Sequence[str] = ("val", "test"),
                 keep: Callable[[Sample], bool] | None = None) -> dict[str, dict[str, float]]:
    """{split: rounded metrics} of `predictor` on a run's held-out tasks, with the samples, latents, noise and
    retrieval pool of the run's own final evaluation (`data`: its `runs.Data`; `keep`: a filter on samples)."""
    out = {}
    for name in splits:
        samples = [s for s in getattr(data, name)[: run.eval_samples] if keep is None or keep(s)]
        if samples:
            scores = score_predictions(predictor, data.store, samples, weights, data.baselines(tau), tau, base=base,
                                       seed=run.seed, retrieval_pool=data.train[: run.eval_samples])
            out[name] = {k: round(v, 4) for k, v in scores.items()}
    return out


def _weight_space_scores(scores, store: SampleStore, sample: Sample, weights, baselines: Baselines, maps, lora,
                         tau: float) -> None:
    composed = {name: m.predict(task_words(sample)) for name, m in baselines.composed().items()} if lora is not None \
        else {}
    word_maps = baselines.per_word_map(sample) if maps is not None else None
    for t in store.catalog.targets:
        gt = store.delta(sample, t.path)
        w = weights[t.path].float().cpu()
        gt_map = response_map(gt, w, tau)
        if maps is not None:
            scores["map_cos"].append(cosine_similarity(maps[t.path], gt_map).item())
            scores["map_iou"].append(iou(maps[t.path], gt_map).item())
            scores["mean_map_cos"].append(cosine_similarity(baselines.mean_map[t.path], gt_map).item())
            scores["mean_map_iou"].append(iou(baselines.mean_map[t.path], gt_map).item())
            if word_maps is not None:
                scores["per_word_map_cos"].append(cosine_similarity(word_maps[t.path], gt_map).item())
                scores["per_word_map_iou"].append(iou(word_maps[t.path], gt_map).item())
        if lora is None:
            continue
        mean = baselines.mean_delta[t.path]
        pred = lora.factors[t.path].delta().cpu()
        pred_map = response_map(pred, w, tau)
        scores["dw_cos"].append(cosine_similarity(pred, gt).item())
        scores["dw_cos_centered"].append(cosine_similarity(pred - mean, gt - mean).item())
        scores["mean_lora_dw_cos"].append(cosine_similarity(mean, gt).item())
        # the empty LoRA's floor: predicting nothing still scores cos(-mean, gt - mean) with the mean removed
        scores["zero_dw_cos_centered"].append(cosine_similarity(-mean, gt - mean).item())
        scores["dw_norm_ratio"].append((pred.norm() / gt.norm().clamp_min(1e-30)).item())
        scores["lora_map_cos_gt"].append(cosine_similarity(pred_map, gt_map).item())
        if maps is not None:
            scores["lora_map_cos_stage1"].append(cosine_similarity(pred_map, maps[t.path]).item())
        for name, deltas in composed.items():
            scores[f"{name}_dw_cos"].append(cosine_similarity(deltas[t.path], gt).item())
            scores[f"{name}_dw_cos_centered"].append(cosine_similarity(deltas[t.path] - mean, gt - mean).item())


def retrieval(store: SampleStore, samples: Sequence[Sample], predictions: Sequence[PredictedLoRA],
              baselines: Baselines, pool: Sequence[Sample]) -> dict[str, float]:
    """Share of tasks whose own ground truth is the nearest (cosine over all targets, training mean removed) to
    the prediction: among the evaluated tasks, and among those plus `pool` (training tasks). The per-word and
    per-pair baselines are scored the same way."""
    own = list(samples)
    others = [s for s in pool if s.id not in {x.id for x in own}]
    everyone = own + others
    candidates = {"pred": [lambda p, i=i: predictions[i].factors[p].delta().cpu() for i in range(len(own))]}
    for name, model in baselines.composed().items():
        composed = [model.predict(task_words(s)) for s in own]
        candidates[name] = [lambda p, i=i, c=composed: c[i][p] for i in range(len(own))]
    out = {}
    for name, preds in candidates.items():
        dots = torch.zeros(len(own), len(everyone))
        pred_sq = torch.zeros(len(own))
        gt_sq = torch.zeros(len(everyone))
        for t in store.catalog.targets:
            mean = baselines.mean_delta[t.path]
            p = torch.stack([f(t.path) - mean for f in preds]).flatten(1)
            g = torch.stack([store.delta(s, t.path) - mean for s in everyone]).flatten(1)
            dots += p @ g.T
            pred_sq += p.pow(2).sum(1)
            gt_sq += g.pow(2).sum(1)
        cos = dots / (pred_sq.sqrt().unsqueeze(1) * gt_sq.sqrt().unsqueeze(0)).clamp_min(1e-30)
        prefix = "" if name == "pred" else f"{name}_"
        diagonal = torch.arange(len(own))
        out[f"{prefix}retrieval_heldout"] = float((cos[:, : len(own)].argmax(1) == diagonal).float().mean())
        out[f"{prefix}retrieval_all"] = float((cos.argmax(1) == diagonal).float().mean())
    return out


def _factors_of(lora: Mapping[str, LoRAFactors], device) -> dict:
    return {p: (f.down.unsqueeze(0).to(device), f.up.unsqueeze(0).to(device),
                torch.tensor([float(f.scale)], device=device)) for p, f in lora.items()}


def diffusion_gaps(base: BaseModel, store: SampleStore, samples: Sequence[Sample],
                   predictions: Sequence[PredictedLoRA], baselines: Baselines, seed: int, latents_per_task: int,
                   noise_draws: int) -> dict[str, float]:
    """Diffusion losses on each task's held-out latents for every candidate LoRA, and the gaps they close."""
    losses: dict[str, list[float]] = defaultdict(list)
    swap, own_first = [], []
    truths = [store.factors(s) for s in samples]
    constant = baselines.constant()
    in_sample = False
    for i, sample in enumerate(samples):
        latents, held = store.evaluation_latents(sample)
        in_sample |= not held
        latents = latents[:latents_per_task].repeat(noise_draws, *[1] * (latents.dim() - 1))
        cond = store.caption(sample)
        captions = make_captions([cond.tokens], None if cond.pooled is None else [cond.pooled],
                                 repeat=len(latents)).to(base.device)

        def loss_with(factors=None, deltas=None, i=i, latents=latents, captions=captions) -> float:
            gen = step_generator(seed, i)  # the same noise and timesteps for every candidate of this task
            with inject(base.modules, _factors_of(factors or {}, base.device)), \
                    inject_deltas(base.modules, {p: d.to(base.device) for p, d in (deltas or {}).items()}):
                return float(base.diffusion_loss(latents.to(base.device), captions, None, gen))

        losses["none"].append(loss_with())
        losses["gt"].append(loss_with(truths[i]))
        losses["pred"].append(loss_with(predictions[i].factors))
        losses["mean"].append(loss_with(deltas=baselines.mean_delta))
        losses["constant"].append(loss_with(deltas=constant))
        for name, model in baselines.composed().items():
            losses[name].append(loss_with(deltas=model.predict(task_words(sample))))
        others = [loss_with(truths[j]) for j in range(len(samples)) if j != i]
        if others:
            swap.append(sum(others) / len(others))
            own_first.append(float(losses["gt"][-1] < min(others)))
    out = {f"diff_{k}": _mean(v) for k, v in losses.items()}
    if swap:
        losses["swap"] = swap
        out["diff_swap"] = _mean(swap)
        out["gt_own_task_best"] = _mean(own_first)
    gt_gain = sum(n - g for n, g in zip(losses["none"], losses["gt"]))
    for name, values in losses.items():
        if name not in ("none", "gt"):
            out[f"gap_{name}"] = sum(n - x for n, x in zip(losses["none"], values)) / gt_gain if gt_gain else 0.0
    out["latents_held_out"] = float(not in_sample)
    return out
