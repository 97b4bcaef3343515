"""Torch threads for training on a small CPU: 1 vs 2 threads, alone and next to a second busy process.

    python benchmarks/threads.py            # the suite's LoRA building and Stage-I steps, ~2 minutes

Each measurement runs in a fresh process (`--worker`) that times a fixed number of steps of the synthetic suite's
real workloads (per-task LoRA training on the tiny WAN, Stage-I hypernetwork steps). "Loaded" runs the same
measurement while another process keeps one core busy, as a second training job or ComfyUI would. It prints
seconds per step and the ratio of 2 threads to 1 thread in both conditions: OpenMP threads that spin-wait for a
core another process holds can make 2 threads much slower than 1.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def worker(threads: int, workdir: Path, steps: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(REPO))
    from training import tiny_models
    from training.base_models import load_base_model, make_captions
    from training.injection import inject

    base = load_base_model(tiny_models.make_tiny_wan(workdir / "tiny_wan.safetensors"))
    groups, per_group = 15, 8
    latents = torch.randn(groups * per_group, 16, 2, 8, 8)
    prompts = torch.zeros(groups, 512, 4096)
    prompts[:, :9] = torch.randn(groups, 9, 4096)
    captions = make_captions(list(prompts), repeat=per_group)
    factors = {p: (torch.randn(groups, 4, m.weight.shape[1], requires_grad=True),
                   torch.zeros(groups, m.weight.shape[0], 4, requires_grad=True), torch.ones(groups))
               for p, m in base.modules.items()}
    gen = torch.Generator().manual_seed(0)

    def lora_step() -> None:
        with inject(base.modules, factors):
            base.diffusion_loss(latents, captions, None, gen).backward()

    from lofa_core.conditioning import prepare_text_condition
    from lofa_core.factory import new_hypernet
    from lofa_core.families.wan import TEXT_CONDITION as WAN_TEXT
    from lofa_core.predict import encode_prompt

    net = new_hypernet(base.catalog, WAN_TEXT, d_model=128, n_heads=4, n_blocks=2, patch_size=16, rank=4).stage1
    weights = torch.stack([base.weight(t.path) for t in base.catalog.targets][:8])
    depth = torch.tensor([t.depth for t in base.catalog.targets][:8])
    kind = torch.tensor([t.type_index for t in base.catalog.targets][:8])
    condition = prepare_text_condition(prompts[0, :9], None, WAN_TEXT)

    def stage1_step() -> None:
        ctx = encode_prompt(net, condition, torch.device("cpu"), torch.float32)
        _, logits = net.forward_features(weights, depth, kind, ctx)
        logits.square().mean().backward()

    out = {}
    for name, step in (("lora", lora_step), ("stage1", stage1_step)):
        step()  # warm-up
        started = time.perf_counter()
        for _ in range(steps):
            step()
        out[name] = (time.perf_counter() - started) / steps
    return out


def _spin(stop) -> None:
    x = 0
    while not stop.is_set():
        x += 1


def measure(threads: int, loaded: bool, workdir: Path, steps: int) -> dict:
    stop = multiprocessing.Event()
    spinner = multiprocessing.Process(target=_spin, args=(stop,)) if loaded else None
    if spinner:
        spinner.start()
    try:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        result = subprocess.run([sys.executable, __file__, "--worker", str(threads), "--workdir", str(workdir),
                                 "--steps", str(steps)], env=env, capture_output=True, text=True, check=True)
        return json.loads(result.stdout.strip().splitlines()[-1])
    finally:
        if spinner:
            stop.set()
            spinner.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.workdir, args.steps)))
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lofa_threads_"))
    print(f"CPU cores: {os.cpu_count()}; {args.steps} steps per measurement; seconds per step")
    rows = {}
    for loaded in (False, True):
        for threads in (1, 2):
            rows[(loaded, threads)] = measure(threads, loaded, workdir, args.steps)
    print(f"{'condition':<24}{'workload':<10}{'1 thread':>10}{'2 threads':>11}{'2 / 1':>8}")
    for loaded in (False, True):
        for name in ("lora", "stage1"):
            one, two = rows[(loaded, 1)][name], rows[(loaded, 2)][name]
            label = "next to a busy process" if loaded else "machine otherwise idle"
            print(f"{label:<24}{name:<10}{one:>10.3f}{two:>11.3f}{two / one:>8.2f}")


if __name__ == "__main__":
    main()
