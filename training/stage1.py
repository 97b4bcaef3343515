"""Stage-I: learn to predict response maps R = 1[|dW / W| > tau] with BCE-with-logits.

Each step draws `batch_size` training LoRAs and `layers_per_sample` of their target matrices (without
replacement), as the authors do; the loss adds their L2 penalty on the response factors. With `replicates`
(more LoRAs of the same training tasks, `replicates.py`) the target is the task's response *rate*: the share of
its LoRAs whose map marks a weight. One LoRA's map is a noisy draw of where a task responds; the rate is what a
prompt can tell, and BCE takes it as a soft target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lofa_core.conditioning import ConditionSpec
from lofa_core.config import RESPONSE_PATCH, RESPONSE_SOFTPLUS_TAU, axial_config_for
from lofa_core.factory import condition_sizes
from lofa_core.hypernet import Stage1Net
from lofa_core.response import response_map
from lofa_core.targets import TargetCatalog

from .batches import Prompts, ShapeGroup, batch_prompts, contexts_for, jitter_pose_frames, make_groups
from .config import Stage1Config
from .dataset import Sample, SampleStore
from .replicates import Replicates


class Stage1Objective(nn.Module):
    def __init__(self, net: Stage1Net, l2_penalty: float) -> None:
        super().__init__()
        self.net = net
        self.l2_penalty = l2_penalty

    def forward(self, groups: list[ShapeGroup], prompts: Prompts) -> dict:
        ctx = prompts.encode(self.net)
        bce_sum, elements, l2, matrices = 0.0, 0, 0.0, 0
        for g in groups:
            tokens, logits = self.net.forward_features(g.w, g.depth, g.type_index, contexts_for(ctx, g.sample))
            bce_sum = bce_sum + F.binary_cross_entropy_with_logits(logits, g.extra["target"], reduction="sum")
            elements += g.extra["target"].numel()
            if self.l2_penalty and hasattr(self.net, "head_A"):  # the authors' penalty on the response factors
                a, b = self.net.lora_factors(tokens, g.w.shape[-2], g.w.shape[-1])
                l2 = l2 + (a.float().pow(2).mean() + b.float().pow(2).mean()) * len(g.targets)
            matrices += len(g.targets)
        bce = bce_sum / elements
        l2 = l2 / matrices
        return {"loss": bce + self.l2_penalty * l2, "bce": bce} | ({"l2": l2} if torch.is_tensor(l2) else {})


def build_stage1(cfg: Stage1Config, catalog: TargetCatalog, spec: ConditionSpec) -> Stage1Net:
    """A fresh axial-head Stage-I covering every target shape of the catalog."""
    sizes = {k: v for k, v in vars(cfg.hypernet).items() if v is not None and k != "cross_attn_idxs"}
    response = {"patch": RESPONSE_PATCH, "softplus_tau": RESPONSE_SOFTPLUS_TAU}[cfg.response]
    config = axial_config_for(sorted({t.shape for t in catalog.targets}), stage=1, num_depths=catalog.num_depths,
                              num_types=len(catalog.type_names), **condition_sizes(spec), response=response,
                              tau=cfg.tau, **sizes)
    net = Stage1Net(config)
    net.gradient_checkpointing = cfg.gradient_checkpointing
    return net


def response_target(store: SampleStore, replicates: Replicates, sample: Sample, path: str, weight: torch.Tensor,
                    tau: float) -> torch.Tensor:
    """The sample's response map, or with replicates the mean of its task's maps (a rate in [0, 1])."""
    target = response_map(store.delta(sample, path), weight, tau)
    if not replicates:
        return target
    for other, groups in replicates:
        target = target + response_map(other.delta(groups[sample.group], path), weight, tau)
    return target / (1 + len(replicates))


def stage1_batch(store: SampleStore, train: list, weights: dict[str, torch.Tensor], cfg: Stage1Config,
                 gen: torch.Generator, device: torch.device, replicates: Replicates | None = None):
    """(shape groups with response targets, the batch's prompts) for one step."""
    targets = store.catalog.targets
    per_sample = min(cfg.layers_per_sample, len(targets))
    chosen = [train[int(i)] for i in torch.randint(len(train), (cfg.batch_size,), generator=gen)]
    items, maps = [], []
    for si, sample in enumerate(chosen):
        for j in torch.randperm(len(targets), generator=gen)[:per_sample].tolist():
            t = targets[j]
            items.append((si, t))
            maps.append(response_target(store, replicates or [], sample, t.path, weights[t.path], cfg.tau))
    prompts = batch_prompts([store.condition(s) for s in chosen], device)
    if prompts.log_counts is None:  # pose frames
        prompts.tokens = jitter_pose_frames(prompts.tokens, cfg.pose_jitter, gen)
    return make_groups(items, weights, device, {"target": maps}), prompts
