"""Training data: dataset validation, condition encoding identical to ComfyUI's, base models through diffusers."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from lofa_core.conditioning import prepare_text_condition
from lofa_core.families.sdxl import TEXT_CONDITION as SDXL_TEXT
from lofa_core.families.wan import TEXT_CONDITION as WAN_TEXT
from lofa_core.families.wan import comfy_to_diffusers_key
from training import tiny_models
from training.base_models import load_base_model, load_state_dict
from training.dataset import DatasetError, check_dataset
from training.encoding import SDXLClipTextEncoder
from training.runs import base_catalog


@pytest.fixture(scope="module")
def wan_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan_base")
    model = tiny_models.build_tiny_wan(seed=4)
    path = folder / "tiny_wan.safetensors"
    save_file(tiny_models.tiny_wan_state_dict(model), path)
    return path, model


def test_wan_file_loads_into_diffusers_with_targets_mapped(wan_base):
    path, reference = wan_base
    base = load_base_model(path)
    assert base.family == "wan2.1-t2v" and len(base.catalog) == 16
    ours = base.model.state_dict()
    for key, value in reference.state_dict().items():
        assert torch.equal(ours[key], value), key
    comfy_sd = load_state_dict(path)
    for t in base.catalog.targets:  # every ComfyUI-named target is the matching diffusers Linear
        assert torch.equal(base.modules[t.path].weight, comfy_sd[f"{t.path}.weight"])
        assert comfy_to_diffusers_key(t.path + ".weight").startswith("blocks.")


def _write_lora(path, paths_shapes, naming="comfyui", nan=False, rank=2):
    sd = {}
    for p, (o, i) in paths_shapes.items():
        up, down = torch.randn(o, rank) * 0.01, torch.randn(rank, i) * 0.01
        if nan:
            up[0, 0] = float("nan")
        if naming == "comfyui":
            sd |= {f"diffusion_model.{p}.lora_up.weight": up, f"diffusion_model.{p}.lora_down.weight": down,
                   f"diffusion_model.{p}.alpha": torch.tensor(float(rank))}
        else:  # diffusers / PEFT: transformer.blocks.N.attn1.to_q.lora_A.weight
            name = "transformer." + comfy_to_diffusers_key(p + ".weight")[:-len(".weight")]
            sd |= {f"{name}.lora_B.weight": up, f"{name}.lora_A.weight": down}
    save_file(sd, path)


def test_dataset_validation_names_every_bad_sample(wan_base, tmp_path):
    path, _ = wan_base
    catalog, _ = base_catalog(path, ("attn",))
    shapes = {t.path: t.shape for t in catalog.targets}
    (tmp_path / "loras").mkdir()
    (tmp_path / "conditions").mkdir()
    save_file({"tokens": torch.randn(6, 4096)}, tmp_path / "conditions" / "ok.safetensors")
    save_file({"tokens": torch.randn(6, 2048)}, tmp_path / "conditions" / "sdxl.safetensors")
    _write_lora(tmp_path / "loras" / "good.safetensors", shapes)
    _write_lora(tmp_path / "loras" / "peft.safetensors", shapes, naming="peft", rank=3)
    _write_lora(tmp_path / "loras" / "nan.safetensors", shapes, nan=True)
    _write_lora(tmp_path / "loras" / "other.safetensors", {p: (64, 64) for p in shapes})
    _write_lora(tmp_path / "loras" / "partial.safetensors", dict(list(shapes.items())[:3]))
    ok = {"kind": "text", "embedding": "conditions/ok.safetensors"}
    records = [
        {"id": "good", "lora": "loras/good.safetensors", "condition": ok},
        {"id": "peft", "lora": "loras/peft.safetensors", "condition": ok, "split": "val"},
        {"id": "nan", "lora": "loras/nan.safetensors", "condition": ok},
        {"id": "other", "lora": "loras/other.safetensors", "condition": ok},
        {"id": "partial", "lora": "loras/partial.safetensors", "condition": ok},
        {"id": "gone", "lora": "loras/gone.safetensors", "condition": ok},
        {"id": "noemb", "lora": "loras/good.safetensors", "condition": {"kind": "text", "prompt": "a jump"}},
        {"id": "width", "lora": "loras/good.safetensors", "condition": {"kind": "text",
                                                                          "embedding": "conditions/sdxl.safetensors"}},
        {"id": "pose", "lora": "loras/good.safetensors", "condition": {"kind": "pose", "frames": "x"}},
        {"id": "good", "lora": "loras/good.safetensors", "condition": ok, "split": "holdout"},
    ]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(DatasetError) as err:
        check_dataset(tmp_path, catalog, WAN_TEXT)
    message = str(err.value)
    for expected in ["'nan'", "NaN", "'other'", "64x64", "'partial'", "no LoRA for 13 of the 16", "'gone'",
                     "is missing", "'noemb'", "python -m training encode", "'width'", "4096-wide", "'pose'",
                     "kind 'pose'", "record 10", "also used by record 1", "'holdout'"]:
        assert expected in message, expected
    assert "sample 'good' (record 1)" not in message and "'peft'" not in message  # valid samples are not listed
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:2]))
    samples = check_dataset(tmp_path, catalog, WAN_TEXT)
    assert [s.split for s in samples] == ["train", "val"]


def test_sdxl_prompt_cache_equals_comfyui_conditioning(comfy, tmp_path):
    """Encoding with transformers from local folders gives exactly ComfyUI's SDXL CONDITIONING."""
    clip = comfy.tiny_sdxl.build_clip(seed=3)
    folder = comfy.tiny_sdxl.export_text_encoders(clip, tmp_path / "te")
    encoder = SDXLClipTextEncoder(folder)
    for prompt in ("a vivid rings pattern , bold", "portrait of a woman with red hair"):
        tokens, pooled = encoder.encode(prompt)
        cond, comfy_pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
        torch.testing.assert_close(tokens, cond[0].float(), rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(pooled, comfy_pooled[0].float(), rtol=2e-3, atol=2e-3)
        prepared = prepare_text_condition(tokens, pooled, SDXL_TEXT)
        assert prepared.tokens.shape == (77, 2048) and prepared.pooled.shape == (1280,)


def test_sdxl_checkpoint_runs_in_diffusers_like_in_comfyui(comfy, tmp_path):
    """The tiny SDXL checkpoint through diffusers' UNet2DConditionModel gives ComfyUI's own UNet output."""
    path = comfy.tiny_sdxl.save_checkpoint(tmp_path / "tiny_sdxl.safetensors", seed=6)
    base = load_base_model(path)
    assert base.family == "sdxl" and len(base.catalog) == 56
    patcher = comfy.tiny_sdxl.build_model(seed=6)
    gen = torch.Generator().manual_seed(0)
    x, context, pooled = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 2048, generator=gen), \
        torch.randn(2, 1280, generator=gen)
    t = torch.tensor([10.0, 700.0])
    model = patcher.model
    adm = model.encode_adm(pooled_output=pooled, width=1024, height=1024, crop_w=0, crop_h=0, target_width=1024,
                           target_height=1024)
    with torch.no_grad():
        theirs = model.diffusion_model(x, t, context=context, y=adm)
        time_ids = torch.tensor(base.TIME_IDS).expand(2, -1)
        ours = base.model(x, t, encoder_hidden_states=context,
                          added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}, return_dict=False)[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    for tgt in base.catalog.targets:
        assert torch.equal(base.modules[tgt.path].weight, model.state_dict()[tgt.key])


@pytest.mark.parametrize("name,kind", [("build_wan21_1.3b", "BuildConfig"), ("stage1_wan21_1.3b", "Stage1Config"),
                                       ("stage2_wan21_1.3b", "Stage2Config")])
def test_shipped_configs_parse(name, kind):
    from training import config

    cfg = config.load_config(getattr(config, kind), config_path(name), ["steps=5"])
    assert cfg.steps == 5
    with pytest.raises(SystemExit, match="unknown"):
        config.load_config(getattr(config, kind), config_path(name), ["stepz=5"])


def config_path(name: str):
    from pathlib import Path

    return Path(__file__).resolve().parent.parent / "training" / "configs" / f"{name}.yaml"


def test_collapsed_padding_cross_attention_is_exact(wan_base):
    """The base model attends to WAN's zero padding as one key (log-count bias): same output as diffusers'
    own processor on the full [B, 512, 4096] prompts, for prompts of different lengths in one batch."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    from training.base_models import as_captions

    path, _ = wan_base
    base = load_base_model(path)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.zeros(3, 512, 4096)
    for row, length in enumerate((5, 9, 2)):
        tokens[row, :length] = torch.randn(length, 4096, generator=gen)
    x, t = torch.randn(3, 16, 2, 8, 8, generator=gen), torch.tensor([100.0, 500.0, 900.0])
    captions = as_captions(tokens)
    assert captions.tokens.shape[1] == 10 and captions.log_padding == pytest.approx(math.log(503))
    with torch.no_grad():
        ours = base.forward(x, t, captions)
        for block in base.model.blocks:
            block.attn2.set_processor(WanAttnProcessor())
        stock = base.model(hidden_states=x, timestep=t, encoder_hidden_states=tokens, return_dict=False)[0]
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)


def test_pretrained_base_saves_like_its_source(wan_base, tmp_path):
    """A base model trained further is written with the source file's keys and loads back identically."""
    path, _ = wan_base
    base = load_base_model(path)
    with torch.no_grad():
        for p in base.model.parameters():
            p.add_(0.01)
    out = base.save_like(path, tmp_path / "trained.safetensors")
    assert load_state_dict(out).keys() == load_state_dict(path).keys()
    again = load_base_model(out)
    for key, value in base.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[key], value), key


def test_trained_sdxl_base_loads_in_comfyui_with_its_new_weights(comfy, tmp_path):
    """A tiny SDXL checkpoint trained further in diffusers is written back under ComfyUI's key names (text
    encoders and VAE kept) and ComfyUI's own checkpoint loader reads exactly the trained UNet weights."""
    from comfy.sd import load_checkpoint_guess_config

    path = comfy.tiny_sdxl.save_checkpoint(tmp_path / "tiny_sdxl.safetensors", seed=7)
    base = load_base_model(path)
    with torch.no_grad():
        for p in base.model.parameters():
            p.add_(0.01)
    out = base.save_like(path, tmp_path / "trained.safetensors")
    with torch.no_grad():  # as ComfyUI runs its loaders
        patcher, clip, vae, _ = load_checkpoint_guess_config(str(out), output_vae=True, output_clip=True)
    assert clip is not None and vae is not None
    loaded = patcher.model.diffusion_model.state_dict()
    for key, value in base.comfy_state_dict().items():
        assert torch.equal(loaded[key].float(), value.float()), key


def test_sdxl_cross_attention_shares_each_captions_keys_exactly(comfy, tmp_path):
    """With each caption repeated over consecutive rows (one LoRA per caption, as when LoRAs of several tasks
    train in one batch), keys and values computed once per caption give diffusers' own result."""
    from training.base_models import make_captions
    from training.injection import inject

    base = load_base_model(comfy.tiny_sdxl.save_checkpoint(tmp_path / "tiny_sdxl.safetensors", seed=8))
    gen = torch.Generator().manual_seed(2)
    contexts, pooled = [torch.randn(77, 2048, generator=gen) for _ in range(2)], [torch.randn(1280) for _ in range(2)]
    latents = torch.randn(6, 4, 8, 8, generator=gen)
    factors = {p: (torch.randn(2, 3, m.weight.shape[1], generator=gen) * 0.05,
                   torch.randn(2, m.weight.shape[0], 3, generator=gen) * 0.05, torch.ones(2))
               for p, m in base.modules.items()}
    shared = make_captions(contexts, pooled, repeat=3)
    assert shared.repeat == 3
    with torch.no_grad(), inject(base.modules, factors):
        ours = base.diffusion_loss(latents, shared, None, torch.Generator().manual_seed(0), reduce=False)
        stock = base.diffusion_loss(latents, shared.tokens, shared.pooled, torch.Generator().manual_seed(0),
                                    reduce=False)  # plain tensors: one caption per row, diffusers' processor
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-6)


def test_inject_deltas_adds_the_dense_update_exactly_and_only_inside_the_block():
    from torch import nn

    from training.injection import inject_deltas

    layer, x, delta = nn.Linear(4, 3), torch.randn(2, 4), torch.randn(3, 4)
    plain = layer(x)
    with inject_deltas({"a": layer}, {"a": delta}):
        patched = layer(x)
    assert torch.allclose(patched, plain + x @ delta.T) and torch.equal(layer(x), plain)
    with pytest.raises(KeyError, match="no base-model module for LoRA targets"):
        with inject_deltas({"a": layer}, {"b": delta}):
            pass
