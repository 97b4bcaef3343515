"""Training configurations: one file per command (YAML or JSON), every field with a documented default.

Command line overrides use dotted paths: `--set steps=200 --set hypernet.d_model=64`.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lofa_core.config import DEFAULT_TAU, HyperNetConfig


@dataclass
class HypernetSizes:
    """Size of a new hypernetwork (ignored when Stage-II starts from a Stage-I run, which fixes the trunk).
    Defaults are the model's own (the authors' released size)."""

    d_model: int = HyperNetConfig.d_model
    n_heads: int = HyperNetConfig.n_heads
    n_blocks: int = HyperNetConfig.n_blocks
    patch_size: int = HyperNetConfig.patch_size
    rank: int = HyperNetConfig.rank
    mlp_ratio: float = HyperNetConfig.mlp_ratio
    cross_attn_idxs: list[int] | None = None  # Stage-II injection blocks; None: after the middle and last; []: none


@dataclass
class OptimConfig:
    lr: float = 1e-4
    warmup_steps: int = 1000
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    schedule: str = "constant"  # after warm-up: "constant" (the paper's) or "cosine" (decays to 0 at the last step)


@dataclass
class RunConfig:
    """What every trainer shares."""

    dataset: str = ""  # dataset folder (metadata.json[l], LoRA files, condition cache)
    base_model: str = ""  # the base model's diffusion weights, ComfyUI/original layout (.safetensors)
    out: str = ""  # run folder: checkpoints, metrics.jsonl, loss.png, the exported LoFA checkpoint
    steps: int = 4000
    batch_size: int = 4  # LoRA samples per optimiser step and process
    seed: int = 0
    mixed_precision: str = "no"  # "no", "bf16" or "fp16" (autocast; master weights stay float32)
    gradient_checkpointing: bool = False
    save_every: int = 500
    keep_checkpoints: int = 2
    eval_every: int = 500  # evaluate the val tasks every this many steps (val and test after the last step)
    eval_samples: int = 64  # at most this many tasks per split in an evaluation (and training tasks for retrieval)
    log_every: int = 10
    # > 0: evaluate and export an exponential moving average of the weights with this decay per step (e.g. 0.999
    # averages about the last 1,000 steps); 0: the last step's weights
    ema_decay: float = 0.0
    tau: float = DEFAULT_TAU  # response threshold: R = 1[|dW| > tau |W|] (the paper's 2 %)
    # if set, tau is instead chosen so that this share of the training LoRAs' weights respond (the paper's LoRAs
    # change 20-50 % of weights by more than 2 %; LoRAs of another scale need another tau for the same sparsity)
    response_fraction: float | None = None
    target_groups: list[str] = field(default_factory=lambda: ["attn"])
    image_feature: str = "penultimate_hidden_states"  # image conditions: which CLIP vision output to use
    pose_frames: int = 16  # pose conditions: frames and frame size the pose encoder takes
    pose_size: int = 64
    pose_jitter: int = 0  # pose conditions: shift each training sample's frames by up to this many pixels (0: off)
    optim: OptimConfig = field(default_factory=OptimConfig)
    hypernet: HypernetSizes = field(default_factory=HypernetSizes)


@dataclass
class Stage1Config(RunConfig):
    layers_per_sample: int = 10  # target matrices drawn (without replacement) from each LoRA per step
    l2_penalty: float = 1e-4  # on the response factors, as the authors
    response: str = "patch"  # "patch" (this pack's) or "softplus_tau" (the authors' bounded form)
    # dataset folders with more LoRAs of the same training tasks: learn each task's response rate over all of them
    replicates: list[str] = field(default_factory=list)


@dataclass
class Stage2Config(RunConfig):
    stage1: str = ""  # a Stage-I run folder (or its exported checkpoint); empty with single_stage
    single_stage: bool = False  # the paper's "w/o res." ablation: no Stage-I at all, the trunk trained from scratch
    init_from_stage1: bool = True  # paper: Stage-II's trunk starts as Stage-I's
    lambda_recon: float = 5.0  # L1 between predicted and ground-truth dW (alpha included)
    lambda_diff: float = 1.0  # diffusion loss with the predicted LoRA injected into the frozen base model
    lambda_wp: float = 0.0  # DiffLoRA's weight-preserving L1, mean(|dW| * |dW - dW_hat|)
    recon_normalize: bool = False  # divide the L1 by the batch's mean |dW_gt| (makes lambda_recon scale-free)
    cache_stage1_features: bool = False  # keep Stage-I features per sample in memory instead of recomputing
    alpha_init: float | None = None  # alpha's start; None: the training LoRAs' mean |dW|, so B A starts O(1)
    flow_shift: float = 5.0  # WAN timestep shift for the diffusion loss


@dataclass
class BuildConfig:
    """The paper's data preparation: one LoRA per task group, trained with the base model's own objective."""

    tasks: str = ""  # tasks.json[l]: [{"group", "prompt", "latents", "split"}]
    base_model: str = ""
    text_encoder: str = ""  # local folder(s) of the base model's text encoder (see training.encoding)
    out: str = ""  # dataset folder to write
    rank: int = 32
    steps: int = 1000
    lr: float = 1e-4
    batch_size: int = 4
    warmup_steps: int = 0
    schedule: str = "constant"  # after warm-up: "constant" or "cosine" (decays to 0 at the last step)
    init_seed: int = 0  # the same LoRA initialisation for every group
    init: str = "kaiming"  # A's start: "kaiming" (peft's) or "principal" (W's top right-singular vectors)
    init_from_lofa: str = ""  # a LoFA checkpoint: start each LoRA from its prediction for the group's prompt
    seed: int = 0
    groups_per_batch: int = 1  # LoRAs trained together in one batch (exact; faster for small models)
    target_groups: list[str] = field(default_factory=lambda: ["attn"])
    flow_shift: float = 5.0
    mixed_precision: str = "no"


@dataclass
class EncodeConfig:
    dataset: str = ""
    text_encoder: str = ""  # umT5 folder (WAN) or a folder with clip_l/ and clip_g/ (SDXL)
    family: str = "wan2.1-t2v"


def load_config(cls: type, path: str | Path | None, overrides: list[str] | None = None):
    """Build `cls` from a YAML/JSON file and `key=value` overrides; unknown keys are errors."""
    data: dict[str, Any] = {}
    if path:
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set needs key=value, got {item!r}")
        _assign(data, key.split("."), _parse_value(value))
    return _build(cls, data, path or "<defaults>")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _assign(data: dict, keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        data = data.setdefault(key, {})
    data[keys[-1]] = value


def _build(cls: type, data: dict, source) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SystemExit(f"{source}: unknown {cls.__name__} setting(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = _build(hint, value, source)
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)
