"""Stage-II: predict B, A and alpha for every target, guided by the frozen Stage-I's final tokens.

`single_stage` trains the paper's "w/o res." ablation instead: the same network without Stage-I (no features
injected, no Stage-I checkpoint), its trunk trained from scratch.

loss = lambda_recon * L1(alpha * B @ A, dW_gt) + lambda_diff * diffusion loss of the frozen base model with the
predicted LoRAs injected (per sample, differentiably) [+ lambda_wp * DiffLoRA's weight-preserving L1].
Unlike the authors' code, alpha is part of what the reconstruction term sees (their spec B4), so the LoRA
scale is learned from the ground truth as well as from the diffusion loss.
"""

from __future__ import annotations

import torch
from torch import nn

from lofa_core.conditioning import ConditionSpec
from lofa_core.config import HyperNetConfig, axial_config_for, default_injection
from lofa_core.factory import condition_sizes
from lofa_core.hypernet import Stage1Net, Stage2Net
from lofa_core.targets import TargetCatalog

from .base_models import BaseModel
from .batches import Prompts, ShapeGroup, batch_prompts, contexts_for, jitter_pose_frames, make_groups
from .config import HypernetSizes, Stage2Config
from .dataset import SampleStore
from .injection import inject

HEADS = ("head_A.", "head_B.", "head_map.", "response_gain", "response_bias")


class Frozen:
    """Models the objective uses but never trains (kept out of the module tree: no DDP sync, no saving)."""

    def __init__(self, stage1: Stage1Net | None, base: BaseModel | None) -> None:
        self.stage1 = stage1.eval().requires_grad_(False) if stage1 is not None else None
        self.base = base
        self.feature_cache: dict[tuple[str, str], torch.Tensor] = {}  # Stage-I features per (sample, target)


class Stage2Objective(nn.Module):
    def __init__(self, net: Stage2Net, frozen: Frozen, cfg: Stage2Config) -> None:
        super().__init__()
        self.net = net
        self.frozen = frozen
        self.cfg = cfg

    def forward(self, groups: list[ShapeGroup], prompts: Prompts, latents: torch.Tensor,
                gen: torch.Generator) -> dict:
        cfg = self.cfg
        ctx = prompts.encode(self.net)
        samples = prompts.tokens.shape[0]
        factors: dict[str, list] = {}
        recon, wp, matrices = 0.0, 0.0, 0
        scale = 1.0
        if cfg.recon_normalize:  # one scale per batch (mean |dW_gt|): per-matrix scales blow up on near-zero dW
            scale = (sum(g.extra["delta"].abs().sum() for g in groups)
                     / sum(g.extra["delta"].numel() for g in groups)).clamp_min(1e-12)
        for g in groups:
            a, b, alpha = self.net(g.w, g.depth, g.type_index, contexts_for(ctx, g.sample),
                                   g.extra.get("stage1_features"))
            pred = alpha.float().unsqueeze(-1) * torch.bmm(b.float(), a.float())
            gt = g.extra["delta"]
            err = (pred - gt).abs()
            recon = recon + (err.mean(dim=(1, 2)) / scale).sum()
            wp = wp + (gt.abs() * err).mean(dim=(1, 2)).sum()
            matrices += len(g.targets)
            for m, t in enumerate(g.targets):
                factors.setdefault(t.path, [None] * samples)[int(g.sample[m])] = (a[m], b[m], alpha[m])
        recon, wp = recon / matrices, wp / matrices
        losses = {"recon": recon}
        total = cfg.lambda_recon * recon
        if cfg.lambda_wp:
            losses["wp"] = wp
            total = total + cfg.lambda_wp * wp
        if cfg.lambda_diff:
            stacked = {p: tuple(torch.stack(parts) for parts in zip(*per_sample)) for p, per_sample in factors.items()}
            with inject(self.frozen.base.modules, stacked):
                diff = self.frozen.base.diffusion_loss(latents, prompts.captions, None, gen)
            losses["diffusion"] = diff
            total = total + cfg.lambda_diff * diff
        losses["loss"] = total
        return losses


def build_stage2(cfg: Stage2Config, stage1: Stage1Net, alpha_init: float) -> Stage2Net:
    """Stage-II shaped like the Stage-I it reads; its trunk starts as Stage-I's unless disabled.

    `hypernet.cross_attn_idxs`: None injects Stage-I's features after the paper's default blocks, [] nowhere.
    """
    s1 = stage1.cfg
    ignored = ignored_sizes(cfg.hypernet, s1)
    if ignored:
        print(f"Stage-II takes its shape from the Stage-I run it reads, so {', '.join(ignored)} in the Stage-II "
              "config is ignored (to change it, train Stage-I with that size, or use --single-stage)", flush=True)
    chosen = cfg.hypernet.cross_attn_idxs
    injection = tuple(default_injection(s1.n_blocks) if chosen is None else chosen)
    net = Stage2Net(s1.replace(stage=2, cross_attn_idxs=injection, alpha_init=alpha_init))
    if cfg.init_from_stage1:
        trunk = {k: v for k, v in stage1.state_dict().items() if not k.startswith(HEADS)}
        missing, unexpected = net.load_state_dict(trunk, strict=False)
        assert not unexpected, unexpected
    net.gradient_checkpointing = cfg.gradient_checkpointing
    return net


def ignored_sizes(sizes: HypernetSizes, stage1: HyperNetConfig) -> list[str]:
    """Sizes the user changed from the defaults that differ from Stage-I's (they would be silently ignored)."""
    default = HypernetSizes()
    return [f"hypernet.{name}={getattr(sizes, name)} (Stage-I: {getattr(stage1, name)})"
            for name in ("d_model", "n_heads", "n_blocks", "patch_size", "rank", "mlp_ratio")
            if getattr(sizes, name) != getattr(default, name) and getattr(sizes, name) != getattr(stage1, name)]


def build_single_stage(cfg: Stage2Config, catalog: TargetCatalog, spec: ConditionSpec, alpha_init: float
                       ) -> Stage2Net:
    """A fresh Stage-II that reads no Stage-I features, sized by `cfg.hypernet` (the ablation baseline)."""
    sizes = {k: v for k, v in vars(cfg.hypernet).items() if v is not None and k != "cross_attn_idxs"}
    config = axial_config_for(sorted({t.shape for t in catalog.targets}), stage=2, num_depths=catalog.num_depths,
                              num_types=len(catalog.type_names), **condition_sizes(spec), tau=cfg.tau,
                              cross_attn_idxs=(), alpha_init=alpha_init, **sizes)
    net = Stage2Net(config)
    net.gradient_checkpointing = cfg.gradient_checkpointing
    return net


def typical_scale(store: SampleStore, samples: list, count: int = 8) -> float:
    """Mean |dW| of (up to `count`) training LoRAs: the natural starting value of alpha."""
    values = [store.delta(s, t.path).abs().mean() for s in samples[:count] for t in store.catalog.targets]
    return max(float(torch.stack(values).mean()), 1e-8)


def stage2_batch(store: SampleStore, train: list, weights: dict[str, torch.Tensor], frozen: Frozen,
                 cfg: Stage2Config, gen: torch.Generator, device: torch.device):
    """All targets of `batch_size` training LoRAs, their Stage-I features, one latent per sample."""
    targets = store.catalog.targets
    chosen = [train[int(i)] for i in torch.randint(len(train), (cfg.batch_size,), generator=gen)]
    items, deltas = [], []
    for si, sample in enumerate(chosen):
        for t in targets:
            items.append((si, t))
            deltas.append(store.delta(sample, t.path))
    prompts = batch_prompts([store.condition(s) for s in chosen], device,
                            [store.caption(s) for s in chosen] if cfg.lambda_diff else None)
    if prompts.log_counts is None:  # pose frames
        prompts.tokens = jitter_pose_frames(prompts.tokens, cfg.pose_jitter, gen)
    groups = make_groups(items, weights, device, {"delta": deltas})
    if frozen.stage1 is not None:
        with torch.no_grad():
            ctx1 = prompts.encode(frozen.stage1)
            for g in groups:
                samples = [chosen[int(s)] for s in g.sample]
                g.extra["stage1_features"] = frozen_stage1_features(frozen, g, ctx1, samples, cfg)
    latents = []
    for sample in chosen:
        pool = store.latents(sample)
        latents.append(pool[int(torch.randint(len(pool), (1,), generator=gen))])
    return groups, prompts, torch.stack(latents).to(device)


def frozen_stage1_features(frozen: Frozen, g: ShapeGroup, ctx1, samples: list, cfg: Stage2Config):
    """Frozen Stage-I final tokens for a group, optionally memoised per (sample, target) on the CPU."""
    keys = [(s.id, t.path) for s, t in zip(samples, g.targets)]
    if cfg.cache_stage1_features and all(k in frozen.feature_cache for k in keys):
        return torch.stack([frozen.feature_cache[k] for k in keys]).to(g.w.device)
    features = frozen.stage1.forward_features(g.w, g.depth, g.type_index, contexts_for(ctx1, g.sample), logits=False)[0]
    if cfg.cache_stage1_features:
        for k, f in zip(keys, features):
            frozen.feature_cache[k] = f.cpu()
    return features
