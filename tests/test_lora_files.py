"""Saved LoRA files: what they say about themselves, and current ComfyUI's Train LoRA continuing from one."""

from __future__ import annotations

import hashlib
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from support.comfy_nodes import load_tiny_wan, node, require_native_wan, stock_training_node
from test_comfy_sdxl import make_checkpoint, sdxl_conditioning
from test_wan import wan_checkpoint, wan_conditioning

from lofa_core.lora_formats import read_lora_state_dict
from training import tiny_models


def file_metadata(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata()


def test_saved_lora_says_what_it_is(comfy, model_dirs):
    model = comfy.tiny_sdxl.build_model(seed=11)
    catalog = make_checkpoint(comfy, model, model_dirs.lofa / "identity.safetensors", seed=11)
    comfy.pack.nodes.prediction_cache.clear()
    (handle,) = node(comfy, "LoFAModelLoader").load("identity.safetensors", "float32")
    lora, _ = node(comfy, "LoFAPredictLoRA").predict(model, handle, sdxl_conditioning(seed=11), "all", 2, 8)
    saved = node(comfy, "LoFASaveLoRA").save(lora, "LoFA/face", "auto", "float32")["ui"]["lofa_lora"][0]
    assert saved == "LoFA/face_0_steps_00001.safetensors"
    meta = file_metadata(model_dirs.loras / saved)
    checkpoint_bytes = (model_dirs.lofa / "identity.safetensors").read_bytes()
    assert meta["lofa.checkpoint"] == "identity.safetensors"
    assert meta["lofa.checkpoint_sha256"] == hashlib.sha256(checkpoint_bytes).hexdigest()
    assert meta["lofa.base_model"].startswith("SDXL UNet (7 transformer blocks")
    assert meta["lofa.prompt_kind"] == "text" and len(meta["lofa.prompt_blake2b"]) == 32
    assert meta["lofa.rank"] == "2" and meta["lofa.strength_hint"] == "1.0" and meta["lofa.key_style"] == "kohya"
    assert meta["lofa.targets"] == f"all ({len(catalog)} layers)"
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert "identity.safetensors" in meta["modelspec.description"] and meta["modelspec.title"] == "face"
    other_prompt, _ = node(comfy, "LoFAPredictLoRA").predict(model, handle, sdxl_conditioning(seed=12), "all", 2, 8)
    assert other_prompt.metadata["lofa.prompt_blake2b"] != meta["lofa.prompt_blake2b"]

    tensors = load_file(model_dirs.loras / saved)
    assert {v.item() for k, v in tensors.items() if k.endswith(".alpha")} == {1.0}, "scale folded into the factors"
    factors, _ = read_lora_state_dict(lora, catalog.by_path())
    reread, leftovers = read_lora_state_dict(tensors, catalog.by_path())
    assert not leftovers and set(reread) == set(factors)
    for path, f in factors.items():
        delta = f.delta()
        torch.testing.assert_close(reread[path].delta(), delta, rtol=1e-5, atol=1e-6 * delta.abs().max().item())
        assert reread[path].up.norm().item() == pytest.approx(reread[path].down.norm().item(), rel=1e-4)


def test_train_lora_continues_from_a_saved_lofa_lora(comfy, model_dirs, unet_dir, monkeypatch):
    """Current ComfyUI's stock Train LoRA accepts the saved file as existing_lora (its name and key layout) and
    starts training from exactly the saved factors: its first weights are W + scale * B @ A as saved."""
    require_native_wan()
    train = stock_training_node(comfy, "TrainLoraNode")
    weights = tiny_models.tiny_wan_state_dict(tiny_models.build_tiny_wan(9))
    patcher = load_tiny_wan(comfy, weights, unet_dir, "wan.safetensors")
    catalog = wan_checkpoint(patcher, model_dirs.lofa / "wan.safetensors", seed=4)
    comfy.pack.nodes.prediction_cache.clear()
    (handle,) = node(comfy, "LoFAModelLoader").load("wan.safetensors", "float32")
    lora, _ = node(comfy, "LoFAPredictLoRA").predict(patcher, handle, wan_conditioning(seed=4), "all", 0, 8)
    saved = node(comfy, "LoFASaveLoRA").save(lora, "wan/lofa", "auto", "float32")["ui"]["lofa_lora"][0]
    file_sd = load_file(model_dirs.loras / saved)
    base = {k: v.detach().clone() for k, v in patcher.model.state_dict().items()}

    nodes_train = sys.modules[train.__module__]
    start = {}  # what Train LoRA's adapters hold before its first step, and the weights they make

    def capture(mp, existing_weights, *args, **kwargs):
        result = nodes_train_setup(mp, existing_weights, *args, **kwargs)
        lora_sd, adapters = result[0], result[1]
        start["params"] = {k: v.detach().clone() for k, v in lora_sd.items()}
        with torch.no_grad():
            for t in catalog.targets:
                up = lora_sd[f"{t.key[:-len('.weight')]}.lora_up.weight"]
                adapter = next(a for a in adapters if getattr(getattr(a, "lora_up", None), "weight", None) is up)
                start[t.key] = adapter(base[t.key].clone())
        return result

    nodes_train_setup = nodes_train._setup_lora_adapters
    monkeypatch.setattr(nodes_train, "_setup_lora_adapters", capture)
    latents = {"samples": torch.randn(1, 16, 1, 4, 4, generator=torch.Generator().manual_seed(0))}
    out = train.execute(
        model=[patcher], latents=[latents], positive=[wan_conditioning(seed=4)], batch_size=[1], steps=[1],
        grad_accumulation_steps=[1], learning_rate=[1e-7], rank=[8], optimizer=["SGD"], loss_function=["MSE"],
        seed=[0], training_dtype=["fp32"], lora_dtype=["fp32"], quantized_backward=[False], algorithm=["LoRA"],
        gradient_checkpointing=[False], checkpoint_depth=[1], offloading=[False], existing_lora=[saved],
        bucket_mode=[False], bypass_mode=[False])
    trained, loss_map, steps = out.args if hasattr(out, "args") else out
    assert steps == 1, "existing_lora's step count (0, from the file name) plus the one step trained"
    assert len(loss_map["loss"]) == 1 and torch.isfinite(torch.tensor(loss_map["loss"])).all()

    factors, _ = read_lora_state_dict(lora, catalog.by_path())
    for t in catalog.targets:
        name = t.key[: -len(".weight")]
        for part in ("lora_up.weight", "lora_down.weight"):
            assert torch.equal(start["params"][f"{name}.{part}"], file_sd[f"{name}.{part}"]), f"{name}.{part}"
        assert start["params"][f"{name}.alpha"].item() == file_sd[f"{name}.alpha"].item() == 1.0
        # float32 rounding of W + dW, dW's own matmul included (its summation order depends on the BLAS kernel)
        f = factors[t.path]
        dw_bound = abs(f.scale) * (f.up.float().abs() @ f.down.float().abs())
        noise = 4 * torch.finfo(torch.float32).eps * (base[t.key].abs().max() + f.rank * dw_bound.max()).item()
        torch.testing.assert_close(start[t.key], base[t.key] + factors[t.path].delta(), rtol=1e-5, atol=noise)
        assert f"{name}.lora_up.weight" in trained
