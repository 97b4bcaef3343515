"""Stage-I and Stage-II runs: data set-up, the trainer, held-out evaluation and the export of a LoFA checkpoint."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from accelerate.utils import set_seed
from safetensors import safe_open
from safetensors.torch import load_file

from lofa_core import base_signature
from lofa_core.checkpoint import LoFACheckpoint, load_checkpoint, save_checkpoint
from lofa_core.conditioning import ConditionSpec, image_spec, pose_spec
from lofa_core.config import RATIO_EPS
from lofa_core.families import build_catalog, get_family
from lofa_core.hypernet import LoFAHypernet, Stage1Net, Stage2Net
from lofa_core.targets import TargetCatalog, check_compatible, strip_model_prefix

from .base_models import BaseModel, load_base_model, load_target_weights
from .baselines import Baselines, build_baselines
from .config import RunConfig, Stage1Config, Stage2Config
from .dataset import DatasetError, SampleStore, check_dataset, read_samples
from .evaluate import as_checkpoint, evaluate
from .replicates import load_replicates
from .stage1 import Stage1Objective, build_stage1, stage1_batch
from .stage2 import Frozen, Stage2Objective, build_single_stage, build_stage2, stage2_batch, typical_scale
from .trainer import Trainer

STAGE1_EXPORT = "lofa_stage1.safetensors"
STAGE2_EXPORT = "lofa.safetensors"


def base_catalog(path: str | Path, groups) -> tuple[TargetCatalog, dict[str, tuple[int, ...]]]:
    with safe_open(str(path), framework="pt") as fh:
        shapes = {strip_model_prefix(k): tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    return build_catalog(shapes, groups), shapes


def dataset_spec(cfg: RunConfig, samples: list, family: str) -> ConditionSpec:
    """The condition a new checkpoint takes, from the dataset's condition kind and the run's settings."""
    kinds = {s.condition.get("kind", "text") for s in samples}
    if len(kinds) != 1:
        raise DatasetError(f"{cfg.dataset} mixes condition kinds {sorted(kinds)}; one LoFA model takes one kind.")
    kind = kinds.pop()
    if kind == "pose":
        return pose_spec(cfg.pose_frames, cfg.pose_size)
    if kind == "image":
        first = next((s.embedding for s in samples if s.embedding is not None and s.embedding.exists()), None)
        if first is None:
            raise DatasetError(f"{cfg.dataset}: image conditions have no cached features; run `python -m training "
                               f"encode --image-encoder ...` first.")
        second = next((s.embedding_2 for s in samples if s.embedding_2 is not None and s.embedding_2.exists()), None)
        if second is not None and cfg.image_feature != "image_embeds":
            raise DatasetError(f"{cfg.dataset} has two image features per sample (embedding_2): mixing them works on "
                               f"pooled features; set image_feature=image_embeds.")
        second_dim = load_file(str(second))["image_embeds"].shape[-1] if second is not None else 0
        return image_spec(load_file(str(first))[cfg.image_feature].shape[-1], cfg.image_feature,
                          second_dim=second_dim)
    return get_family(family).text_condition


class Data:
    """Dataset, target weights and split of a run, validated up front.

    `val` tasks are evaluated during training (for choosing settings), `test` tasks only at the end (reported).
    """

    def __init__(self, cfg: RunConfig, need_latents: bool, spec: ConditionSpec | None = None,
                 catalog: TargetCatalog | None = None) -> None:
        base_cat, shapes = base_catalog(cfg.base_model, cfg.target_groups)
        if catalog is not None:
            check_compatible(catalog, base_cat, "the Stage-I checkpoint")
        self.catalog = catalog or base_cat
        self.spec = spec or dataset_spec(cfg, read_samples(cfg.dataset), self.catalog.family)
        caption_spec = get_family(self.catalog.family).text_condition
        samples = check_dataset(cfg.dataset, self.catalog, self.spec, need_latents=need_latents,
                                latent_channels=get_family(self.catalog.family).latent_channels(shapes),
                                caption_spec=caption_spec)
        self.store = SampleStore(cfg.dataset, samples, self.catalog, self.spec, caption_spec=caption_spec)
        self.train = self.store.split("train")
        self.val = self.store.split("val")
        self.test = self.store.split("test")
        self.weights = load_target_weights(cfg.base_model, self.catalog)
        self.eval_samples = cfg.eval_samples
        self._baselines = None

    def on(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {p: w.to(device) for p, w in self.weights.items()}

    def baselines(self, tau: float) -> Baselines:
        if self._baselines is None:
            self._baselines = build_baselines(self.store, self.train, self.weights, tau)
        return self._baselines

    def evaluator(self, model: LoFACheckpoint, weights: dict[str, torch.Tensor], device: torch.device,
                  base: BaseModel | None, seed: int):
        """The trainer's evaluation: val tasks during training; val and test tasks after the last step."""

        def run(final: bool) -> dict[str, float]:
            out = {}
            for name, samples in (("val", self.val), ("test", self.test if final else [])):
                if samples:
                    scores = evaluate(model, self.store, samples[: self.eval_samples], weights,
                                      self.baselines(model.tau), device, base=base, seed=seed,
                                      retrieval_pool=self.train[: self.eval_samples])
                    out |= {f"{name}/{k}": v for k, v in scores.items()}
            return out

        return run if (self.val or self.test) else None


def response_tau(cfg: RunConfig, data: Data, max_elements: int = 4_000_000) -> RunConfig:
    """`cfg` with tau set from `response_fraction` (the quantile of |dW| / |W| over training LoRAs), if set."""
    if not cfg.response_fraction:
        return cfg
    if not 0 < cfg.response_fraction < 1:
        raise SystemExit(f"response_fraction must lie between 0 and 1, not {cfg.response_fraction}")
    gen = torch.Generator().manual_seed(cfg.seed)
    ratios = []
    for sample in data.train[:16]:
        for t in data.catalog.targets:
            ratio = (data.store.delta(sample, t.path).abs() / (data.weights[t.path].abs() + RATIO_EPS)).flatten()
            ratios.append(ratio[torch.randint(len(ratio), (min(len(ratio), 4096),), generator=gen)])
    values = torch.cat(ratios)[:max_elements]
    tau = float(torch.quantile(values, 1 - cfg.response_fraction))
    print(f"tau = {tau:.4g}: {cfg.response_fraction:.0%} of the training LoRAs' weights respond")
    return dataclasses.replace(cfg, tau=tau)


def run_stage1(cfg: Stage1Config, resume: str | bool = False) -> Path:
    data = Data(cfg, need_latents=False)
    cfg = response_tau(cfg, data)
    set_seed(cfg.seed)  # the initial weights are part of the run: a re-run starts from the same ones
    net = build_stage1(cfg, data.catalog, data.spec)
    trainer = Trainer(cfg, Stage1Objective(net, cfg.l2_penalty), net, "stage1")
    trainer.resume(resume)
    weights = data.on(trainer.device)
    replicates = load_replicates(cfg.replicates, data.store, data.train)

    def objective(step, gen):
        groups, prompts = stage1_batch(data.store, data.train, weights, cfg, gen, trainer.device, replicates)
        return trainer.model(groups, prompts)

    model = as_checkpoint(net, None, data.catalog, data.spec, cfg.tau)
    trainer.fit(objective, data.evaluator(model, weights, trainer.device, None, cfg.seed))
    out = Path(cfg.out) / STAGE1_EXPORT
    if trainer.is_main:
        export(out, net, None, data.catalog, data.spec, cfg.tau, {"stage1_steps": cfg.steps, "dataset": cfg.dataset,
                                                                  "base_model": Path(cfg.base_model).name},
               data.weights)
    trainer.accelerator.wait_for_everyone()
    return out


def stage1_checkpoint(where: str | Path) -> LoFACheckpoint:
    path = Path(where)
    return load_checkpoint(path / STAGE1_EXPORT if path.is_dir() else path)


def run_stage2(cfg: Stage2Config, resume: str | bool = False) -> Path:
    if cfg.single_stage and cfg.stage1:
        raise SystemExit("--single-stage trains Stage-II without Stage-I: remove the `stage1` setting")
    if not cfg.single_stage and not cfg.stage1:
        raise SystemExit("Stage-II needs `stage1` (a Stage-I run folder or checkpoint), or --single-stage")
    first = None if cfg.single_stage else stage1_checkpoint(cfg.stage1)
    data = Data(cfg, need_latents=cfg.lambda_diff > 0, spec=first.condition if first else None,
                catalog=first.catalog if first else None)
    stage1: Stage1Net | None = first.net.stage1 if first else None
    if first is None:
        cfg = response_tau(cfg, data)
    tau = first.tau if first else cfg.tau
    set_seed(cfg.seed)
    alpha_init = cfg.alpha_init or typical_scale(data.store, data.train)
    net = (build_single_stage(cfg, data.catalog, data.spec, alpha_init) if cfg.single_stage
           else build_stage2(cfg, stage1, alpha_init))
    base = None
    if cfg.lambda_diff > 0 or data.val or data.test:
        base = load_base_model(cfg.base_model, cfg.target_groups)
        base.shift = cfg.flow_shift
        if cfg.gradient_checkpointing and hasattr(base.model, "enable_gradient_checkpointing"):
            base.model.enable_gradient_checkpointing()
    frozen = Frozen(stage1, base)
    trainer = Trainer(cfg, Stage2Objective(net, frozen, cfg), net, "stage2")
    trainer.resume(resume)
    if stage1 is not None:
        stage1.to(trainer.device)
    if base is not None:
        base.to(trainer.device)
    weights = data.on(trainer.device)

    def objective(step, gen):
        groups, prompts, latents = stage2_batch(data.store, data.train, weights, frozen, cfg, gen, trainer.device)
        return trainer.model(groups, prompts, latents, gen)

    model = as_checkpoint(stage1, net, data.catalog, data.spec, tau)
    trainer.fit(objective, data.evaluator(model, weights, trainer.device, base, cfg.seed))
    out = Path(cfg.out) / STAGE2_EXPORT
    if trainer.is_main:
        provenance = {**(first.provenance if first else {"single_stage": True}), "stage2_steps": cfg.steps,
                      "dataset": cfg.dataset, "base_model": Path(cfg.base_model).name}
        export(out, stage1, net, data.catalog, data.spec, tau, provenance, data.weights)
    trainer.accelerator.wait_for_everyone()
    return out


def export(out: Path, stage1: Stage1Net | None, stage2: Stage2Net | None, catalog: TargetCatalog, spec: ConditionSpec,
           tau: float, provenance: dict, base_weights: dict[str, torch.Tensor]) -> Path:
    """The run's result in the pack's checkpoint format (loads in the Load LoFA Model node), with the signature of
    the base model it was trained on (`base_weights`: target path -> weight), so the nodes recognise that model."""
    net = LoFAHypernet.from_stages(stage1, stage2)
    meta = {"trained": True, "source": "python -m training", "condition_kind": spec.kind, **provenance}
    name = f"{provenance['base_model']} ({catalog.describe()})"
    signature = base_signature.compute(catalog, lambda t: base_weights[t.path], name)
    return save_checkpoint(out, net, catalog, spec, tau=tau, provenance=meta, overwrite=True, base_signature=signature)
