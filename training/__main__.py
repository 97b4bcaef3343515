"""`python -m training <command>`: build datasets, train both stages, evaluate, export.

    python -m training build-loras --config build.yaml     # one LoRA per task group (the paper's data prep)
    python -m training build --config build.yaml --init-from-lofa lofa.safetensors   # ... starting from LoFA
    python -m training encode --dataset DIR --text-encoder DIR [--family sdxl]
    python -m training validate --dataset DIR --base-model FILE
    python -m training stage1 --config stage1.yaml [--resume [CHECKPOINT]] [--set key=value ...]
    python -m training stage2 --config stage2.yaml [--resume [CHECKPOINT]] [--set key=value ...]
    python -m training stage2 --single-stage --config stage2.yaml   # the "w/o res." ablation: no Stage-I
    python -m training export --stage1 RUN_OR_FILE --stage2 RUN --out lofa.safetensors
    python -m training evaluate --config stage2.yaml --checkpoint A.safetensors [--checkpoint B.safetensors]
    python -m training suite --workdir DIR [--family wan2.1-t2v|sdxl] [--jobs 2]   # the tiny synthetic suite

Multi-GPU / multi-node: `accelerate launch --multi_gpu --num_processes N -m training stage1 --config ...`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from lofa_core.families import family_names, get_family, wan

from .config import BuildConfig, EncodeConfig, Stage1Config, Stage2Config, load_config


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML or JSON config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--resume", nargs="?", const=True, default=False,
                   help="continue from the run's latest checkpoint (or the given checkpoint folder)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--threads", type=int, default=0, metavar="N",
                        help="torch CPU threads (default: $OMP_NUM_THREADS, else one per core). On a small CPU "
                             "shared with another busy process use 1: two spinning OpenMP threads then run 2-2.4x "
                             "slower than one (benchmarks/threads.py); alone, 2 threads are 1.3x faster than 1")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build-loras", aliases=["build"], help="train one LoRA per task group into a LoFA dataset")
    p.add_argument("--config")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--init-from-lofa", metavar="CKPT", help="start every LoRA from the LoFA checkpoint's prediction "
                   "for its prompt (the LoFA prior) instead of the usual initialisation")
    p = sub.add_parser("encode", help="cache prompt embeddings and image features of a dataset")
    p.add_argument("--dataset", required=True)
    p.add_argument("--text-encoder", help="for prompts: umT5 folder (WAN) or folder with clip_l/, clip_g/ (SDXL)")
    p.add_argument("--image-encoder", help="for image conditions: a CLIP vision model folder")
    p.add_argument("--image-encoder-2", help="for models mixing two image features: the second CLIP vision model "
                   "folder (encodes each condition's image_2, or its image)")
    p.add_argument("--family", default=wan.NAME, choices=family_names(), help="base-model family of the prompts")
    p = sub.add_parser("validate", help="check a dataset against a base model and list every problem")
    p.add_argument("--dataset", required=True)
    p.add_argument("--base-model", required=True)
    p.add_argument("--latents", action="store_true", help="also require latents (Stage-II diffusion loss)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a run setting that shapes the condition, as in stage1/stage2 (image_feature, pose_frames, "
                        "pose_size, target_groups)")
    _add_run_args(sub.add_parser("stage1", help="train Stage-I (response maps)"))
    p = sub.add_parser("stage2", help="train Stage-II (LoRA prediction)")
    _add_run_args(p)
    p.add_argument("--single-stage", action="store_true", help="the paper's ablation: Stage-II alone, without "
                   "Stage-I features and without a Stage-I checkpoint")
    p = sub.add_parser("export", help="write a LoFA checkpoint from Stage-I/Stage-II runs")
    p.add_argument("--stage1", required=True)
    p.add_argument("--stage2", help="a Stage-II run folder (omit for a Stage-I-only checkpoint)")
    p.add_argument("--out", required=True)
    p = sub.add_parser("evaluate", help="held-out figures of a checkpoint, or of several whose LoRAs are averaged")
    p.add_argument("--config", help="the run config whose dataset, base model and held-out tasks to use")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--checkpoint", action="append", default=[], required=True, metavar="FILE",
                   help="a LoFA checkpoint; give several to score the average of their LoRAs (an ensemble)")
    p.add_argument("--split", action="append", choices=["val", "test"], help="held-out tasks (default: both)")
    p.add_argument("--out", help="also write the figures to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p = sub.add_parser("suite", help="the tiny synthetic task suite, end to end")
    p.add_argument("--workdir", default="runs/suite")
    p.add_argument("--family", default=wan.NAME, choices=family_names())
    p.add_argument("--base-model", help="SDXL only: the tiny SDXL file to train on")
    p.add_argument("--text-encoder", help="SDXL only: folder with clip_l/ and clip_g/")
    p.add_argument("--condition", default="text", choices=["text", "image", "pose", "image-mix"],
                   help="tell the tasks by text (default), a style image, pose frames, or a style image through two "
                        "CLIP vision models mixed by a gate")
    p.add_argument("--set", action="append", default=[], help="override suite settings, e.g. stage1.steps=100")
    p.add_argument("--ablation", action=argparse.BooleanOptionalAction, default=None,
                   help="also train the single-stage ablation on the same total steps (default: text prompts)")
    p.add_argument("--adaptation", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure fine-tuning from the LoFA prior vs the usual start (default: text prompts)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="processes side by side (default 1): with 2 the LoRA sets train two at a time and the "
                        "ablation beside the two stages, each process with half of --threads (same results)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    if args.command in ("build-loras", "build"):
        from .lora_builder import build_loras

        extra = [f"init_from_lofa={args.init_from_lofa}"] if args.init_from_lofa else []
        print(build_loras(load_config(BuildConfig, args.config, args.set + extra)))
    elif args.command == "encode":
        from .encoding import CLIPVisionFeatures, encode_dataset, load_text_encoder

        cfg = EncodeConfig(dataset=args.dataset, text_encoder=args.text_encoder or "",
                           family=get_family(args.family).name)
        text = load_text_encoder(cfg.text_encoder, cfg.family) if cfg.text_encoder else None
        images = [CLIPVisionFeatures(f) if f else None for f in (args.image_encoder, args.image_encoder_2)]
        changed = encode_dataset(cfg.dataset, text, *images)
        print(f"encoded; {changed} sample(s) got a new embedding")
    elif args.command == "validate":
        return _validate(args)
    elif args.command == "stage1":
        from .runs import run_stage1

        print(run_stage1(load_config(Stage1Config, args.config, args.set), args.resume))
    elif args.command == "stage2":
        from .runs import run_stage2

        extra = ["single_stage=true", "stage1="] if args.single_stage else []  # the flag wins over a config's stage1
        print(run_stage2(load_config(Stage2Config, args.config, args.set + extra), args.resume))
    elif args.command == "export":
        return _export(args)
    elif args.command == "evaluate":
        return _evaluate(args)
    elif args.command == "suite":
        from .suite import report_name, run_suite

        report = run_suite(Path(args.workdir), args.family, args.base_model, args.text_encoder, args.set,
                           args.condition, args.ablation, args.adaptation, args.jobs)
        name = report_name(args.condition)
        print((Path(args.workdir) / f"{name}.md").read_text())
        print(f"everything: {Path(args.workdir) / name}.json")
        return 0 if all(g["passed"] for g in report["goals"]) else 3
    return 0


def _evaluate(args) -> int:
    """Print (and with --out write) the held-out figures of the checkpoints' averaged prediction."""
    import json

    from .ensemble import evaluate_checkpoints, write_scores

    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not args.overwrite:
        raise SystemExit(f"{out} exists; choose another --out or add --overwrite")
    scores = evaluate_checkpoints(load_config(Stage2Config, args.config, args.set), args.checkpoint,
                                  args.split or ("val", "test"))
    print(json.dumps(scores, indent=1))
    if out is not None:
        write_scores(scores, args.checkpoint, out, overwrite=args.overwrite)
    return 0


def _validate(args) -> int:
    """Check a dataset exactly as a run would: the base model's targets, the dataset's own kind of condition
    (text, image or pose, with the run settings), captions and latents; every problem printed, no traceback."""
    from safetensors import SafetensorError

    from lofa_core.errors import LoFAError

    from .config import RunConfig
    from .dataset import DatasetError, check_dataset, read_samples
    from .runs import base_catalog, dataset_spec

    cfg = load_config(RunConfig, None, args.set)
    cfg.dataset, cfg.base_model = args.dataset, args.base_model
    try:
        catalog, shapes = base_catalog(args.base_model, cfg.target_groups)
    except (LoFAError, SafetensorError, OSError) as err:
        print(f"the base model {args.base_model} cannot be used: {err}", file=sys.stderr)
        return 1
    try:
        spec = dataset_spec(cfg, read_samples(args.dataset), catalog.family)
        samples = check_dataset(args.dataset, catalog, spec, need_latents=args.latents,
                                latent_channels=get_family(catalog.family).latent_channels(shapes),
                                caption_spec=get_family(catalog.family).text_condition)
    except DatasetError as err:
        print(err, file=sys.stderr)
        return 1
    except (SafetensorError, OSError, KeyError) as err:  # the cached image features that size the model
        print(f"{args.dataset}: the image features of its first encoded sample cannot be read ({err}); run "
              f"`python -m training encode` again.", file=sys.stderr)
        return 1
    print(f"{len(samples)} samples OK for {catalog.describe()} and {spec.describe()}")
    return 0


def _export(args) -> int:
    """Copy a run's exported checkpoint (validated by loading it) to --out, never over an existing file."""
    from lofa_core.checkpoint import load_checkpoint
    from lofa_core.fileio import publish_new_file

    from .runs import STAGE1_EXPORT, STAGE2_EXPORT

    source = Path(args.stage2) / STAGE2_EXPORT if args.stage2 else Path(args.stage1)
    if source.is_dir():
        source = source / STAGE1_EXPORT
    ckpt = load_checkpoint(source)
    try:
        publish_new_file(args.out, lambda tmp: shutil.copyfile(source, tmp))
    except FileExistsError:
        print(f"{args.out} exists; choose another name", file=sys.stderr)
        return 1
    print(f"{args.out}: {ckpt.catalog.describe()}, {'Stage-I + Stage-II' if ckpt.net.stage2 else 'Stage-I only'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
