"""Convert the authors' released LoFA model (stage1/stage2 `.pth` state dicts) into this pack's checkpoint format.

    python -m lofa_core.convert_official --stage1 stage1_preview.pth --stage2 stage2_preview.pth \\
        --out lofa_wan21_t2v_1.3B_preview.safetensors [--config config.yaml] [--dtype float32|source]

The whole architecture is inferred from tensor shapes (width, heads from the q_norm size, blocks, patch size,
input size, rank, context width, depth/type vocabularies, Stage-II injection blocks from `cross_attn_blocks.*`),
every key is checked strictly, and the result loads into the pack's hypernetwork, which computes the authors'
forward pass. The files are read with `torch.load(weights_only=True)` only. tau and temperature come from the
release's config.yaml if given, else the paper's 0.02 / 0.1.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from .checkpoint import save_checkpoint
from .config import DEFAULT_TAU, HEAD_POOLED, RESPONSE_SOFTPLUS_TAU, HyperNetConfig
from .errors import CheckpointError
from .families import build_catalog, wan
from .families.wan import ATTENTION_TYPES
from .file_hash import sha256_file
from .fileio import load_torch_weights_only
from .hypernet import LoFAHypernet
from .targets import TargetCatalog

PREFIXES = ("module.", "_orig_mod.")
NESTED = ("state_dict", "model", "module")
DEFAULT_TEMPERATURE = 0.1
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_INJECT = re.compile(r"^cross_attn_blocks\.(\d+)\.")


def load_official_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat tensor dict from an official `.pth` (weights only, `module.`/`_orig_mod.` prefixes removed)."""
    path = Path(path)
    obj = load_torch_weights_only(path, CheckpointError)
    while isinstance(obj, Mapping) and len(obj) == 1 and next(iter(obj)) in NESTED:
        obj = next(iter(obj.values()))
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"'{path.name}' is not a state dict of tensors, so not a LoFA stage file.")
    out = {}
    for key, value in obj.items():
        while key.startswith(PREFIXES):
            key = key[len(next(p for p in PREFIXES if key.startswith(p))):]
        out[key] = value
    if "cls_token" not in out or "patch_embed.proj.weight" not in out or "head_A.weight" not in out:
        sample = ", ".join(sorted(out)[:4]) or "nothing"
        raise CheckpointError(f"'{path.name}' is not a LoFA hypernetwork state dict (expected keys such as "
                              f"cls_token, patch_embed.proj.weight, head_A.weight; found {sample}).")
    return out


def infer_config(sd: Mapping[str, torch.Tensor], stage: int, name: str) -> HyperNetConfig:
    """The authors' hyper-parameters, read off tensor shapes."""
    try:
        d_model = sd["cls_token"].shape[-1]
        head_dim = sd["blocks.0.self_attn.q_norm.weight"].shape[0]
        patch = sd["patch_embed.proj.weight"].shape[-1]
        rows, cols = sd["pos.row"].shape[1], sd["pos.col"].shape[2]
        out_f, in_f = rows * patch, cols * patch
        rank, rem = divmod(sd["head_A.weight"].shape[0], in_f)
        n_blocks = 1 + max(int(m.group(1)) for k in sd if (m := _BLOCK.match(k)))
        injections = sorted({int(m.group(1)) for k in sd if (m := _INJECT.match(k))})
        cfg = HyperNetConfig(
            stage=stage, d_model=d_model, n_heads=d_model // head_dim, n_blocks=n_blocks,
            mlp_ratio=sd["blocks.0.mlp_sa.fc1.weight"].shape[0] / d_model, patch_size=patch, rank=rank,
            context_dim=sd["text_proj.weight"].shape[1], num_depths=sd["depth_embed.weight"].shape[0],
            num_types=sd["type_embed.weight"].shape[0], max_rows=rows, max_cols=cols, head=HEAD_POOLED,
            head_shape=(out_f, in_f), qk_norm=True, use_cls=True, response=RESPONSE_SOFTPLUS_TAU,
            cross_attn_idxs=tuple(injections) if stage == 2 else (),
        )
    except (KeyError, IndexError, ValueError) as err:
        raise CheckpointError(f"'{name}': cannot infer the LoFA architecture from its tensors ({err}).") from err
    if rem or sd["head_B.weight"].shape[0] != out_f * rank:
        raise CheckpointError(f"'{name}': head_A/head_B sizes do not fit a {out_f}x{in_f} input with one rank.")
    return cfg


def check_keys(sd: Mapping[str, torch.Tensor], cfg: HyperNetConfig, module: torch.nn.Module, name: str) -> None:
    """Every key and shape must be exactly what the inferred architecture has (no silent strict=False)."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [f"{k} {list(sd[k].shape)} (expected {list(s)})" for k, s in expected.items()
             if k in sd and tuple(sd[k].shape) != s]
    if missing or unexpected or wrong:
        parts = [f"missing {missing[:4]}" if missing else "", f"unexpected {unexpected[:4]}" if unexpected else "",
                 f"wrong shapes {wrong[:3]}" if wrong else ""]
        raise CheckpointError(f"'{name}' does not match the LoFA Stage-{cfg.stage} architecture its shapes imply: "
                              + "; ".join(p for p in parts if p) + ". Is it a complete, unmodified release file?")


def read_release_config(path: str | Path | None) -> tuple[float, float, dict]:
    """tau, temperature and the raw stage kwargs from the release's config.yaml (paper defaults without it)."""
    if path is None:
        return DEFAULT_TAU, DEFAULT_TEMPERATURE, {}
    import yaml  # only the converter needs it; ComfyUI installs have PyYAML

    data = yaml.safe_load(Path(path).read_text()) or {}
    stage1 = data.get("stage1") or {}
    return float(stage1.get("tau", DEFAULT_TAU)), float(stage1.get("temperature", DEFAULT_TEMPERATURE)), data


def _check_against_yaml(cfg: HyperNetConfig, kwargs: Mapping, name: str) -> None:
    pairs = {"d_model": "d_model", "n_heads": "n_heads", "n_blocks": "n_blocks", "patch_size": "patch_size",
             "lora_rank": "rank", "context_dim": "context_dim", "num_depth": "num_depths", "num_type": "num_types",
             "cross_attn_idxs": "cross_attn_idxs"}
    for yaml_key, field in pairs.items():
        if yaml_key in kwargs and yaml_key != "cross_attn_idxs":
            if int(kwargs[yaml_key]) != getattr(cfg, field):
                raise CheckpointError(f"config.yaml says {yaml_key}={kwargs[yaml_key]} but '{name}' has "
                                      f"{getattr(cfg, field)}; they are not from the same release.")
    if cfg.stage == 2 and "cross_attn_idxs" in kwargs and tuple(kwargs["cross_attn_idxs"]) != cfg.cross_attn_idxs:
        raise CheckpointError(f"config.yaml injects Stage-I features after blocks {list(kwargs['cross_attn_idxs'])}"
                              f" but '{name}' has cross_attn_blocks {list(cfg.cross_attn_idxs)}.")


def official_catalog(cfg: HyperNetConfig) -> TargetCatalog:
    """The authors' targets: 8 attention projections (VALID_LAYERS order) in each of num_depths WAN blocks."""
    if cfg.num_types != len(ATTENTION_TYPES):
        raise CheckpointError(f"the model embeds {cfg.num_types} layer types; the authors' WAN release has 8")
    out_f, in_f = cfg.head_shape
    shapes = {f"blocks.{d}.{t}.weight": (out_f, in_f) for d in range(cfg.num_depths) for t in ATTENTION_TYPES}
    shapes["head.modulation"] = (1, 2, in_f)
    return build_catalog(shapes)


def convert(stage1: str | Path, stage2: str | Path, out: str | Path, config: str | Path | None = None,
            dtype: str = "float32", overwrite: bool = False) -> Path:
    """Convert an official stage1/stage2 pair; returns the written checkpoint path."""
    sd1, sd2 = load_official_state_dict(stage1), load_official_state_dict(stage2)
    names = Path(stage1).name, Path(stage2).name
    if "head_alpha.weight" in sd1 and "head_alpha.weight" not in sd2:
        raise CheckpointError(f"'{names[0]}' is a Stage-II file and '{names[1]}' a Stage-I file: swap --stage1 "
                              f"and --stage2.")
    if "head_alpha.weight" not in sd2:
        raise CheckpointError(f"'{names[1]}' has no head_alpha: it is not a Stage-II (LoRA predictor) file.")
    cfg1, cfg2 = infer_config(sd1, 1, names[0]), infer_config(sd2, 2, names[1])
    tau, temperature, yaml_data = read_release_config(config)
    cfg1 = cfg1.replace(tau=tau, temperature=temperature)
    for cfg, key, name in ((cfg1, "stage1", names[0]), (cfg2, "stage2", names[1])):
        _check_against_yaml(cfg, yaml_data.get(key) or {}, name)
    with torch.device("meta"):
        try:
            shell = LoFAHypernet(cfg1, cfg2)
        except ValueError as err:
            raise CheckpointError(f"'{names[0]}' and '{names[1]}' do not belong together: {err}") from err
    check_keys(sd1, cfg1, shell.stage1, names[0])
    check_keys(sd2, cfg2, shell.stage2, names[1])
    source_dtype = sd1["cls_token"].dtype
    target_dtype = {"float32": torch.float32, "source": source_dtype}[dtype]
    shell.stage1.load_state_dict({k: v.float() for k, v in sd1.items()}, strict=True, assign=True)
    shell.stage2.load_state_dict({k: v.float() for k, v in sd2.items()}, strict=True, assign=True)
    provenance = {
        "trained": True, "source": "authors' LoFA release, converted by lofa_core.convert_official",
        "stage1_file": names[0], "stage2_file": names[1], "source_dtype": str(source_dtype).replace("torch.", ""),
        "stage1_sha256": sha256_file(stage1), "stage2_sha256": sha256_file(stage2),
    }
    condition = dataclasses.replace(wan.TEXT_CONDITION, token_dim=cfg1.context_dim)
    return save_checkpoint(out, shell, official_catalog(cfg1), condition, tau=tau, provenance=provenance,
                           dtype=target_dtype, overwrite=overwrite)


def paired_stage1(stage2_name: str) -> str | None:
    """The Stage-I file name that belongs to an official Stage-II file name (stage2_x.pth -> stage1_x.pth)."""
    folder, _, base = stage2_name.replace("\\", "/").rpartition("/")
    if not (base.startswith("stage2") and base.endswith(".pth")):
        return None
    return (folder + "/" if folder else "") + "stage1" + base[len("stage2"):]


def convert_cached(stage1: str | Path, stage2: str | Path, cache_dir: str | Path) -> Path:
    """Convert once and reuse: the cache file is named after the sources' names, sizes and mtimes, so a
    replaced release converts again. The original files are only read."""
    stats = [(Path(p).name, Path(p).stat().st_size, Path(p).stat().st_mtime_ns) for p in (stage1, stage2)]
    digest = hashlib.sha256(repr(stats).encode()).hexdigest()[:10]
    target = Path(cache_dir) / f"{Path(stage2).stem}-{digest}.safetensors"
    if not target.exists():
        try:
            convert(stage1, stage2, target)
        except FileExistsError:  # converted concurrently by another process: use theirs
            pass
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lofa_core.convert_official", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage1", required=True, help="stage1_preview.pth (response-map predictor)")
    parser.add_argument("--stage2", required=True, help="stage2_preview.pth (LoRA predictor)")
    parser.add_argument("--out", required=True, help="output .safetensors (put it in ComfyUI/models/lofa)")
    parser.add_argument("--config", help="the release's config.yaml (for tau/temperature), optional")
    parser.add_argument("--dtype", choices=["float32", "source"], default="float32",
                        help="store float32 (default) or the release's own dtype (bf16, half the size)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    try:
        path = convert(args.stage1, args.stage2, args.out, args.config, args.dtype, args.overwrite)
    except (CheckpointError, FileExistsError) as err:
        message = f"'{args.out}' exists; pass --overwrite to replace it" if isinstance(err, FileExistsError) else err
        print(f"error: {message}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
