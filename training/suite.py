"""`python -m training suite`: the whole recipe on the tiny synthetic task suite, in minutes on a CPU.

Makes the data (tiny base model and text encoder for WAN; the caller's tiny SDXL otherwise), builds one LoRA per
task group, trains Stage-I and Stage-II, and reports held-out metrics against the baselines. Each step is
skipped when its result exists for the same settings, so the suite trains once and is then cached. The
configs it used are written to `<workdir>/configs/` for re-running single stages by hand.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from . import synthetic
from .config import BuildConfig, Stage1Config, Stage2Config, _build, to_dict
from .plots import read_metrics
from .runs import STAGE1_EXPORT, STAGE2_EXPORT, run_stage1, run_stage2

HYPERNET = {"d_model": 128, "n_heads": 4, "n_blocks": 2, "patch_size": 16, "rank": 4}
DEFAULTS = {
    "build": {"rank": 4, "steps": 100, "lr": 1e-4, "batch_size": 2, "groups_per_batch": 30, "init": "principal"},
    "stage1": {"steps": 1500, "batch_size": 4, "layers_per_sample": 8, "hypernet": HYPERNET, "eval_every": 500,
               "save_every": 250, "log_every": 25,
               "optim": {"lr": 2e-3, "warmup_steps": 50, "schedule": "cosine"}},
    "stage2": {"steps": 600, "batch_size": 2, "hypernet": HYPERNET, "eval_every": 300, "save_every": 200,
               "log_every": 25, "optim": {"lr": 1e-3, "warmup_steps": 30, "schedule": "cosine"},
               "recon_normalize": True},
    # image / pose variants: the assertion is on Stage-II; a shorter Stage-I guides it well enough
    "image": {"stage1": {"steps": 400}, "stage2": {"steps": 600}},
    "pose": {"stage1": {"steps": 400, "pose_frames": 8, "pose_size": 32}, "stage2": {"steps": 600}},
    # two pooled image features (two CLIP vision models of different widths) mixed by a gate (DiffLoRA MIF)
    "image-mix": {"stage1": {"steps": 400, "image_feature": "image_embeds"},
                  "stage2": {"steps": 600, "image_feature": "image_embeds"}},
}


# SDXL's targets mix 640/1280-wide and [C, 2048] matrices (in the tiny model 64/128 and [C, 2048]): bigger patches
# keep the token count of the wide matrices small.
SDXL_DEFAULTS = {"build": {"lr": 1e-3},
                 "stage1": {"hypernet": {**HYPERNET, "d_model": 64, "patch_size": 32}},
                 "stage2": {"hypernet": {**HYPERNET, "d_model": 64, "patch_size": 32}}}


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def suite_settings(overrides: list[str] | None, family: str = "wan") -> dict:
    settings = _merge(DEFAULTS, SDXL_DEFAULTS) if family == "sdxl" else copy.deepcopy(DEFAULTS)
    for item in overrides or []:
        key, _, value = item.partition("=")
        *path, last = key.split(".")
        node = settings
        for part in path:
            node = node.setdefault(part, {})
        try:
            node[last] = json.loads(value)
        except json.JSONDecodeError:
            node[last] = value
    return settings


def _cached(folder: Path, result: Path, config: dict) -> bool:
    """True if `result` exists and was made with exactly `config`."""
    marker = folder / "suite_config.json"
    return result.exists() and marker.exists() and json.loads(marker.read_text()) == config


def _mark(folder: Path, config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "suite_config.json").write_text(json.dumps(config, indent=1, sort_keys=True))


def run_suite(workdir: Path, family: str = "wan", base_model: str | None = None, text_encoder: str | None = None,
              overrides: list[str] | None = None, condition: str = "text") -> dict:
    """`condition` "image" or "pose" trains on the same tasks told by a style image or pose frames; "image-mix"
    by the style image seen through two CLIP vision models whose features a gate mixes."""
    settings = suite_settings(overrides, family)
    workdir.mkdir(parents=True, exist_ok=True)
    if family == "wan":
        base_model = str(synthetic.make_tiny_wan(workdir / "base" / "tiny_wan.safetensors"))
        text_encoder = str(synthetic.make_tiny_umt5(workdir / "text_encoder"))
        tasks = synthetic.make_tasks(workdir / "tasks", "wan2.1-t2v")
    else:
        if not (base_model and text_encoder):
            raise SystemExit("the SDXL suite needs --base-model (a tiny SDXL file) and --text-encoder (clip_l/clip_g)")
        tasks = synthetic.make_tasks(workdir / "tasks", "sdxl")
    dataset = workdir / "dataset"
    build = _build(BuildConfig, {**settings["build"], "tasks": str(tasks), "base_model": base_model,
                                 "text_encoder": text_encoder, "out": str(dataset)}, "suite")
    suffix = "" if condition == "text" else f"_{condition}"
    train_set = dataset if condition == "text" else workdir / f"dataset{suffix}"
    common = {"dataset": str(train_set), "base_model": base_model}
    variant = settings.get(condition, {})
    s1 = _build(Stage1Config, _merge({**settings["stage1"], **common, "out": str(workdir / f"stage1{suffix}")},
                                     variant.get("stage1", {})), "suite")
    s2 = _build(Stage2Config, _merge({**settings["stage2"], **common, "out": str(workdir / f"stage2{suffix}"),
                                      "stage1": str(workdir / f"stage1{suffix}")}, variant.get("stage2", {})),
                "suite")
    configs = workdir / "configs"
    configs.mkdir(exist_ok=True)
    for name, cfg in (("build", build), (f"stage1{suffix}", s1), (f"stage2{suffix}", s2)):
        (configs / f"{name}.json").write_text(json.dumps(to_dict(cfg), indent=1))

    if not _cached(dataset, dataset / "metadata.jsonl", to_dict(build)):
        from .lora_builder import build_loras

        build_loras(build)
        _mark(dataset, to_dict(build))
    if condition != "text":
        encoders = []
        if condition.startswith("image"):
            encoders.append(synthetic.make_tiny_clip_vision(workdir / "image_encoder"))
        if condition == "image-mix":
            encoders.append(synthetic.make_tiny_clip_vision(workdir / "image_encoder_2", seed=1, width=48,
                                                            projection=24))
        synthetic.make_condition_dataset(dataset, condition.split("-")[0], train_set, *encoders)
    stage1_key = {"build": to_dict(build), "stage1": to_dict(s1), "condition": condition}
    if not _cached(Path(s1.out), Path(s1.out) / STAGE1_EXPORT, stage1_key):
        run_stage1(s1, resume=True)
        _mark(Path(s1.out), stage1_key)
    stage2_key = {**stage1_key, "stage2": to_dict(s2)}
    if not _cached(Path(s2.out), Path(s2.out) / STAGE2_EXPORT, stage2_key):
        run_stage2(s2, resume=True)
        _mark(Path(s2.out), stage2_key)
    return {"checkpoint": str(Path(s2.out) / STAGE2_EXPORT),
            "stage1": _last_eval(Path(s1.out)), "stage2": _last_eval(Path(s2.out))}


def _last_eval(run: Path) -> dict:
    evals = [r for r in read_metrics(run / "metrics.jsonl") if any(k.startswith("eval/") for k in r)]
    return {k[5:]: round(v, 4) for k, v in evals[-1].items() if k.startswith("eval/")} if evals else {}
