"""Held-out evaluation of both stages against the baselines a useful hypernetwork must beat.

Stage-I: cosine similarity and IoU of the predicted response map with the ground truth, next to the best
constant map (the training-set mean map of each target). Stage-II: cosine similarity of the predicted dW with the
ground truth next to the mean training LoRA; agreement of its response map with the ground truth and with
Stage-I (the paper reports 0.83 and 0.91, and 0.77 for Stage-I); and the base model's diffusion loss on the
held-out latents with the predicted LoRA, the ground-truth LoRA and none (same noise and timesteps).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from lofa_core.hypernet import Stage1Net, Stage2Net
from lofa_core.response import cosine_similarity, iou, response_map

from .base_models import BaseModel
from .batches import batch_prompts, make_groups
from .dataset import Sample, SampleStore
from .injection import inject
from .trainer import step_generator


@dataclass
class Baselines:
    mean_map: dict[str, torch.Tensor]
    mean_delta: dict[str, torch.Tensor]


def training_means(store: SampleStore, train: list[Sample], weights: dict[str, torch.Tensor], tau: float
                   ) -> Baselines:
    """Per-target mean response map and mean dW over the training split."""
    maps, deltas = defaultdict(float), defaultdict(float)
    for sample in train:
        for t in store.catalog.targets:
            delta = store.delta(sample, t.path)
            deltas[t.path] = deltas[t.path] + delta
            maps[t.path] = maps[t.path] + response_map(delta, weights[t.path].cpu(), tau)
    n = max(1, len(train))
    return Baselines({p: m / n for p, m in maps.items()}, {p: d / n for p, d in deltas.items()})


@torch.no_grad()
def predict_sample(net1: Stage1Net, net2: Stage2Net | None, store: SampleStore, sample: Sample,
                   weights: dict[str, torch.Tensor], device: torch.device):
    """-> ({path: response probabilities}, {path: (A, B, alpha)} or None) for every target of one sample."""
    prompts = batch_prompts([store.condition(sample)], device)
    ctx1 = prompts.encode(net1)
    ctx2 = prompts.encode(net2) if net2 is not None else None
    probs, factors = {}, {} if net2 is not None else None
    for g in make_groups([(0, t) for t in store.catalog.targets], weights, device):
        feats, logits = net1.forward_features(g.w, g.depth, g.kind, ctx1)
        p = torch.sigmoid(logits.float()).cpu()
        if net2 is not None:
            a, b, alpha = net2(g.w, g.depth, g.kind, ctx2, feats)
        for m, t in enumerate(g.targets):
            probs[t.path] = p[m]
            if net2 is not None:
                factors[t.path] = (a[m].float(), b[m].float(), alpha[m].float())
    return probs, factors


def _mean(values: list[float]) -> float:
    return float(sum(values) / max(1, len(values)))


def evaluate_stage1(net1: Stage1Net, store: SampleStore, samples: list[Sample], weights: dict[str, torch.Tensor],
                    baselines: Baselines, device: torch.device) -> dict[str, float]:
    tau = net1.cfg.tau
    scores = defaultdict(list)
    was_training = net1.training
    net1.eval()
    for sample in samples:
        probs, _ = predict_sample(net1, None, store, sample, weights, device)
        for t in store.catalog.targets:
            gt = response_map(store.delta(sample, t.path), weights[t.path].cpu(), tau)
            scores["map_cos"].append(cosine_similarity(probs[t.path], gt).item())
            scores["map_iou"].append(iou(probs[t.path], gt).item())
            scores["mean_map_cos"].append(cosine_similarity(baselines.mean_map[t.path], gt).item())
            scores["mean_map_iou"].append(iou(baselines.mean_map[t.path], gt).item())
    net1.train(was_training)
    return {k: _mean(v) for k, v in scores.items()}


def evaluate_stage2(net1: Stage1Net, net2: Stage2Net, base: BaseModel | None, store: SampleStore,
                    samples: list[Sample], weights: dict[str, torch.Tensor], baselines: Baselines,
                    device: torch.device, seed: int = 0, latents_per_sample: int = 4) -> dict[str, float]:
    tau = net1.cfg.tau
    scores = defaultdict(list)
    was_training = net2.training
    net2.eval()
    for index, sample in enumerate(samples):
        probs, factors = predict_sample(net1, net2, store, sample, weights, device)
        for t in store.catalog.targets:
            a, b, alpha = factors[t.path]
            pred = (alpha * (b @ a)).cpu()
            gt = store.delta(sample, t.path)
            w = weights[t.path].cpu()
            pred_map, gt_map = response_map(pred, w, tau), response_map(gt, w, tau)
            scores["dw_cos"].append(cosine_similarity(pred, gt).item())
            scores["mean_lora_dw_cos"].append(cosine_similarity(baselines.mean_delta[t.path], gt).item())
            scores["map_cos_gt"].append(cosine_similarity(pred_map, gt_map).item())
            scores["map_cos_stage1"].append(cosine_similarity(pred_map, probs[t.path]).item())
        if base is not None and sample.latents is not None:
            for name, value in diffusion_losses(base, store, sample, factors, seed + index, latents_per_sample).items():
                scores[name].append(value)
    net2.train(was_training)
    return {k: _mean(v) for k, v in scores.items()}


@torch.no_grad()
def diffusion_losses(base: BaseModel, store: SampleStore, sample: Sample, predicted: dict, seed: int,
                     count: int) -> dict[str, float]:
    """Base-model diffusion loss on the sample's latents: predicted LoRA, ground-truth LoRA, no LoRA."""
    latents = store.latents(sample)[:count]
    cond = store.caption(sample)
    tokens = cond.tokens.unsqueeze(0).expand(len(latents), -1, -1).to(base.device)
    pooled = cond.pooled.unsqueeze(0).expand(len(latents), -1).to(base.device) if cond.pooled is not None else None

    def expand(f):
        a, b, alpha = f
        return a.unsqueeze(0).to(base.device), b.unsqueeze(0).to(base.device), alpha.reshape(1).to(base.device)

    truth = {p: (f.down, f.up, torch.tensor([f.scale])) for p, f in store.factors(sample).items()}
    out = {}
    for name, factors in (("diff_pred", predicted), ("diff_gt", truth), ("diff_none", {})):
        gen = step_generator(seed, 0)
        with inject(base.modules, {p: expand(f) for p, f in factors.items()}):  # one LoRA for the whole batch
            out[name] = float(base.diffusion_loss(latents.to(base.device), tokens, pooled, gen))
    return out
