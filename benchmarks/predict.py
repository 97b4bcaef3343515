"""Speed, accuracy and memory of LoFA prediction at the released model size, measured side by side in one run.

    python benchmarks/predict.py                 # WAN 2.1 1.3B: 240 targets (the reference alone takes ~15 min)
    python benchmarks/predict.py --targets 16    # a quick subset
    python benchmarks/predict.py --family sdxl --targets 56   # SDXL's mixed shapes (560 targets in all)

WAN: the authors' released architecture (768-d, 8 blocks, 12 heads, patch 96, rank 32, umT5 context 512x4096)
with random weights, 1536x1536 random base weights, a ~100-token prompt padded to 512. It times
(a) a reference that computes the model the straightforward way (`tests/support/official_reference.py`: the context
    projected again for every matrix, all 512 padded tokens attended, float32, one matrix at a time), and
(b) the pack's prediction path as the nodes use it (`lofa_core.predict.predict`) in float32 and bfloat16,
and prints each time, the ratios, the max relative error of alpha * B @ A against the reference, achieved
GFLOP/s against this machine's matmul peak (measured here), and peak memory above the loaded weights.
SDXL uses the pack's axial architecture at the same width; its reference is the same network called the
straightforward way (full context per matrix, no caching, one matrix at a time, float32).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support import official_reference as ref  # noqa: E402

from lofa_core.checkpoint import LoFACheckpoint  # noqa: E402
from lofa_core.conditioning import prepare_text_condition  # noqa: E402
from lofa_core.config import HEAD_POOLED, RESPONSE_SOFTPLUS_TAU, HyperNetConfig  # noqa: E402
from lofa_core.convert_official import official_catalog  # noqa: E402
from lofa_core.factory import new_hypernet  # noqa: E402
from lofa_core.families import build_catalog  # noqa: E402
from lofa_core.families.sdxl import TEXT_CONDITION as SDXL_TEXT  # noqa: E402
from lofa_core.families.wan import TEXT_CONDITION as WAN_TEXT  # noqa: E402
from lofa_core.hypernet import LoFAHypernet  # noqa: E402
from lofa_core.predict import predict, shape_groups  # noqa: E402
from training.untrained import randomise_lora_heads_  # noqa: E402

RELEASED = dict(d_model=768, n_heads=12, n_blocks=8, patch_size=96, rank=32, context_dim=4096, num_depths=30,
                num_types=8, max_rows=16, max_cols=16, head=HEAD_POOLED, head_shape=(1536, 1536),
                response=RESPONSE_SOFTPLUS_TAU)


class PeakRSS:
    """Samples this process's resident memory in a thread; `extra` is the peak above the start."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.proc = interval, psutil.Process()

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self.proc.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()

    @property
    def extra_gb(self) -> float:
        return (self.peak - self.start) / 1e9


def matmul_peak(dtype: torch.dtype, n: int = 4096, repeats: int = 3) -> float:
    """This machine's matmul throughput (GFLOP/s) for a large square product in `dtype`."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - started) / 1e9


def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def wan_setup(count: int):
    torch.manual_seed(0)
    stage1 = HyperNetConfig(stage=1, **RELEASED)
    stage2 = HyperNetConfig(stage=2, cross_attn_idxs=(3, 7), **RELEASED)
    net = randomise_lora_heads_(LoFAHypernet(stage1, stage2), seed=0).eval()
    catalog = official_catalog(stage1)
    return LoFACheckpoint(net, catalog, WAN_TEXT, 0.02, "released-size (random)"), catalog.targets[:count]


def sdxl_setup(count: int):
    torch.manual_seed(0)
    catalog = build_catalog(sdxl_shapes())
    net = randomise_lora_heads_(new_hypernet(catalog, SDXL_TEXT, d_model=768, n_heads=12, n_blocks=8,
                                             patch_size=64, rank=32), seed=0).eval()
    step = max(1, len(catalog.targets) // count)
    return LoFACheckpoint(net, catalog, SDXL_TEXT, 0.02, "axial (random)"), catalog.targets[::step][:count]


def sdxl_shapes() -> dict[str, tuple[int, ...]]:
    """The real SDXL UNet's attention projections (70 transformer blocks) and the keys that identify SDXL."""
    shapes = {"label_emb.0.0.weight": (1280, 2816)}
    layout = [("input_blocks.4.1", 640, 2), ("input_blocks.5.1", 640, 2), ("input_blocks.7.1", 1280, 10),
              ("input_blocks.8.1", 1280, 10), ("middle_block.1", 1280, 10)] + \
             [(f"output_blocks.{i}.1", 1280, 10) for i in range(3)] + \
             [(f"output_blocks.{i}.1", 640, 2) for i in range(3, 6)]
    for loc, c, depth in layout:
        for t in range(depth):
            for attn in ("attn1", "attn2"):
                for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                    wide = attn == "attn2" and proj in ("to_k", "to_v")
                    shapes[f"{loc}.transformer_blocks.{t}.{attn}.{proj}.weight"] = (c, 2048 if wide else c)
    return shapes


def prompt(spec, real: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """WAN: `real` umT5 tokens then zeros up to 512; SDXL: 77 CLIP tokens (its padding has real embeddings)."""
    gen = torch.Generator().manual_seed(1)
    if spec.length is None:
        tokens = torch.randn(77, spec.token_dim, generator=gen)
    else:
        tokens = torch.zeros(spec.length, spec.token_dim)
        tokens[:real] = torch.randn(real, spec.token_dim, generator=gen)
    pooled = torch.randn(spec.pooled_dim, generator=gen) if spec.pooled_dim else None
    return tokens, pooled


def reference_wan(ckpt, targets, weights, tokens):
    """The authors' forward, one matrix at a time, context repeated and projected for each."""
    sd1 = {k: v.float() for k, v in ckpt.net.stage1.state_dict().items()}
    sd2 = {k: v.float() for k, v in ckpt.net.stage2.state_dict().items()}
    out = {}
    with torch.no_grad():
        for t in targets:
            w = weights[t.key][None]
            depth, kind = torch.tensor([t.depth]), torch.tensor([t.type_index])
            feats, _ = ref.stage1_forward(sd1, w, depth, kind, tokens[None])
            a, b, alpha = ref.stage2_forward(sd2, w, depth, kind, tokens[None], feats)
            out[t.path] = (a[0], b[0], alpha[0])
    return out


def reference_direct(ckpt, targets, weights, tokens, pooled):
    """The pack's own modules called the straightforward way: full context per matrix, nothing cached."""
    s1, s2 = ckpt.net.stage1, ckpt.net.stage2
    pool = None if pooled is None else pooled[None]
    out = {}
    with torch.no_grad():
        for t in targets:
            w = weights[t.key][None]
            depth, kind = torch.tensor([t.depth]), torch.tensor([t.type_index])
            feats, _ = s1.forward_features(w, depth, kind, s1.encode_context(tokens[None], pool))
            a, b, alpha = s2(w, depth, kind, s2.encode_context(tokens[None], pool), feats)
            out[t.path] = (a[0], b[0], alpha[0])
    return out


def rel_errors(pred, reference) -> list[float]:
    errs = []
    for path, (a, b, alpha) in reference.items():
        truth = alpha * (b @ a)
        errs.append(float((pred[path].delta() - truth).norm() / truth.norm()))
    return errs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=["wan", "sdxl"], default="wan")
    parser.add_argument("--targets", type=int, default=0, help="how many targets (0 = all: 240 WAN / 560 SDXL)")
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--chunk", type=int, default=8, help="matrices per forward pass in the pack's path")
    parser.add_argument("--skip-reference", action="store_true")
    args = parser.parse_args(argv)

    setup = wan_setup if args.family == "wan" else sdxl_setup
    ckpt, targets = setup(args.targets or 10 ** 6)
    gen = torch.Generator().manual_seed(2)
    weights = {t.key: 0.02 * torch.randn(t.shape, generator=gen) for t in targets}  # the loaded base model
    tokens, pooled = prompt(ckpt.condition, args.prompt_tokens)
    cond = prepare_text_condition(tokens, pooled, ckpt.condition)
    print(f"{args.family}: {len(targets)} targets, hypernet {sum(p.numel() for p in ckpt.net.parameters()) / 1e6:.1f}M "
          f"params, prompt {args.prompt_tokens} tokens, {torch.get_num_threads()} threads")
    peaks = {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16)}
    print(f"matmul peak here: float32 {peaks['float32']:.0f} GFLOP/s, bfloat16 {peaks['bfloat16']:.0f} GFLOP/s")

    def reference(selection):
        if args.family == "wan":
            return reference_wan(ckpt, selection, weights, tokens)
        return reference_direct(ckpt, selection, weights, tokens, pooled)

    by_shape: dict = {}
    for t in targets:
        by_shape.setdefault(t.shape, []).append(t)
    ref_flops = sum(count_flops(lambda g=group: reference(g[:1])) * len(group) for group in by_shape.values())
    truth, ref_time = None, None
    if not args.skip_reference:
        with PeakRSS() as mem:
            started = time.perf_counter()
            truth = reference(targets)
            ref_time = time.perf_counter() - started
        print(f"reference (straightforward, float32): {ref_time:8.1f} s  {ref_flops / ref_time / 1e9:6.1f} GFLOP/s  "
              f"peak +{mem.extra_gb:.2f} GB")
    print(f"FLOP per prediction: reference {ref_flops / 1e12:.2f} TFLOP "
          f"({ref_flops / len(targets) / 1e9:.1f} GFLOP per matrix)")

    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        ckpt.net.to(dtype)
        chunks = shape_groups(targets, args.chunk)

        def run(selection=targets, dtype=dtype):
            return predict(ckpt, selection, lambda t: weights[t.key], cond, device=torch.device("cpu"),
                           dtype=dtype, chunk_size=args.chunk)

        flops = executed_flops(run, chunks)
        run(chunks[0])  # warm-up (kernels, allocator)
        with PeakRSS() as mem:
            started = time.perf_counter()
            result = run()
            elapsed = time.perf_counter() - started
        line = (f"pack ({name:8s}):                 {elapsed:8.1f} s  {flops / elapsed / 1e9:6.1f} GFLOP/s "
                f"({100 * flops / elapsed / 1e9 / peaks[name]:.0f}% of {name} peak; "
                f"{flops / 1e12:.2f} TFLOP executed)  peak +{mem.extra_gb:.2f} GB")
        if truth is not None:
            errs = rel_errors(result.lora.factors, truth)
            line += f"\n    {elapsed / ref_time:.3f}x the reference time, max rel. error of alpha*B@A {max(errs):.2e}"
        print(line)
    ckpt.net.float()
    return 0


def executed_flops(run, chunks) -> float:
    """FLOPs the pack's path executes: the prompt once, plus each chunk (counted once per distinct shape)."""
    prompt_only = count_flops(lambda: run([]))
    per_kind: dict = {}
    for c in chunks:
        key = (c[0].shape, len(c))
        if key not in per_kind:
            per_kind[key] = [count_flops(lambda c=c: run(c)) - prompt_only, 0]
        per_kind[key][1] += 1
    return prompt_only + sum(f * n for f, n in per_kind.values())


if __name__ == "__main__":
    sys.exit(main())
