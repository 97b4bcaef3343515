"""The LoFA demo: run the shipped SDXL workflow headless on a tiny SDXL, end to end, on the CPU.

    python -m demo [--checkpoint LOFA.safetensors | --untrained] [--workdir DIR]

Builds (once) a tiny randomly initialised SDXL from ComfyUI's own classes and trains a LoFA checkpoint for it
with `training/` on the tiny synthetic task suite (a few minutes, once; cached afterwards), starts the embedded
ComfyUI headless with the pack installed, queues `example_workflows/api/lofa_sdxl.json` with those models substituted,
and prints where the saved LoRA, the response-map PNG and the sampled image are. Idempotent: models are built
and trained once; each run saves new numbered outputs. `--untrained` skips training and uses a randomly
initialised LoFA checkpoint (plumbing only).
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from demo import runtime
from lofa_core.errors import LoFAError
from lofa_core.fileio import publish_new_file

TINY_CKPT = "lofa_demo_tiny_sdxl.safetensors"
TRAINED_BASE = "lofa_demo_tiny_sdxl_domain.safetensors"  # the tiny SDXL after the suite taught it the domain
UNTRAINED = "lofa_demo_untrained.safetensors"
TRAINED = "lofa_demo_suite.safetensors"
# The SDXL suite, shortened for a one-off training on 2 CPU cores (15-50 minutes; without the ablation and
# fine-tuning measurements, which the text suite makes).
DEMO_TRAINING = ["build.steps=200", "stage1.steps=800", "stage1.eval_every=800", "stage2.steps=600",
                 "stage2.batch_size=2", "stage2.eval_every=600"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n\n")[0])
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--checkpoint", type=Path, help="a LoFA checkpoint for the demo's tiny SDXL (default: one "
                                                        "trained once on the synthetic task suite)")
    choice.add_argument("--untrained", action="store_true", help="use a randomly initialised LoFA checkpoint")
    parser.add_argument("--workdir", type=Path, default=runtime.REPO / ".cache" / "demo")
    parser.add_argument("--steps", type=int, default=4, help="sampler steps (default 4)")
    args = parser.parse_args(argv)
    if args.checkpoint is not None and (problem := checkpoint_problem(args.checkpoint)):
        parser.exit(2, f"{parser.prog}: error: {problem}\n")  # one line: the usage is not the problem
    return args


def checkpoint_problem(path: Path) -> str | None:
    """Why --checkpoint cannot be used before anything is loaded, or None."""
    if not path.exists():
        return f"--checkpoint {path}: no such file"
    if not path.is_file():
        return f"--checkpoint {path} is not a file; give a LoFA checkpoint .safetensors file"
    if path.suffix == ".pth":
        return (f"--checkpoint {path} is a PyTorch .pth file (the authors' release?); convert it first: "
                f"python -m lofa_core.convert_official --stage1 stage1_preview.pth --stage2 stage2_preview.pth "
                f"--out lofa.safetensors, then pass the .safetensors file")
    if path.suffix != ".safetensors":
        return f"--checkpoint {path} is not a .safetensors file; the demo takes a LoFA checkpoint .safetensors"
    return None


@dataclass
class DemoModels:
    lofa: str  # file name in models/lofa
    trained: bool
    base: str  # file name in models/checkpoints
    report: dict | None = None  # the training suite's report when the demo trained the checkpoint


def build_models(root: Path, workdir: Path, checkpoint: Path | None, untrained: bool) -> DemoModels:
    """Tiny SDXL checkpoint + LoFA checkpoint in the server's model folders."""
    import torch

    from demo import tiny_sdxl
    from lofa_core.checkpoint import load_checkpoint, save_checkpoint
    from lofa_core.factory import SMALL, new_hypernet
    from lofa_core.families import build_catalog
    from lofa_core.families.sdxl import TEXT_CONDITION as SDXL_TEXT
    from lofa_core.targets import check_compatible
    from training.untrained import randomise_lora_heads_

    tiny_sdxl.register()
    ckpt_path = root / "models" / "checkpoints" / TINY_CKPT
    if not ckpt_path.exists():
        print("building a tiny SDXL from ComfyUI's SDXL classes ...", flush=True)
        tiny_sdxl.save_checkpoint(ckpt_path, seed=0)
    model = tiny_sdxl.build_model(seed=0)
    catalog = build_catalog({k: tuple(v.shape) for k, v in model.model_state_dict("diffusion_model.").items()})
    lofa_dir = root / "models" / "lofa"
    lofa_dir.mkdir(parents=True, exist_ok=True)
    if checkpoint is not None:
        given = load_checkpoint(checkpoint)
        check_compatible(given.catalog, catalog, checkpoint.name)
        return DemoModels(install_checkpoint(checkpoint, lofa_dir), given.trained, TINY_CKPT)
    if not untrained:
        target = lofa_dir / TRAINED
        report = train_on_suite(ckpt_path, workdir / "train", cached=target.exists() and (workdir / "train").exists())
        trained = Path(report["checkpoint"])
        if target.exists() and filecmp.cmp(trained, target, shallow=False):
            print(f"using the LoFA checkpoint trained on an earlier run ({trained})", flush=True)
        else:
            publish_new_file(target, lambda tmp: shutil.copyfile(trained, tmp), overwrite=True)
        base = ckpt_path.with_name(TRAINED_BASE)
        publish_new_file(base, lambda tmp: shutil.copyfile(report["base_model"], tmp), overwrite=True)
        return DemoModels(TRAINED, True, TRAINED_BASE, report)
    if not (lofa_dir / UNTRAINED).exists():
        torch.manual_seed(0)
        net = randomise_lora_heads_(new_hypernet(catalog, SDXL_TEXT, **SMALL), seed=0)
        save_checkpoint(lofa_dir / UNTRAINED, net, catalog, SDXL_TEXT,
                        provenance={"trained": False, "source": "python -m demo (random initialisation)"})
    return DemoModels(UNTRAINED, False, TINY_CKPT)


def install_checkpoint(checkpoint: Path, lofa_dir: Path) -> str:
    """Copy the user's checkpoint into the demo's models/lofa and return its name there. A different file that
    already has the name (an older version) is neither used nor replaced: the copy is named by its content."""
    target = lofa_dir / checkpoint.name
    if target.exists() and not filecmp.cmp(checkpoint, target, shallow=False):
        digest = hashlib.blake2b(checkpoint.read_bytes(), digest_size=6).hexdigest()
        target = lofa_dir / f"{checkpoint.stem}-{digest}{checkpoint.suffix}"
    if not target.exists():
        publish_new_file(target, lambda tmp: shutil.copyfile(checkpoint, tmp))
    return target.name


def train_on_suite(tiny_checkpoint: Path, workdir: Path, cached: bool = False) -> dict:
    """`python -m training suite --family sdxl` on the demo's tiny SDXL (cached after the first run; `cached`:
    an earlier run's checkpoint exists, so the suite most likely only checks its settings): the base model
    learns the domain, then LoFA learns the tasks; returns the suite's report."""
    import comfy.sd
    import torch

    from demo import tiny_sdxl
    from training.suite import run_suite

    encoders = workdir / "text_encoder"
    if not (encoders / "clip_g" / "model.safetensors").exists():
        with torch.no_grad():  # as ComfyUI runs its loaders
            _, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint), output_vae=False,
                                                                  output_clip=True)
        tiny_sdxl.export_text_encoders(clip, encoders)
    if cached:
        print(f"checking the LoFA training cached in {workdir} (it retrains only if its settings changed) ...",
              flush=True)
    else:
        print(f"training LoFA on the synthetic task suite (once, 15-50 min on 2 cores; cached in {workdir}) ...",
              flush=True)
    return run_suite(workdir, "sdxl", str(tiny_checkpoint), str(encoders), DEMO_TRAINING, ablation=False,
                     adaptation=False)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except LoFAError as err:  # bad input (a checkpoint that does not fit, ...): one line, not a traceback
        print(f"python -m demo: {err}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    source = runtime.runtime_root()
    runtime.import_comfy(source)
    root = runtime.prepare_server_root(source, args.workdir / "comfyui")
    models = build_models(root, args.workdir, args.checkpoint, args.untrained)
    prompt = held_out_prompt(models.report) if models.report else None
    graph = json.loads((runtime.WORKFLOWS / "api" / "lofa_sdxl.json").read_text())
    graph = runtime.substitute(graph, {
        "CheckpointLoaderSimple": {"ckpt_name": models.base},
        "LoFAModelLoader": {"lofa_name": models.lofa, "dtype": "float32"},
        "KSampler": {"steps": args.steps},
        "EmptyLatentImage": {"width": 256, "height": 256},
        # the LoFA prompt: a test task of the suite, in its words
        **({node_feeding(graph, "LoFAPredictLoRA", "conditioning"): {"text": prompt}} if prompt else {}),
    })
    output = args.workdir / "output"
    print("starting ComfyUI headless (CPU) with the LoFA nodes ...", flush=True)
    server = runtime.Server(root, output, args.workdir / "comfyui.log")
    try:
        server.wait_ready()
        entry = server.wait_done(server.queue(graph))
    finally:
        server.stop()
    if entry["status"].get("status_str") != "success":
        print(f"the workflow failed; ComfyUI's log is {args.workdir / 'comfyui.log'}", file=sys.stderr)
        print(json.dumps(entry["status"], indent=1)[:4000], file=sys.stderr)
        return 1
    outputs = entry["outputs"]
    image = outputs[node_fed_by(graph, "SaveImage", "VAEDecode")]["images"][0]
    response = outputs[node_fed_by(graph, "SaveImage", "LoFAResponsePreview")]["images"][0]
    (lora_saver,) = [i for i, node in graph.items() if node["class_type"] == "LoFASaveLoRA"]
    print("\nLoFA demo finished:")
    print(f"  LoRA file      {root / 'models' / 'loras' / outputs[lora_saver]['lofa_lora'][0]}")
    print(f"  response map   {output / response['subfolder'] / response['filename']}")
    print(f"  sampled image  {output / image['subfolder'] / image['filename']}")
    if not models.trained:
        print("\nNOTE: the LoFA checkpoint is UNTRAINED (random weights), so this LoRA is noise. Run without "
              "--untrained for one trained on the synthetic suite, or pass --checkpoint with a trained checkpoint.")
    elif models.report:
        print(held_out_summary(models.report, prompt))
    return 0


def node_feeding(graph: dict, class_type: str, input_name: str) -> str:
    """The id of the node connected to `input_name` of the (only) `class_type` node of an API-format graph."""
    (node,) = [n for n in graph.values() if n["class_type"] == class_type]
    return node["inputs"][input_name][0]


def node_fed_by(graph: dict, class_type: str, source_type: str) -> str:
    """The id of the `class_type` node whose first linked input comes from a `source_type` node."""
    for node_id, node in graph.items():
        links = [v for v in node["inputs"].values() if isinstance(v, list)]
        if node["class_type"] == class_type and links and graph[links[0][0]]["class_type"] == source_type:
            return node_id
    raise LoFAError(f"the demo workflow has no {class_type} node fed by a {source_type} node")


def held_out_prompt(report: dict) -> str:
    """The prompt of the suite's first test task (a word combination the checkpoint never trained on)."""
    from training.synthetic import parse_group, prompt_of

    return prompt_of("sdxl", *parse_group(report["data"]["test_groups"][0]))


def _per_pair(scores: dict, key: str) -> str:
    """The per-pair baseline's figure, for reports made since it exists."""
    return f", per-pair {scores[key]:.3f}" if key in scores else ""


def held_out_summary(report: dict, prompt: str) -> str:
    """What the demo's checkpoint does on the suite's test tasks, next to the baselines (no claims)."""
    s1, s2 = report["stage1"]["test"], report["stage2"]["test"]
    failed = [g["text"] for g in report["goals"] if not g["passed"]]
    return "\n".join([
        f"\nThe LoFA checkpoint was trained by `python -m training suite --family sdxl` for this tiny SDXL (first "
        f"taught the domain by the suite). The LoFA prompt {prompt!r} is one of its {int(s2['tasks'])} test tasks "
        f"(held out from training). On those test tasks:",
        f"  Stage-I response map cosine {s1['map_cos']:.3f}   (training mean map {s1['mean_map_cos']:.3f})",
        f"  LoRA dW cosine, shared part removed {s2['dw_cos_centered']:.3f}   (per-word average of training LoRAs "
        f"{s2.get('per_word_dw_cos_centered', float('nan')):.3f}{_per_pair(s2, 'per_pair_dw_cos_centered')}; an "
        f"empty LoRA, predicting nothing, "
        f"{s2.get('zero_dw_cos_centered', float('nan')):.3f})",
        f"  predicted dW norm / ground truth {s2.get('dw_norm_ratio', float('nan')):.2f}   (1: as large as the "
        f"task's own LoRA; near 0: a prediction of almost nothing)",
        f"  own task retrieved first {s2['retrieval_heldout']:.2f}   "
        f"(per-word {s2.get('per_word_retrieval_heldout', 0):.2f})",
        f"  diffusion loss gap closed {s2['gap_pred']:.2f}   (1 = the task's own trained LoRA; mean LoRA "
        f"{s2['gap_mean']:.2f}, norm-matched constant {s2['gap_constant']:.2f}{_per_pair(s2, 'gap_per_pair')}, "
        f"another task's LoRA "
        f"{s2['gap_swap']:.2f})",
        *([f"  for scale, another LoRA of the same task (fresh clips, a second run): map {c['map_cos']:.3f}, dW "
           f"{c['dw_cos_centered']:.3f}, retrieved first {c['retrieval_heldout']:.2f}, gap closed {c['gap_pred']:.2f}"]
          if (c := report.get("ceiling", {}).get("test")) else []),
        "  goals not met: " + "; ".join(failed) if failed else "  every goal of the suite is met",
        "The base model is a tiny SDXL trained on synthetic patterns, so the image shows the pipeline, not quality."])



if __name__ == "__main__":
    sys.exit(main())
