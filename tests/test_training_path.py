"""Training optimises the function users run: the batched training forward (matrices grouped by shape across
samples, collapsed prompt padding, Stage-I features fed to Stage-II) gives the same LoRA as `lofa_core.predict`,
which the nodes and the held-out evaluation call."""

from __future__ import annotations

import itertools
import types

import torch

from lofa_core.checkpoint import LoFACheckpoint
from lofa_core.conditioning import prepare_text_condition
from lofa_core.factory import SMALL, new_hypernet
from lofa_core.families import build_catalog
from lofa_core.families.wan import TEXT_CONDITION
from lofa_core.predict import predict
from training.batches import batch_prompts, contexts_for, jitter_pose_frames, make_groups
from training.stage2 import Frozen, frozen_stage1_features
from training.untrained import randomise_lora_heads_

DIM, BLOCKS = 64, 2


def _wan_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {"head.modulation": (1, 2, DIM), "patch_embedding.weight": (DIM, 16, 1, 2, 2)}
    for b in range(BLOCKS):
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                shapes[f"blocks.{b}.{attn}.{proj}.weight"] = (DIM, DIM)
    return shapes


def test_training_forward_predicts_the_lora_that_predict_returns():
    torch.manual_seed(0)
    catalog = build_catalog(_wan_shapes())
    net = randomise_lora_heads_(new_hypernet(catalog, TEXT_CONDITION, **SMALL), seed=1).eval()
    ckpt = LoFACheckpoint(net, catalog, TEXT_CONDITION, 0.02, "(test)")
    weights = {t.path: 0.05 * torch.randn(t.shape) for t in catalog.targets}
    conditions = []
    for real in (5, 11):  # two prompts of different lengths: padding collapsed differently per sample
        tokens = torch.zeros(512, 4096)
        tokens[:real] = torch.randn(real, 4096)
        conditions.append(prepare_text_condition(tokens, None, TEXT_CONDITION))

    cpu = torch.device("cpu")
    items = [(s, t) for s in range(len(conditions)) for t in catalog.targets]
    groups = make_groups(items, weights, cpu)
    prompts = batch_prompts(conditions, cpu)
    frozen = Frozen(net.stage1, None)
    settings = types.SimpleNamespace(cache_stage1_features=False)
    trained: dict[tuple[int, str], torch.Tensor] = {}
    with torch.no_grad():
        ctx1, ctx2 = prompts.encode(net.stage1), prompts.encode(net.stage2)
        for g in groups:
            samples = [types.SimpleNamespace(id=str(int(i))) for i in g.sample]
            features = frozen_stage1_features(frozen, g, ctx1, samples, settings)
            a, b, alpha = net.stage2(g.w, g.depth, g.type_index, contexts_for(ctx2, g.sample), features)
            for m, t in enumerate(g.targets):
                trained[int(g.sample[m]), t.path] = alpha[m].float() * (b[m].float() @ a[m].float())

    for s, condition in enumerate(conditions):
        lora = predict(ckpt, catalog.targets, lambda t: weights[t.path], condition, device=cpu,
                       dtype=torch.float32, with_response=False).lora
        for t in catalog.targets:
            expected = lora.factors[t.path].delta()
            assert expected.abs().max() > 0
            torch.testing.assert_close(trained[s, t.path], expected, rtol=1e-4, atol=1e-6 * float(
                expected.abs().max()))
    # and the two prompts really give different LoRAs (the comparison is per prompt, not of a constant)
    path = catalog.targets[0].path
    assert not torch.allclose(trained[0, path], trained[1, path])


def test_stage2_says_which_size_settings_its_stage1_overrides(capsys):
    from training.config import Stage2Config
    from training.stage2 import build_stage2

    net = new_hypernet(build_catalog(_wan_shapes()), TEXT_CONDITION, **SMALL)
    cfg = Stage2Config()
    cfg.hypernet.d_model, cfg.hypernet.patch_size = 2 * SMALL["d_model"], SMALL["patch_size"]
    built = build_stage2(cfg, net.stage1, alpha_init=1.0)
    assert built.cfg.d_model == SMALL["d_model"]
    said = capsys.readouterr().out
    assert f"hypernet.d_model={2 * SMALL['d_model']} (Stage-I: {SMALL['d_model']})" in said
    assert "patch_size" not in said and "--single-stage" in said
    cfg.hypernet.d_model = SMALL["d_model"]
    build_stage2(cfg, net.stage1, alpha_init=1.0)
    assert capsys.readouterr().out == ""


def test_pose_jitter_moves_each_samples_frames_as_a_whole_and_only_when_asked():
    """Training-time pose jitter shifts every frame of a sample by the same few pixels (the pose itself is
    unchanged), draws a shift per sample from the step's generator, and is off at 0."""
    frames = torch.zeros(6, 3, 4, 16, 16)
    frames[:, :, :, 6:10, 5:9] = torch.rand(6, 3, 4, 4, 4)  # a blob well inside the frame
    assert torch.equal(jitter_pose_frames(frames, 0, torch.Generator().manual_seed(0)), frames)
    moved = jitter_pose_frames(frames, 2, torch.Generator().manual_seed(0))
    again = jitter_pose_frames(frames, 2, torch.Generator().manual_seed(0))
    assert torch.equal(moved, again) and moved.shape == frames.shape
    offsets = set()
    for i in range(6):
        found = None
        for dy, dx in itertools.product(range(-2, 3), repeat=2):
            if torch.equal(moved[i], torch.roll(frames[i], shifts=(dy, dx), dims=(-2, -1))):
                found = (dy, dx)
        assert found is not None, f"sample {i} is not a whole-frame shift of at most 2 pixels"
        offsets.add(found)
    assert len(offsets) > 1  # each sample draws its own shift
