"""lofa_core on its own (no ComfyUI): hypernetwork, response maps, LoRA formats, files, conditions."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lofa_core import fileio
from lofa_core.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from lofa_core.conditioning import prepare_text_condition
from lofa_core.config import HEAD_POOLED, HyperNetConfig, axial_config_for
from lofa_core.errors import CheckpointError, ConditionError, LoRAFormatError
from lofa_core.factory import SMALL, new_hypernet
from lofa_core.families.sdxl import TEXT_CONDITION as SDXL_TEXT
from lofa_core.families.wan import TEXT_CONDITION as WAN_TEXT
from lofa_core.hypernet import LoFAHypernet, normalise_columns
from lofa_core.lora_formats import (
    LoRAFactors,
    PredictedLoRA,
    average_loras,
    read_lora_state_dict,
    to_state_dict,
)
from lofa_core.lora_keys import STYLE_COMFYUI, STYLE_KOHYA
from lofa_core.predict import predict, truncate_rank
from lofa_core.response import cosine_similarity, iou, lora_delta, response_map
from lofa_core.targets import Target, TargetCatalog
from training.untrained import randomise_lora_heads_

MIXED = [(64, 64), (64, 200), (96, 64)]  # square, non-square wide (not a patch multiple), tall


def mixed_catalog() -> TargetCatalog:
    targets = tuple(Target(f"blocks.{i}.layer", o, n, i, i % 2) for i, (o, n) in enumerate(MIXED))
    return TargetCatalog("sdxl", ("a", "b"), len(MIXED), ("attn",), targets)


def small_net(seed=0, **sizes) -> LoFAHypernet:
    torch.manual_seed(seed)
    spec = SDXL_TEXT
    return new_hypernet(mixed_catalog(), spec, **({"d_model": 32, "n_heads": 4, "n_blocks": 2, "patch_size": 16,
                                                   "rank": 4} | sizes))


def test_response_map_threshold_and_metrics():
    w = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    delta = torch.tensor([[0.03, 0.03], [-0.005, 1e-9]])
    # ratios 0.03, 0.015, 0.01, ~0.1 (zero weight: eps keeps it finite) -> only > 0.02 counts
    assert response_map(delta, w, tau=0.02).tolist() == [[1.0, 0.0], [0.0, 1.0]]
    a = torch.tensor([1.0, 1.0, 0.0, 0.0])
    b = torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert cosine_similarity(a, b).item() == pytest.approx(0.5)
    assert iou(a, b).item() == pytest.approx(1 / 3)
    assert iou(torch.zeros(4), torch.zeros(4)).item() == 1.0
    assert cosine_similarity(torch.zeros(4), b).item() == 0.0
    up, down = torch.randn(5, 2), torch.randn(2, 7)
    torch.testing.assert_close(lora_delta(up, down, 0.5), 0.5 * up @ down)


def test_column_normalisation_is_per_input_column():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 4, generator=gen)
    scales = torch.tensor([1.0, 10.0, 3.0, 30.0])
    torch.testing.assert_close(normalise_columns(w * scales), normalise_columns(w), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(normalise_columns(w), w / torch.sqrt(w.pow(2).mean(dim=0) + 1e-6))
    rows_scaled = w * torch.tensor([[1.0], [5.0], [1.0], [1.0], [1.0], [1.0]])
    assert not torch.allclose(normalise_columns(rows_scaled)[0], normalise_columns(w)[0]), "not per row"


def test_one_network_handles_mixed_and_non_square_shapes():
    net = small_net()
    ctx1 = net.stage1.encode_context(torch.randn(1, 5, 2048), torch.randn(1, 1280))
    ctx2 = net.stage2.encode_context(torch.randn(1, 5, 2048), torch.randn(1, 1280))
    for out_f, in_f in MIXED:
        w = torch.randn(3, out_f, in_f)
        ids = torch.tensor([0, 1, 2])
        tokens, logits = net.stage1.forward_features(w, ids, ids % 2, ctx1)
        assert logits.shape == (3, out_f, in_f)
        a, b, alpha = net.stage2(w, ids, ids % 2, ctx2, tokens)
        assert a.shape == (3, 4, in_f) and b.shape == (3, out_f, 4) and alpha.shape == (3, 1)
        assert torch.all(b == 0), "zero-initialised B head: a fresh network predicts a zero LoRA"
        torch.testing.assert_close(alpha, torch.full((3, 1), 1.0))


def test_shared_context_equals_repeated_context():
    net = small_net()
    w, ids = torch.randn(3, 64, 64), torch.tensor([0, 1, 2])
    ctx = net.stage1.encode_context(torch.randn(1, 7, 2048), torch.randn(1, 1280))
    shared = net.stage1.forward_features(w, ids, ids % 2, ctx)[0]
    repeated = net.stage1.forward_features(w, ids, ids % 2, ctx.expand(3, -1, -1).contiguous())[0]
    torch.testing.assert_close(shared, repeated, rtol=1e-5, atol=1e-5)
    # two prompts, two matrices each: grouped contexts equal contexts repeated per matrix
    w4, ids4 = torch.randn(4, 64, 64), torch.tensor([0, 1, 2, 0])
    two = net.stage1.encode_context(torch.randn(2, 7, 2048), torch.randn(2, 1280))
    grouped = net.stage1.forward_features(w4, ids4, ids4 % 2, two)[0]
    per_matrix = net.stage1.forward_features(w4, ids4, ids4 % 2, two.repeat_interleave(2, dim=0))[0]
    torch.testing.assert_close(grouped, per_matrix, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    def grads(checkpointing: bool):
        net = randomise_lora_heads_(small_net(seed=1), seed=1).stage2.train()
        net.gradient_checkpointing = checkpointing
        torch.manual_seed(2)
        w, ids = torch.randn(2, 64, 200), torch.tensor([0, 1])
        ctx = net.encode_context(torch.randn(1, 5, 2048), torch.randn(1, 1280))
        a, b, alpha = net(w, ids, ids, ctx, torch.randn(2, 17, 32))
        (alpha.unsqueeze(-1) * (b @ a)).square().sum().backward()
        return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and "blocks.0.self_attn.qkv.weight" in plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_config_round_trip_and_validation():
    cfg = axial_config_for(MIXED, stage=2, num_depths=3, num_types=2, d_model=32, n_heads=4, n_blocks=4)
    assert HyperNetConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    assert HyperNetConfig.from_json({**cfg.to_json(), "extra": {}}) == cfg  # checkpoints written before 2026-12
    with pytest.raises(ValueError, match=r"unknown hypernetwork config field\(s\) \['future'\]"):
        HyperNetConfig.from_json({**cfg.to_json(), "future": 1})
    assert cfg.cross_attn_idxs == (1, 3)
    with pytest.raises(ValueError, match="not divisible"):
        HyperNetConfig(d_model=30, n_heads=4)
    pooled = HyperNetConfig(head=HEAD_POOLED, head_shape=(64, 64), patch_size=16, max_rows=4, max_cols=4)
    assert pooled.shape_problem(64, 64) is None
    assert "only 64x64" in pooled.shape_problem(64, 128)


def test_lora_state_dict_round_trips_in_every_naming():
    paths = ["blocks.0.self_attn.q", "input_blocks.4.1.transformer_blocks.0.attn2.to_k"]
    lora = PredictedLoRA("x", {p: LoRAFactors(torch.randn(8, 3), torch.randn(3, 5), 0.25) for p in paths})
    for style in (STYLE_COMFYUI, STYLE_KOHYA):
        sd = to_state_dict(lora, style)
        assert sd[next(k for k in sd if k.endswith(".alpha"))].item() == pytest.approx(0.25 * 3)
        back, leftovers = read_lora_state_dict(sd, paths)
        assert not leftovers
        for p in paths:
            torch.testing.assert_close(back[p].delta(), lora.factors[p].delta())
    f = lora.factors[paths[0]]
    peft = {"transformer.blocks.0.attn1.to_q.lora_A.weight": f.down,
            "transformer.blocks.0.attn1.to_q.lora_B.weight": f.up}
    back, leftovers = read_lora_state_dict(peft, paths)
    assert not leftovers and back[paths[0]].scale == 1.0, "no alpha means scale 1 (ComfyUI's convention)"
    torch.testing.assert_close(back[paths[0]].delta(), f.up @ f.down)
    bare = {"blocks.0.self_attn.q.lora_B.default.weight": f.up, "blocks.0.self_attn.q.lora_A.default.weight": f.down,
            "blocks.9.ffn.0.lora_up.weight": f.up, "blocks.9.ffn.0.lora_down.weight": f.down}
    back, leftovers = read_lora_state_dict(bare, paths)
    assert list(back) == [paths[0]] and sorted(leftovers) == ["blocks.9.ffn.0.lora_down.weight",
                                                              "blocks.9.ffn.0.lora_up.weight"]
    with pytest.raises(LoRAFormatError, match="no matching"):
        read_lora_state_dict({"a.lora_up.weight": f.up}, ["a"])


def test_truncate_rank_is_the_best_low_rank_approximation():
    f = LoRAFactors(torch.randn(20, 6), torch.randn(6, 15), 0.3)
    t = truncate_rank(f, 2)
    assert t.rank == 2
    u, s, vh = torch.linalg.svd(f.delta())
    best = (u[:, :2] * s[:2]) @ vh[:2]
    torch.testing.assert_close(t.delta(), best, rtol=1e-4, atol=1e-5)


def test_average_of_loras_is_the_mean_update_exactly():
    """An ensemble's LoRA: every target's update is the mean of the members' updates (ranks and scales differ)."""
    g = torch.Generator().manual_seed(0)
    members = [PredictedLoRA("x", {p: LoRAFactors(torch.randn(8, r, generator=g), torch.randn(r, 5, generator=g),
                                                  scale) for p in ("a", "b")})
               for r, scale in ((3, 0.25), (2, -1.5), (4, 1.0))]
    mean = average_loras(members)
    for p in ("a", "b"):
        expected = sum(m.factors[p].delta() for m in members) / 3
        torch.testing.assert_close(mean.factors[p].delta(), expected, rtol=1e-5, atol=1e-6)
        assert mean.factors[p].rank == 9
    assert torch.equal(average_loras(members[:1]).factors["a"].delta(), members[0].factors["a"].delta())
    other = PredictedLoRA("x", {"a": members[0].factors["a"]})
    with pytest.raises(LoRAFormatError, match="targets other layers .*b"):
        average_loras([members[0], other])


def test_checkpoint_round_trip_and_errors(tmp_path):
    net = randomise_lora_heads_(small_net(seed=3), seed=3)
    path = save_checkpoint(tmp_path / "m.safetensors", net, mixed_catalog(), SDXL_TEXT, provenance={"trained": True})
    ckpt = load_checkpoint(path)
    assert ckpt.catalog == mixed_catalog() and ckpt.condition == SDXL_TEXT and ckpt.trained
    for k, v in net.state_dict().items():
        assert torch.equal(ckpt.net.state_dict()[k], v), k
    with pytest.raises(FileExistsError):
        save_checkpoint(path, net, mixed_catalog(), SDXL_TEXT)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.safetensors.*(truncated|corrupt)"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a file" * 10)
    with pytest.raises(CheckpointError, match="garbage.safetensors"):
        load_checkpoint(garbage)
    lora_file = tmp_path / "a_lora.safetensors"
    save_file({"x.lora_up.weight": torch.zeros(2, 1)}, lora_file)
    with pytest.raises(CheckpointError, match="not a LoFA checkpoint.*models/loras"):
        load_checkpoint(lora_file)

    meta = read_metadata(path)
    meta["stage2"]["rank"] = 8
    edited = tmp_path / "edited.safetensors"
    save_file(load_file(path), edited, metadata={"lofa": json.dumps(meta)})
    with pytest.raises(CheckpointError, match=r"edited.*tensor 'stage2\.head_A\.weight' has shape .*expects"):
        load_checkpoint(edited)
    meta = read_metadata(path)
    meta["format_version"] = 99
    newer = tmp_path / "newer.safetensors"
    save_file(load_file(path), newer, metadata={"lofa": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="version 99.*Update ComfyUI-LoFA"):
        load_checkpoint(newer)


def test_predict_without_comfy_matches_direct_forward(tmp_path):
    net = randomise_lora_heads_(small_net(seed=4), seed=4)
    path = save_checkpoint(tmp_path / "m.safetensors", net, mixed_catalog(), SDXL_TEXT)
    ckpt = load_checkpoint(path)
    weights = {t.key: torch.randn(t.shape) for t in ckpt.catalog.targets}
    cond = prepare_text_condition(torch.randn(1, 77, 2048), torch.randn(1, 1280), SDXL_TEXT)
    pred = predict(ckpt, ckpt.catalog.targets, lambda t: weights[t.key], cond, device=torch.device("cpu"),
                   dtype=torch.float32, chunk_size=1)
    assert len(pred.lora) == 3 and len(pred.response.maps) == 3
    t = ckpt.catalog.targets[1]
    with torch.no_grad():
        ctx1 = net.stage1.encode_context(cond.tokens[None], cond.pooled[None])
        ctx2 = net.stage2.encode_context(cond.tokens[None], cond.pooled[None])
        ids = torch.tensor([t.depth]), torch.tensor([t.type_index])
        feats = net.stage1.forward_features(weights[t.key][None], *ids, ctx1)[0]
        a, b, alpha = net.stage2(weights[t.key][None], *ids, ctx2, feats)
    expected = alpha[0] * (b[0] @ a[0])
    # float32 sums in a different order (batched vs single matmul, scale before or after): allow rounding noise
    # relative to the tensor's scale, since single entries near zero come from cancellation.
    torch.testing.assert_close(pred.lora.factors[t.path].delta(), expected, rtol=1e-5,
                               atol=1e-5 * expected.abs().max().item())


def test_wan_condition_strips_comfy_padding_and_pads_to_512():
    cond = torch.zeros(1, 600, 4096)
    cond[0, :30] = torch.randn(30, 4096)
    c = prepare_text_condition(cond, None, WAN_TEXT)
    assert c.tokens.shape == (512, 4096) and c.real_tokens == 30
    assert torch.equal(c.tokens[:30], cond[0, :30]) and not c.tokens[30:].any()
    long = torch.randn(1, 700, 4096)
    assert prepare_text_condition(long, None, WAN_TEXT).tokens.shape == (512, 4096)
    with pytest.raises(ConditionError, match="4096-wide.*umT5.*2048-wide.*SDXL"):
        prepare_text_condition(torch.randn(1, 77, 2048), None, WAN_TEXT)
    with pytest.raises(ConditionError, match="all zeros"):
        prepare_text_condition(torch.zeros(1, 512, 4096), None, WAN_TEXT)
    with pytest.raises(ConditionError, match="pooled"):
        prepare_text_condition(torch.randn(1, 77, 2048), None, SDXL_TEXT)
    sdxl = prepare_text_condition(torch.randn(1, 154, 2048), torch.randn(1, 1280), SDXL_TEXT)
    assert sdxl.tokens.shape == (154, 2048) and sdxl.pooled.shape == (1280,)


def test_save_numbered_never_overwrites_and_leaves_no_temp_files(tmp_path):
    t = {"x": torch.ones(2)}
    first = fileio.save_numbered(t, tmp_path, "sub/lora")
    (tmp_path / "sub" / "lora_00002.safetensors").write_bytes(b"user's file")
    second = fileio.save_numbered(t, tmp_path, "sub/lora")
    assert first.name == "lora_00001.safetensors" and second.name == "lora_00003.safetensors"
    assert (tmp_path / "sub" / "lora_00002.safetensors").read_bytes() == b"user's file"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == [
        "lora_00001.safetensors", "lora_00002.safetensors", "lora_00003.safetensors"]
    with pytest.raises(ValueError, match="inside"):
        fileio.save_numbered(t, tmp_path, "../escape")

    def failing_write(tmp):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        fileio.publish_new_file(tmp_path / "x.bin", failing_write)
    assert not any(p.name.startswith(".x.bin") for p in tmp_path.iterdir()) and not (tmp_path / "x.bin").exists()


def test_factory_small_network_is_small():
    net = new_hypernet(mixed_catalog(), SDXL_TEXT, **SMALL)
    assert sum(p.numel() for p in net.parameters()) < 2_000_000


def test_package_version_matches_pyproject():
    """The registry publishes pyproject's version; saved LoRAs record lofa_core's: they must be the same."""
    import re
    from pathlib import Path

    import lofa_core

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert re.search(r'(?m)^version = "([^"]+)"', text).group(1) == lofa_core.__version__


def test_registry_metadata_reads_with_comfyuis_own_parser():
    """pyproject's [tool.comfy] and classifiers as ComfyUI's registry reader (comfy_config, 2025+) sees them."""
    from pathlib import Path

    import lofa_core

    config_parser = pytest.importorskip("comfy_config.config_parser", reason="ComfyUI's registry reader is 2025+")
    config = config_parser.extract_node_configuration(str(Path(__file__).resolve().parent.parent))
    assert config.project.name == "comfyui-lofa" and config.project.version == lofa_core.__version__
    assert config.project.supported_comfyui_version == ">=0.0.1"
    assert config.project.supported_os == ["OS Independent"]
    assert config.project.supported_accelerators == ["GPU :: NVIDIA CUDA"]
    assert config.tool_comfy.publisher_id == "comfyui-lofa" and config.tool_comfy.display_name == "ComfyUI-LoFA"
