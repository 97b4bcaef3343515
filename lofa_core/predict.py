"""From base weights and a prompt to a LoRA: the prediction loop the nodes call.

Targets are grouped by shape and run in chunks, so memory stays bounded by one chunk of W however large the
base model is; the condition is projected once per prompt, not once per matrix. The caller supplies how to
read a weight (from a ComfyUI MODEL, a file, a test model) and how to report progress and cancellation.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .checkpoint import LoFACheckpoint
from .conditioning import KIND_POSE, Condition, collapse_padding
from .errors import ConditionError, LoFAError, WeightError
from .layers import Context, PromptKV
from .lora_formats import LoRAFactors, PredictedLoRA
from .response import PREVIEW_SIDE, ResponseMaps, preview_map, response_map
from .targets import Target

ReadWeight = Callable[[Target], torch.Tensor]
FP16_FIX = "choose bfloat16 or float32 in Load LoFA Model (float16 overflows easily)"


@dataclass
class Prediction:
    lora: PredictedLoRA | None  # None when only Stage-I ran
    response: ResponseMaps | None


def shape_groups(targets: Sequence[Target], chunk_size: int) -> list[list[Target]]:
    """Targets of equal shape in chunks of at most `chunk_size`, keeping catalog order inside a shape."""
    by_shape: dict[tuple[int, int], list[Target]] = defaultdict(list)
    for t in targets:
        by_shape[t.shape].append(t)
    return [group[i:i + chunk_size] for group in by_shape.values() for i in range(0, len(group), chunk_size)]


def predict(ckpt: LoFACheckpoint, targets: Sequence[Target], read_weight: ReadWeight, condition: Condition, *,
            device: torch.device, dtype: torch.dtype, chunk_size: int = 8, with_lora: bool = True,
            with_response: bool = True, output_device: torch.device | str = "cpu",
            response_side: int | None = PREVIEW_SIDE,
            on_chunk: Callable[[int, int], None] | None = None) -> Prediction:
    """Run Stage-I (and Stage-II) over `targets`.

    Response maps are mean-pooled to at most `response_side` pixels a side (None: full resolution, float32). A
    single-stage model (no Stage-I) reports the response map of its own predicted LoRA instead.
    `on_chunk(done, total)` is called after every chunk; it may raise to cancel (ComfyUI's interrupt).
    """
    net = ckpt.net
    if with_lora and net.stage2 is None:
        raise LoFAError(f"LoFA checkpoint '{ckpt.name}' has only Stage-I (response maps); predicting a LoRA "
                        f"needs a checkpoint with Stage-II.")
    wanted_lora = with_lora
    derived_response = with_response and net.stage1 is None  # single-stage: R of the predicted LoRA
    with_lora = with_lora or derived_response
    loaded = {p.dtype for p in net.parameters() if p.is_floating_point()}
    if loaded != {dtype}:
        names = ", ".join(sorted(_dtype_name(d) for d in loaded))
        raise LoFAError(f"predict was asked to compute in {_dtype_name(dtype)}, but the hypernetwork of '{ckpt.name}' "
                        f"is loaded in {names}: load it with load_checkpoint(path, dtype={dtype}) or call "
                        f"ckpt.net.to({dtype}) first.")
    for t in targets:
        if problem := net.shape_problem(t.out_features, t.in_features):
            raise LoFAError(f"LoFA checkpoint '{ckpt.name}' cannot take {t.key}: {problem}.")
    chunks = shape_groups(targets, max(1, chunk_size))
    factors: dict[str, LoRAFactors] = {}
    maps, actives, kept = [], [], []
    with torch.no_grad():  # not inference_mode: the LoRA tensors may feed autograd later (training nodes)
        ctx1 = encode_prompt(net.stage1, condition, device, dtype) if net.stage1 is not None else None
        ctx2 = encode_prompt(net.stage2, condition, device, dtype) if with_lora else None
        _check_prompt_encoding((ctx1 or []) + (ctx2 or []), condition, dtype)
        for done, chunk in enumerate(chunks, start=1):
            w = torch.stack([_checked_weight(read_weight(t), t).to(device) for t in chunk])  # W's own dtype
            depth = torch.tensor([t.depth for t in chunk], device=device)
            type_index = torch.tensor([t.type_index for t in chunk], device=device)
            first = net.stage1 if net.stage1 is not None else net.stage2
            prepared = first.prepare_weights(w)  # normalised once, shared by both stages if they can
            stage1_features = probs = None
            if net.stage1 is not None:
                stage1_features, logits = net.stage1.forward_features(w, depth, type_index, ctx1, logits=with_response,
                                                            prepared=prepared)
                if with_response:
                    _check_outputs(ckpt.name, chunk, dtype, {"the response map": logits})
                    probs = torch.sigmoid(logits.float())
            if with_lora:
                shared = prepared if net.stage2.cfg.patch_size == first.cfg.patch_size else None
                a, b, alpha = net.stage2(w, depth, type_index, ctx2, stage1_features, prepared=shared)
                _check_outputs(ckpt.name, chunk, dtype, {"B": b, "A": a, "alpha": alpha})
                if derived_response:
                    probs = response_map(alpha.float().unsqueeze(-1) * torch.bmm(b.float(), a.float()), w, ckpt.tau)
                a = a.float().to(output_device)
                b = b.float().to(output_device)
                for i, t in enumerate(chunk):
                    factors[t.path] = LoRAFactors(up=b[i].clone(), down=a[i].clone(), scale=float(alpha[i]))
            if probs is not None:
                actives.extend((probs > 0.5).float().mean(dim=(1, 2)).tolist())
                full = probs.to(output_device).unbind(0)
                maps.extend(full if response_side is None else preview_map(probs, response_side).unbind(0))
                kept.extend(chunk)
                del probs
            del w, stage1_features
            if on_chunk is not None:
                on_chunk(done, len(chunks))
    lora = PredictedLoRA(ckpt.catalog.family, _in_order(factors, targets)) if wanted_lora else None
    response = None
    if with_response:
        order = {t.key: i for i, t in enumerate(targets)}
        idx = sorted(range(len(kept)), key=lambda i: order[kept[i].key])
        response = ResponseMaps(
            keys=[kept[i].key for i in idx], depths=[kept[i].depth for i in idx],
            type_indices=[kept[i].type_index for i in idx], type_names=ckpt.catalog.type_names,
            num_depths=ckpt.catalog.num_depths, maps=[maps[i] for i in idx],
            active_fraction=[actives[i] for i in idx], family=ckpt.catalog.family,
        )
    return Prediction(lora, response)


def encode_prompt(stage, condition: Condition, device: torch.device, dtype: torch.dtype) -> list[PromptKV]:
    """A stage's per-block cross-attention keys/values for one prompt (computed once, reused for every matrix)."""
    if condition.kind == KIND_POSE:
        values = stage.encode_context(condition.tokens.unsqueeze(0).to(device=device, dtype=dtype))
        return stage.prompt_cache(Context(values, None))
    tokens, log_counts = collapse_padding(condition.tokens)  # a WAN prompt's zero padding becomes one weighted key
    pooled = condition.pooled.unsqueeze(0).to(device=device, dtype=dtype) if condition.pooled is not None else None
    return stage.prompt_cache(stage.encode_collapsed(tokens.unsqueeze(0).to(device=device, dtype=dtype),
                                                     log_counts.unsqueeze(0).to(device=device), pooled))


def _check_prompt_encoding(kvs: Sequence[PromptKV], condition: Condition, dtype: torch.dtype) -> None:
    """Prompt values far outside any encoder's range overflow the hypernetwork's keys/values into NaN/Inf."""
    if all(torch.isfinite(kv.k).all() and torch.isfinite(kv.v).all() for kv in kvs):
        return
    parts = [condition.tokens] + ([condition.pooled] if condition.pooled is not None else [])
    largest = max(float(x.abs().max()) for x in parts)
    raise ConditionError(
        f"The prompt condition overflows the LoFA hypernetwork in {_dtype_name(dtype)}: its values reach "
        f"{largest:.3g}, far beyond what a text, image or pose encoder gives. Re-encode the prompt with the "
        f"encoder the checkpoint expects (CLIP Text Encode, CLIP Vision Encode or pose frames)"
        f"{'; or ' + FP16_FIX if dtype == torch.float16 else ''}."
    )


def _check_outputs(name: str, chunk: Sequence[Target], dtype: torch.dtype, outputs: dict[str, torch.Tensor]) -> None:
    """Refuse NaN/Inf in a chunk's predictions, naming the first layer and output that has them."""
    bad = {label: (~torch.isfinite(x)).flatten(1).any(dim=1).tolist() for label, x in outputs.items()}  # one sync
    for i, t in enumerate(chunk):
        labels = [label for label, flags in bad.items() if flags[i]]
        if labels:
            raise LoFAError(
                f"LoFA's prediction for {t.key} is not finite (NaN or Inf in {', '.join(labels)}), so no LoRA is "
                f"returned. The LoFA checkpoint '{name}' overflows {_dtype_name(dtype)} on this layer: "
                f"{FP16_FIX if dtype == torch.float16 else 'it is damaged or was not trained for these base weights'}."
            )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _checked_weight(w: torch.Tensor, t: Target) -> torch.Tensor:
    if tuple(w.shape) != t.shape:
        raise WeightError(f"{t.key} has shape {list(w.shape)}, expected {list(t.shape)}.")
    if not torch.isfinite(w).all():
        raise WeightError(f"The base model's weight {t.key} contains NaN or Inf values, so no LoRA can be "
                          f"predicted for it. The model file is damaged or was saved after a diverged "
                          f"training run: load a clean copy of the base model.")
    return w


def _in_order(factors: dict[str, LoRAFactors], targets: Sequence[Target]) -> dict[str, LoRAFactors]:
    return {t.path: factors[t.path] for t in targets if t.path in factors}


def truncate_rank(f: LoRAFactors, rank: int) -> LoRAFactors:
    """Best rank-`rank` approximation of scale * up @ down (exact SVD through two thin QRs)."""
    if rank >= f.rank:
        return f
    qu, ru = torch.linalg.qr(f.up.float())
    qd, rd = torch.linalg.qr(f.down.float().T)
    u, s, vh = torch.linalg.svd(ru @ rd.T)
    root = s[:rank].sqrt()
    up = (qu @ u[:, :rank]) * root
    down = root.unsqueeze(1) * (vh[:rank] @ qd.T)
    return LoRAFactors(up=up, down=down, scale=f.scale)
