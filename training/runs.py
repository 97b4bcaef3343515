"""Stage-I and Stage-II runs: data set-up, the trainer, held-out evaluation and the export of a LoFA checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate.utils import set_seed
from safetensors import safe_open
from safetensors.torch import load_file

from lofa_core import base_signature
from lofa_core.checkpoint import LoFACheckpoint, load_checkpoint, save_checkpoint
from lofa_core.conditioning import DEFAULT_FOR_FAMILY, ConditionSpec, image_spec, pose_spec
from lofa_core.hypernet import LoFAHypernet, Stage1Net, Stage2Net
from lofa_core.targets import TargetCatalog, build_catalog, check_compatible, strip_model_prefix

from .base_models import load_base_model, load_target_weights
from .config import RunConfig, Stage1Config, Stage2Config
from .dataset import DatasetError, SampleStore, check_dataset, read_samples
from .evaluate import evaluate_stage1, evaluate_stage2, training_means
from .stage1 import Stage1Objective, build_stage1, stage1_batch
from .stage2 import Frozen, Stage2Objective, build_stage2, stage2_batch, typical_scale
from .trainer import Trainer

STAGE1_EXPORT = "lofa_stage1.safetensors"
STAGE2_EXPORT = "lofa.safetensors"


def base_catalog(path: str | Path, groups) -> tuple[TargetCatalog, dict[str, tuple[int, ...]]]:
    with safe_open(str(path), framework="pt") as fh:
        shapes = {strip_model_prefix(k): tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    return build_catalog(shapes, groups), shapes


def latent_channels(shapes: dict[str, tuple[int, ...]], family: str) -> int:
    key = "patch_embedding.weight" if family == "wan2.1-t2v" else "input_blocks.0.0.weight"
    return shapes[key][1]


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
    return DEFAULT_FOR_FAMILY[family]


class Data:
    """Dataset, target weights and split of a run, validated up front."""

    def __init__(self, cfg: RunConfig, need_latents: bool, spec: ConditionSpec | None = None,
                 catalog: TargetCatalog | None = None) -> None:
        base_cat, shapes = base_catalog(cfg.base_model, cfg.target_groups)
        if catalog is not None:
            check_compatible(catalog, base_cat, "the Stage-I checkpoint")
        self.catalog = catalog or base_cat
        self.spec = spec or dataset_spec(cfg, read_samples(cfg.dataset), self.catalog.family)
        caption_spec = DEFAULT_FOR_FAMILY[self.catalog.family]
        samples = check_dataset(cfg.dataset, self.catalog, self.spec, need_latents=need_latents,
                                latent_channels=latent_channels(shapes, self.catalog.family),
                                caption_spec=caption_spec)
        self.store = SampleStore(cfg.dataset, samples, self.catalog, self.spec, caption_spec=caption_spec)
        self.train = self.store.split("train")
        self.held_out = self.store.split("val") or self.store.split("test")
        self.weights = load_target_weights(cfg.base_model, self.catalog)
        self._baselines = None

    def on(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {p: w.to(device) for p, w in self.weights.items()}

    def baselines(self, tau: float):
        if self._baselines is None:
            self._baselines = training_means(self.store, self.train, self.weights, tau)
        return self._baselines


def run_stage1(cfg: Stage1Config, resume: str | bool = False) -> Path:
    data = Data(cfg, need_latents=False)
    set_seed(cfg.seed)  # the initial weights are part of the run: a re-run starts from the same ones
    net = build_stage1(cfg, data.catalog, data.spec)
    trainer = Trainer(cfg, Stage1Objective(net, cfg.l2_penalty), net, "stage1")
    trainer.resume(resume)
    weights = data.on(trainer.device)

    def objective(step, gen):
        groups, prompts = stage1_batch(data.store, data.train, weights, cfg, gen, trainer.device)
        return trainer.model(groups, prompts)

    def evaluate():
        return evaluate_stage1(net, data.store, data.held_out, weights, data.baselines(cfg.tau), trainer.device)

    trainer.fit(objective, evaluate if data.held_out else None)
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
    first = stage1_checkpoint(cfg.stage1)
    data = Data(cfg, need_latents=cfg.lambda_diff > 0, spec=first.condition, catalog=first.catalog)
    stage1: Stage1Net = first.net.stage1
    set_seed(cfg.seed)
    net = build_stage2(cfg, stage1, cfg.alpha_init or typical_scale(data.store, data.train))
    base = load_base_model(cfg.base_model, cfg.target_groups) if (cfg.lambda_diff > 0 or data.held_out) else None
    if base is not None:
        base.shift = cfg.flow_shift
        if cfg.gradient_checkpointing and hasattr(base.model, "enable_gradient_checkpointing"):
            base.model.enable_gradient_checkpointing()
    frozen = Frozen(stage1, base)
    trainer = Trainer(cfg, Stage2Objective(net, frozen, cfg), net, "stage2")
    trainer.resume(resume)
    stage1.to(trainer.device)
    if base is not None:
        base.to(trainer.device)
    weights = data.on(trainer.device)

    def objective(step, gen):
        groups, prompts, latents = stage2_batch(data.store, data.train, weights, frozen, cfg, gen, trainer.device)
        return trainer.model(groups, prompts, latents, gen)

    def evaluate():
        return evaluate_stage2(stage1, net, base, data.store, data.held_out, weights, data.baselines(first.tau),
                               trainer.device, seed=cfg.seed)

    trainer.fit(objective, evaluate if data.held_out else None)
    out = Path(cfg.out) / STAGE2_EXPORT
    if trainer.is_main:
        export(out, stage1, net, data.catalog, data.spec, first.tau,
               {**first.provenance, "stage2_steps": cfg.steps, "dataset": cfg.dataset,
                "base_model": Path(cfg.base_model).name}, data.weights)
    trainer.accelerator.wait_for_everyone()
    return out


def export(out: Path, stage1: Stage1Net, stage2: Stage2Net | None, catalog: TargetCatalog, spec: ConditionSpec,
           tau: float, provenance: dict, base_weights: dict[str, torch.Tensor]) -> Path:
    """The run's result in the pack's checkpoint format (loads in the Load LoFA Model node), with the signature of
    the base model it was trained on (`base_weights`: target path -> weight), so the nodes recognise that model."""
    net = LoFAHypernet.from_stages(stage1, stage2)
    meta = {"trained": True, "source": "python -m training", "condition_kind": spec.kind, **provenance}
    name = f"{provenance['base_model']} ({catalog.describe()})"
    signature = base_signature.compute(catalog, lambda t: base_weights[t.path], name)
    return save_checkpoint(out, net, catalog, spec, tau=tau, provenance=meta, overwrite=True, base_signature=signature)
