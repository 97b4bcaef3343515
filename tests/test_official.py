"""The authors' released LoFA model: conversion, exact architecture parity and guard rails.

No authors' code is needed: state dicts are built with the official key names and shapes (the template below is
checked against the released key list), converted, loaded strictly, and compared with an independent
transcription of the authors' forward pass (`tests/support/official_reference.py`).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch
from support import official_reference as ref
from test_wan import wan_key_shapes

from lofa_core.checkpoint import load_checkpoint
from lofa_core.conditioning import prepare_text_condition
from lofa_core.convert_official import convert, infer_config, load_official_state_dict, main, official_catalog
from lofa_core.errors import CheckpointError, ModelFamilyError
from lofa_core.families import build_catalog
from lofa_core.layers import softplus_inverse
from lofa_core.predict import predict
from lofa_core.targets import check_compatible

DATA = Path(__file__).parent / "data"
SMALL = dict(d=64, heads=4, blocks=4, patch=16, size=64, rank=4, ctx=48, depths=3, inject=(1, 3))
REAL = dict(d=768, heads=12, blocks=8, patch=96, size=1536, rank=32, ctx=4096, depths=30, inject=(3, 7))


def official_layout(d, heads, blocks, patch, size, rank, ctx, depths, inject=None, types=8):
    """Key -> shape of the authors' Stage-I (inject None) or Stage-II model, from the spec's templates."""
    g, hd, hidden = size // patch, d // heads, 4 * d
    out = {"cls_token": (1, 1, d), "patch_embed.proj.weight": (d, 1, patch, patch), "patch_embed.proj.bias": (d,),
           "patch_embed.norm.weight": (d,), "pos.row": (1, g, 1, d), "pos.col": (1, 1, g, d),
           "depth_embed.weight": (depths, d), "type_embed.weight": (types, d), "text_proj.weight": (d, ctx),
           "text_proj.bias": (d,)}

    def attention(p, fused):
        proj = {f"{p}.qkv.weight": (3 * d, d), f"{p}.qkv.bias": (3 * d,)} if fused else {
            f"{p}.q.weight": (d, d), f"{p}.q.bias": (d,), f"{p}.kv.weight": (2 * d, d), f"{p}.kv.bias": (2 * d,)}
        return {**proj, f"{p}.q_norm.weight": (hd,), f"{p}.q_norm.bias": (hd,), f"{p}.k_norm.weight": (hd,),
                f"{p}.k_norm.bias": (hd,), f"{p}.proj.weight": (d, d), f"{p}.proj.bias": (d,)}

    def mlp(p):
        return {f"{p}.fc1.weight": (hidden, d), f"{p}.fc1.bias": (hidden,), f"{p}.fc2.weight": (d, hidden),
                f"{p}.fc2.bias": (d,)}

    def norm(p):
        return {f"{p}.weight": (d,), f"{p}.bias": (d,)}

    for i in range(blocks):
        b = f"blocks.{i}"
        out |= {**norm(f"{b}.norm1"), **attention(f"{b}.self_attn", True), f"{b}.ls1.gamma": (d,),
                **norm(f"{b}.norm2"), **mlp(f"{b}.mlp_sa"), f"{b}.ls2.gamma": (d,), **norm(f"{b}.norm3"),
                **attention(f"{b}.cross_attn", False), f"{b}.ls3.gamma": (d,), **norm(f"{b}.norm4"),
                **mlp(f"{b}.mlp_ca"), f"{b}.ls4.gamma": (d,)}
    out |= norm("norm")
    for i in inject or ():
        c = f"cross_attn_blocks.{i}"
        out |= {**attention(f"{c}.cross_attn", False), f"{c}.ls1.gamma": (d,), **norm(f"{c}.norm2"),
                **mlp(f"{c}.mlp"), f"{c}.ls2.gamma": (d,)}
    out |= {"head_A.weight": (rank * size, d), "head_A.bias": (rank * size,), "head_B.weight": (size * rank, d),
            "head_B.bias": (size * rank,)}
    if inject is not None:
        out |= {"head_alpha.weight": (1, d), "head_alpha.bias": (1,)}
    return out


def random_state_dict(layout, seed, fresh_heads=False):
    """Random values everywhere (norm scales near 1); `fresh_heads` gives the authors' init of the heads:
    head_B zero (ZeroLinear), head_alpha weight zero and bias softplus^-1(1e-3)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in layout.items():
        scale = 0.5 if key in ("pos.row", "pos.col", "cls_token") else 0.05
        t = torch.randn(shape, generator=gen) * scale
        if key.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight", "norm4.weight", "gamma")):
            t = 1 + 0.1 * torch.randn(shape, generator=gen)
        sd[key] = t
    if fresh_heads:
        sd["head_B.weight"].zero_()
        sd["head_B.bias"].zero_()
        if "head_alpha.weight" in sd:
            sd["head_alpha.weight"].zero_()
            sd["head_alpha.bias"].fill_(softplus_inverse(1e-3))
    return sd


def write_release(tmp_path, dims=SMALL, seed=0, prefix="module.", fresh_heads=False, dtype=torch.float32):
    s1 = random_state_dict(official_layout(**{**dims, "inject": None}), seed, fresh_heads)
    s2 = random_state_dict(official_layout(**dims), seed + 1, fresh_heads)
    p1, p2 = tmp_path / "stage1_preview.pth", tmp_path / "stage2_preview.pth"
    torch.save({prefix + k: v.to(dtype) for k, v in s1.items()}, p1)
    torch.save({prefix + k: v.to(dtype) for k, v in s2.items()}, p2)
    return s1, s2, p1, p2


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_template_matches_the_released_key_list():
    for stage, inject in ((1, None), (2, REAL["inject"])):
        released = {}
        for line in (DATA / f"official_keys_stage{stage}.tsv").read_text().splitlines():
            key, shape = line.split("\t")
            released[key] = tuple(int(v) for v in shape.strip("()").split(",") if v.strip())
        assert official_layout(**{**REAL, "inject": inject}) == released


def test_real_size_config_is_inferred_from_shapes():
    with torch.device("meta"):
        s1 = {k: torch.empty(s) for k, s in official_layout(**{**REAL, "inject": None}).items()}
        s2 = {k: torch.empty(s) for k, s in official_layout(**REAL).items()}
    c1, c2 = infer_config(s1, 1, "s1"), infer_config(s2, 2, "s2")
    assert (c2.d_model, c2.n_heads, c2.n_blocks, c2.patch_size, c2.rank, c2.context_dim) == (768, 12, 8, 96, 32, 4096)
    assert c1.head_shape == (1536, 1536) and (c1.num_depths, c1.num_types) == (30, 8)
    assert c2.cross_attn_idxs == (3, 7) and c1.cross_attn_idxs == () and c2.mlp_ratio == 4.0
    assert sum(math.prod(v.shape) for v in s1.values()) == 199_312_384
    assert sum(math.prod(v.shape) for v in s2.values()) == 213_489_409
    catalog = official_catalog(c1)
    assert catalog.describe() == "WAN 2.1 T2V 1.3B (30 blocks, dim 1536)" and len(catalog) == 240
    assert catalog.targets[9].path == "blocks.1.self_attn.k"  # depth-major, VALID_LAYERS order


def test_converted_model_matches_the_authors_forward(tmp_path):
    s1, s2, p1, p2 = write_release(tmp_path, seed=3)
    (tmp_path / "config.yaml").write_text("mixed_precision: bf16\nstage1:\n  _target_: x\n  tau: 0.03\n"
                                          "  temperature: 0.2\n  n_heads: 4\nstage2:\n  cross_attn_idxs: [1, 3]\n")
    out = convert(p1, p2, tmp_path / "converted.safetensors", config=tmp_path / "config.yaml")
    ckpt = load_checkpoint(out)
    assert ckpt.trained and ckpt.tau == pytest.approx(0.03) and ckpt.net.stage1.cfg.temperature == 0.2
    torch.manual_seed(0)
    targets = ckpt.catalog.targets[5:9]  # mixed depths and types
    weights = {t.key: torch.randn(t.shape) * 0.05 for t in targets}
    real = 20
    comfy_cond = torch.zeros(1, 600, 48)  # ComfyUI-style: longer than 512, exact zeros after the prompt
    comfy_cond[0, :real] = torch.randn(real, 48)
    cond = prepare_text_condition(comfy_cond, None, ckpt.condition)
    pred = predict(ckpt, targets, lambda t: weights[t.key], cond, device=torch.device("cpu"), dtype=torch.float32,
                   chunk_size=3)

    official_text = torch.zeros(len(targets), 512, 48)  # what the authors feed: [512, 4096]-style, zero padded
    official_text[:, :real] = comfy_cond[0, :real]
    w = torch.stack([weights[t.key] for t in targets])
    depth = torch.tensor([t.depth for t in targets])
    kind = torch.tensor([t.type_index for t in targets])
    with torch.no_grad():
        feats, logits = ref.stage1_forward(s1, w, depth, kind, official_text, tau=0.03, temperature=0.2)
        a, b, alpha = ref.stage2_forward(s2, w, depth, kind, official_text, feats)
        ours_feats, ours_logits = ckpt.net.stage1.forward_features(
            w, depth, kind, ckpt.net.stage1.encode_context(cond.tokens[None]))
        ours_a, ours_b, ours_alpha = ckpt.net.stage2(w, depth, kind, ckpt.net.stage2.encode_context(
            cond.tokens[None]), ours_feats)
    assert rel_err(ours_feats, feats) < 1e-5 and rel_err(ours_logits, logits) < 1e-5
    assert max(rel_err(ours_a, a), rel_err(ours_b, b), rel_err(ours_alpha, alpha)) < 1e-5
    for i, t in enumerate(targets):
        expected = alpha[i] * (b[i] @ a[i])
        assert expected.abs().max() > 0
        assert rel_err(pred.lora.factors[t.path].delta(), expected) <= 1e-4, t.path


def test_properties_the_spec_states(tmp_path):
    _, _, p1, p2 = write_release(tmp_path, seed=5)
    ckpt = load_checkpoint(convert(p1, p2, tmp_path / "m.safetensors"))
    s1, s2 = ckpt.net.stage1, ckpt.net.stage2
    torch.manual_seed(1)
    w, ids = torch.randn(2, 64, 64), torch.tensor([0, 2])
    ctx = s1.encode_context(torch.randn(1, 512, 48))
    with torch.no_grad():
        base = s1.forward_features(w, ids, ids, ctx)[0]
        # per-column normalisation: scaling input columns (in-features) leaves the result unchanged
        scaled = s1.forward_features(w * torch.linspace(0.5, 8, 64), ids, ids, ctx)[0]
        assert rel_err(scaled, base) < 1e-4
        rows = s1.forward_features(w * torch.linspace(0.5, 8, 64)[:, None], ids, ids, ctx)[0]
        assert rel_err(rows, base) > 1e-2, "scaling rows must matter (the norm is per column, not per row)"
        # CLS is part of the pooled mean: moving the CLS token by delta moves A by head_A(delta) / (N + 1)
        delta = torch.zeros_like(base)
        delta[:, 0] = torch.randn(2, 64)
        a0, _ = s1.lora_factors(base, 64, 64)
        a1, _ = s1.lora_factors(base + delta, 64, 64)
        expected = (delta[:, 0] @ s1.head_A.weight.T / base.shape[1]).view(2, 4, 64)
        torch.testing.assert_close(a1 - a0, expected, rtol=1e-4, atol=1e-6)
    # Stage-II injects Stage-I features right after blocks 1 and 3 (read from cross_attn_blocks.* keys)
    order = []
    hooks = [m.register_forward_hook(lambda mod, i, o, n=name: order.append(n))
             for name, m in s2.named_modules() if name.count(".") == 1 and name.split(".")[0] in ("blocks",
                                                                                                 "cross_attn_blocks")]
    with torch.no_grad():
        s2(w, ids, ids, s2.encode_context(torch.randn(1, 512, 48)), base)
    for h in hooks:
        h.remove()
    assert order == ["blocks.0", "blocks.1", "cross_attn_blocks.1", "blocks.2", "blocks.3", "cross_attn_blocks.3"]


def test_fresh_heads_give_zero_lora_and_initial_alpha(tmp_path):
    _, _, p1, p2 = write_release(tmp_path, seed=7, fresh_heads=True)
    ckpt = load_checkpoint(convert(p1, p2, tmp_path / "fresh.safetensors"))
    targets = ckpt.catalog.targets[:3]
    cond = prepare_text_condition(torch.randn(1, 512, 48), None, ckpt.condition)
    pred = predict(ckpt, targets, lambda t: torch.randn(t.shape), cond, device=torch.device("cpu"),
                   dtype=torch.float32)
    for f in pred.lora.factors.values():
        assert torch.count_nonzero(f.up) == 0 and torch.count_nonzero(f.delta()) == 0
        assert f.scale == pytest.approx(1e-3, rel=1e-5)
    # Stage-I at init: softplus(0) = ln 2 everywhere, so every logit is (ln 2 - tau) / T = 6.73
    assert all(m.float().min() > 0.998 for m in pred.response.maps)


def test_dtype_choice_and_prefixes(tmp_path):
    _, _, p1, p2 = write_release(tmp_path, seed=9, prefix="module._orig_mod.", dtype=torch.bfloat16)
    keep = load_checkpoint(convert(p1, p2, tmp_path / "bf16.safetensors", dtype="source"))
    as_fp32 = load_checkpoint(convert(p1, p2, tmp_path / "fp32.safetensors"))
    assert keep.net.stage1.cls_token.dtype == torch.bfloat16 and as_fp32.net.stage1.cls_token.dtype == torch.float32
    assert (tmp_path / "bf16.safetensors").stat().st_size < 0.6 * (tmp_path / "fp32.safetensors").stat().st_size
    assert keep.provenance["source_dtype"] == "bfloat16"


def test_bad_release_files_get_clear_errors(tmp_path, capsys):
    _, _, p1, p2 = write_release(tmp_path, seed=11)
    with pytest.raises(CheckpointError, match="swap --stage1 and --stage2"):
        convert(p2, p1, tmp_path / "x.safetensors")
    cut = tmp_path / "cut.pth"
    cut.write_bytes(p2.read_bytes()[: p2.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="'cut.pth' could not be read.*truncated or corrupt"):
        convert(p1, cut, tmp_path / "x.safetensors")
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3)}, other)
    with pytest.raises(CheckpointError, match="'other.pth' is not a LoFA hypernetwork state dict"):
        load_official_state_dict(other)
    pickled = tmp_path / "pickled.pth"
    torch.save({"cls_token": torch.zeros(1), "args": argparse.Namespace(lr=1e-4)}, pickled)  # a pickled object
    with pytest.raises(CheckpointError, match="pickled objects other than tensors"):
        load_official_state_dict(pickled)
    incomplete = torch.load(p2, weights_only=True)
    incomplete.pop("module.blocks.2.mlp_ca.fc2.bias")
    torch.save(incomplete, tmp_path / "incomplete.pth")
    with pytest.raises(CheckpointError, match=r"missing \['blocks.2.mlp_ca.fc2.bias'\]"):
        convert(p1, tmp_path / "incomplete.pth", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    assert main(["--stage1", str(p1), "--stage2", str(p2), "--out", str(tmp_path / "cli.safetensors")]) == 0
    assert main(["--stage1", str(p1), "--stage2", str(p2), "--out", str(tmp_path / "cli.safetensors")]) == 1
    assert "--overwrite" in capsys.readouterr().err


def test_official_model_only_fits_wan_1_3b():
    with torch.device("meta"):
        s1 = {k: torch.empty(s) for k, s in official_layout(**{**REAL, "inject": None}).items()}
    official = official_catalog(infer_config(s1, 1, "stage1_preview.pth"))
    check_compatible(official, build_catalog(wan_key_shapes("1.3B")), "preview")
    with pytest.raises(ModelFamilyError, match="trained for WAN 2.1 T2V 1.3B.*this MODEL is WAN 2.1 T2V 14B"):
        check_compatible(official, build_catalog(wan_key_shapes("14B")), "preview")


TINY_WAN_RELEASE = dict(d=64, heads=4, blocks=2, patch=16, size=128, rank=4, ctx=4096, depths=2, inject=(0, 1))


def test_release_pth_files_load_in_the_node_and_fit_only_their_model(comfy, model_dirs):
    """The downloaded release (.pth pair) in models/lofa: listed, converted once, used on the tiny WAN it
    fits, and refused with a clear message by a model it does not fit."""
    from support import tiny_wan
    from support.comfy_nodes import node
    from test_comfy_sdxl import sdxl_conditioning
    from test_wan import wan_conditioning

    write_release(model_dirs.lofa, dims=TINY_WAN_RELEASE, seed=13)
    choices = comfy.mappings["LoFAModelLoader"].INPUT_TYPES()["required"]["lofa_name"][0]
    assert "stage2_preview.pth" in choices and "stage1_preview.pth" not in choices
    before = {p.name: p.stat().st_mtime_ns for p in model_dirs.lofa.glob("*.pth")}
    (handle,) = node(comfy, "LoFAModelLoader").load("stage2_preview.pth", "float32")
    converted = list((model_dirs.lofa / "converted").glob("stage2_preview-*.safetensors"))
    assert len(converted) == 1 and handle.checkpoint.trained
    node(comfy, "LoFAModelLoader").load("stage2_preview.pth", "float32")
    assert list((model_dirs.lofa / "converted").iterdir()) == converted, "converted once, then reused"
    assert {p.name: p.stat().st_mtime_ns for p in model_dirs.lofa.glob("*.pth")} == before

    wan, _ = tiny_wan.build_view_patcher(seed=1)
    lora, response = node(comfy, "LoFAPredictLoRA").predict(wan, handle, wan_conditioning(), "all", 0, 8)
    assert len(response.maps) == 16 and any(k.endswith(".alpha") for k in lora)
    sdxl = comfy.tiny_sdxl.build_model(seed=0)
    errors = comfy.pack.lofa_core.errors
    with pytest.raises(errors.ModelFamilyError, match=r"trained for WAN 2.1 T2V \(2 blocks, dim 128\).*SDXL"):
        node(comfy, "LoFAPredictLoRA").predict(sdxl, handle, sdxl_conditioning(), "all", 0, 8)


def test_lora_model_and_patch_carry_the_authors_update(comfy, model_dirs):
    """In ComfyUI's alpha/rank convention the stored alpha is alpha*rank: every consumer gets alpha*B@A."""
    import comfy.model_management as mm
    from support import tiny_wan
    from support.comfy_nodes import node
    from test_wan import wan_conditioning

    s1, s2, _, _ = write_release(model_dirs.lofa, dims=TINY_WAN_RELEASE, seed=17)
    (handle,) = node(comfy, "LoFAModelLoader").load("stage2_preview.pth", "float32")
    wan, _ = tiny_wan.build_view_patcher(seed=2)
    conditioning = wan_conditioning(real_tokens=12, seed=4)
    lora, _ = node(comfy, "LoFAPredictLoRA").predict(wan, handle, conditioning, "all", 0, 8)
    key = "diffusion_model.blocks.1.cross_attn.v"
    w0 = wan.model.state_dict()[f"{key}.weight"].clone()
    text = conditioning[0][0][:, :512].clone()  # the authors' [512, 4096], zero past the prompt
    one = torch.tensor([1])
    with torch.no_grad():
        feats, _ = ref.stage1_forward(s1, w0[None], one, torch.tensor([6]), text)
        a, b, alpha = ref.stage2_forward(s2, w0[None], one, torch.tensor([6]), text, feats)
    expected = alpha[0] * (b[0] @ a[0])
    up, down, stored = lora[f"{key}.lora_up.weight"], lora[f"{key}.lora_down.weight"], lora[f"{key}.alpha"]
    assert stored.item() == pytest.approx(alpha.item() * down.shape[0], rel=1e-6)
    assert rel_err(stored / down.shape[0] * (up @ down), expected) <= 1e-4
    (patched,) = node(comfy, "LoFAApplyLoRA").apply(wan, lora, 1.0)
    mm.load_models_gpu([patched])
    try:
        w1 = wan.model.state_dict()[f"{key}.weight"].clone()
    finally:
        mm.unload_all_models()
    assert rel_err(w1 - w0, expected) <= 1e-4
