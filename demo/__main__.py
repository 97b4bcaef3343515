"""The LoFA demo: run the shipped SDXL workflow headless on a tiny SDXL, end to end, on the CPU.

    python -m demo [--checkpoint LOFA.safetensors] [--workdir DIR]

Builds (once) a tiny randomly initialised SDXL from ComfyUI's own classes and a LoFA checkpoint for it,
starts the embedded ComfyUI headless with the pack installed, queues `workflows/api/lofa_sdxl.json` with those
models substituted, and prints where the saved LoRA, the response-map PNG and the sampled image are.
Idempotent: models are built once; each run saves new numbered outputs.
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a LoFA checkpoint for the demo's tiny SDXL "
                                                        "(default: an untrained, randomly initialised one)")
    parser.add_argument("--workdir", type=Path, default=runtime.REPO / ".cache" / "demo")
    parser.add_argument("--steps", type=int, default=4, help="sampler steps (default 4)")
    return parser.parse_args(argv)


def build_models(root: Path, checkpoint: Path | None) -> tuple[str, bool]:
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
    if not (lofa_dir / UNTRAINED).exists():
        torch.manual_seed(0)
        net = randomise_lora_heads_(new_hypernet(catalog, SDXL_TEXT, **SMALL), seed=0)
        save_checkpoint(lofa_dir / UNTRAINED, net, catalog, SDXL_TEXT,
                        provenance={"trained": False, "source": "python -m demo (random initialisation)"})
    return UNTRAINED, False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    source = runtime.runtime_root()
    runtime.import_comfy(source)
    root = runtime.prepare_server_root(source, args.workdir / "comfyui")
    lofa_name, trained = build_models(root, args.checkpoint)
    graph = json.loads((runtime.REPO / "workflows" / "api" / "lofa_sdxl.json").read_text())
    graph = runtime.substitute(graph, {
        "CheckpointLoaderSimple": {"ckpt_name": TINY_CKPT},
        "LoFAModelLoader": {"lofa_name": lofa_name, "dtype": "float32"},
        "KSampler": {"steps": args.steps},
        "EmptyLatentImage": {"width": 256, "height": 256},
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
        print("\nNOTE: the LoFA checkpoint is UNTRAINED (random weights), so this LoRA is noise and the image is "
              "the output of an untrained tiny SDXL. The demo shows the plumbing; pass --checkpoint with a "
              "trained LoFA checkpoint to get a meaningful LoRA.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
