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
import json
import shutil
import sys
from pathlib import Path

from demo import runtime

TINY_CKPT = "lofa_demo_tiny_sdxl.safetensors"
UNTRAINED = "lofa_demo_untrained.safetensors"
TRAINED = "lofa_demo_suite.safetensors"
# The suite's full settings, shortened so the one-off training fits in a few minutes on 2 CPU cores.
DEMO_TRAINING = ["stage1.steps=300", "stage2.steps=200"]
SUITE_PROMPT = "a vivid rings pattern , bold"  # a held-out task of the suite


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n\n")[0])
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--checkpoint", type=Path, help="a LoFA checkpoint for the demo's tiny SDXL (default: one "
                                                        "trained once on the synthetic task suite)")
    choice.add_argument("--untrained", action="store_true", help="use a randomly initialised LoFA checkpoint")
    parser.add_argument("--workdir", type=Path, default=runtime.REPO / ".cache" / "demo")
    parser.add_argument("--steps", type=int, default=4, help="sampler steps (default 4)")
    return parser.parse_args(argv)


def build_models(root: Path, workdir: Path, checkpoint: Path | None, untrained: bool) -> tuple[str, bool]:
    """Tiny SDXL checkpoint + LoFA checkpoint in the server's model folders; returns (lofa file, trained?)."""
    import torch

    from demo import tiny_sdxl
    from lofa_core.checkpoint import load_checkpoint, save_checkpoint
    from lofa_core.conditioning import SDXL_TEXT
    from lofa_core.factory import SMALL, new_hypernet, randomise_lora_heads_
    from lofa_core.targets import build_catalog, check_compatible

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
        target = lofa_dir / checkpoint.name
        if not target.exists():
            shutil.copy2(checkpoint, target)
        return target.name, given.trained
    if not untrained:
        trained = train_on_suite(ckpt_path, workdir / "train")
        shutil.copyfile(trained, lofa_dir / TRAINED)
        return TRAINED, True
    if not (lofa_dir / UNTRAINED).exists():
        torch.manual_seed(0)
        net = randomise_lora_heads_(new_hypernet(catalog, SDXL_TEXT, **SMALL), seed=0)
        save_checkpoint(lofa_dir / UNTRAINED, net, catalog, SDXL_TEXT,
                        provenance={"trained": False, "source": "python -m demo (random initialisation)"})
    return UNTRAINED, False


def train_on_suite(tiny_checkpoint: Path, workdir: Path) -> Path:
    """`python -m training suite --family sdxl` on the demo's tiny SDXL (cached after the first run)."""
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
    print("training LoFA on the synthetic task suite (once; cached in .cache/demo/train) ...", flush=True)
    report = run_suite(workdir, "sdxl", str(tiny_checkpoint), str(encoders), DEMO_TRAINING)
    return Path(report["checkpoint"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    source = runtime.runtime_root()
    runtime.import_comfy(source)
    root = runtime.prepare_server_root(source, args.workdir / "comfyui")
    lofa_name, trained = build_models(root, args.workdir, args.checkpoint, args.untrained)
    graph = json.loads((runtime.WORKFLOWS / "api" / "lofa_sdxl.json").read_text())
    graph = runtime.substitute(graph, {
        "CheckpointLoaderSimple": {"ckpt_name": TINY_CKPT},
        "LoFAModelLoader": {"lofa_name": lofa_name, "dtype": "float32"},
        "KSampler": {"steps": args.steps},
        "EmptyLatentImage": {"width": 256, "height": 256},
        **({"5": {"text": SUITE_PROMPT}} if lofa_name == TRAINED else {}),  # the LoFA prompt, in the suite's words
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
    image = outputs["11"]["images"][0]
    response = outputs["14"]["images"][0]
    print("\nLoFA demo finished:")
    print(f"  LoRA file      {root / 'models' / 'loras' / outputs['12']['lofa_lora'][0]}")
    print(f"  response map   {output / response['subfolder'] / response['filename']}")
    print(f"  sampled image  {output / image['subfolder'] / image['filename']}")
    if not trained:
        print("\nNOTE: the LoFA checkpoint is UNTRAINED (random weights), so this LoRA is noise. Run without "
              "--untrained for one trained on the synthetic suite, or pass --checkpoint with a trained checkpoint.")
    elif lofa_name == TRAINED:
        print(f"\nThe LoFA checkpoint was trained by `python -m training suite` on synthetic tasks for this tiny "
              f"SDXL (LoFA prompt: {SUITE_PROMPT!r}, a task it never saw). The base model itself is an untrained "
              f"tiny SDXL, so the image shows the pipeline, not image quality.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
