"""Base weights as users have them: read the way ComfyUI reads them (get_key_weight + convert function, the backup
when patches are merged), fp8_scaled WAN on current ComfyUI, GGUF-quantised layers (ComfyUI-GGUF's layout)."""

from __future__ import annotations

import sys

import pytest
import torch
from support import tiny_wan
from support.comfy_nodes import node, require_native_wan
from support.quantized import dequantised_fp8, fp8_scaled, quantize_linear_gguf_
from test_comfy_sdxl import make_checkpoint, sdxl_conditioning
from test_wan import wan_checkpoint, wan_conditioning

from training import tiny_models


def fresh_prediction(comfy, model, lofa_name, conditioning):
    """LoFA Predict LoRA without the reuse of an earlier result (each call really reads the base weights)."""
    comfy.pack.nodes.prediction_cache.clear()
    (handle,) = node(comfy, "LoFAModelLoader").load(lofa_name, "float32")
    lora, _ = node(comfy, "LoFAPredictLoRA").predict(model, handle, conditioning, "all", 0, 8)
    return lora


def assert_same_lora(a, b):
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_fp8_scaled_wan_gives_the_dequantised_weights(comfy, model_dirs):
    """An fp8_scaled WAN (a QuantizedTensor per layer on current ComfyUI) is read as fp8 value x scale, by design:
    ComfyUI's own convert function, not a fallback; the prediction equals the one on those float weights."""
    require_native_wan()
    import comfy.sd as comfy_sd
    import comfy.utils as comfy_utils

    base_weight = comfy.pack.nodes.comfy_compat.base_weight
    diffusers_model = tiny_models.build_tiny_wan(seed=6)
    sd = tiny_models.tiny_wan_state_dict(diffusers_model)
    reference = comfy_sd.load_diffusion_model_state_dict(dict(sd), model_options={"dtype": torch.float32})
    catalog = wan_checkpoint(reference, model_dirs.lofa / "wan.safetensors", seed=3)
    layers = [t.path for t in catalog.targets]
    quantized = fp8_scaled(sd, layers)
    fp8_model = comfy_sd.load_diffusion_model_state_dict(dict(quantized), model_options={})
    assert type(comfy_utils.get_attr(fp8_model.model, catalog.targets[0].key)).__name__ == "QuantizedTensor"
    errors = []
    for t in catalog.targets:
        weight = base_weight(fp8_model, t.key)
        assert weight.dtype == torch.float32 and weight.shape == t.shape
        torch.testing.assert_close(weight, dequantised_fp8(quantized, t.path), rtol=0, atol=0)
        original = sd[f"{t.path}.weight"]
        errors.append(((weight - original).abs().max() / original.abs().max()).item())
    assert 0 < max(errors) <= 2 ** -4, f"fp8 e4m3 keeps 3 mantissa bits; max error {max(errors):.4f} of max |W|"

    with torch.no_grad():
        for t in catalog.targets:  # the float model now holds exactly what the fp8 layers stand for
            comfy_utils.get_attr(reference.model, t.key).copy_(dequantised_fp8(quantized, t.path))
    conditioning = wan_conditioning(seed=2)
    assert_same_lora(fresh_prediction(comfy, fp8_model, "wan.safetensors", conditioning),
                     fresh_prediction(comfy, reference, "wan.safetensors", conditioning))


def test_merged_patches_are_read_from_the_backup(comfy, model_dirs):
    """After ComfyUI merged another LoRA into the loaded model, the base weights come from its backup."""
    import comfy.model_management as mm
    import comfy.utils as comfy_utils

    compat = comfy.pack.nodes.comfy_compat
    model = comfy.tiny_sdxl.build_model(seed=8)
    catalog = make_checkpoint(comfy, model, model_dirs.lofa / "m.safetensors", seed=8)
    original = {t.key: comfy_utils.get_attr(model.model, t.key).detach().clone() for t in catalog.targets}
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for t in catalog.targets:
        tensors[f"diffusion_model.{t.path}.lora_up.weight"] = torch.randn(t.out_features, 2, generator=gen)
        tensors[f"diffusion_model.{t.path}.lora_down.weight"] = torch.randn(2, t.in_features, generator=gen)
    patches = compat.lora_patches(tensors, [t.path for t in catalog.targets])
    other_lora = compat.add_patches_checked(model, patches, 0.5)
    conditioning = sdxl_conditioning(seed=3)
    unpatched = fresh_prediction(comfy, model, "m.safetensors", conditioning)
    mm.load_models_gpu([other_lora])
    try:
        key = catalog.targets[0].key
        assert not torch.equal(comfy_utils.get_attr(model.model, key), original[key]), "the LoRA must be merged"
        for t in catalog.targets:
            assert torch.equal(compat.base_weight(other_lora, t.key), original[t.key]), t.key
        assert_same_lora(fresh_prediction(comfy, other_lora, "m.safetensors", conditioning), unpatched)
    finally:
        mm.unload_all_models()


def gguf_wan(seed: int, qtype: str = "Q8_0"):
    """A tiny WAN whose attention layers are GGUF-quantised as ComfyUI-GGUF holds them, and a float twin holding
    the decoded values."""
    quantized, diffusers_model = tiny_wan.build_view_patcher(seed=seed)
    twin, twin_model = tiny_wan.build_view_patcher(seed=seed)
    twin_layers = dict(twin_model.named_modules())
    for name, module in diffusers_model.named_modules():
        if name.startswith("blocks.") and (".attn1.to_" in name or ".attn2.to_" in name) and hasattr(module, "weight"):
            decoded = quantize_linear_gguf_(module, qtype)
            with torch.no_grad():
                twin_layers[name].weight.copy_(decoded)
    return quantized, twin


def test_gguf_weights_are_decoded(comfy, model_dirs):
    quantized, twin = gguf_wan(seed=4)
    compat = comfy.pack.nodes.comfy_compat
    key = "diffusion_model.blocks.0.self_attn.q.weight"
    stored = quantized.model_state_dict(filter_prefix="diffusion_model.")[key]
    assert stored.shape != (128, 128), "the state dict only has the storage-shaped placeholder"
    assert compat.model_weight_shapes(quantized)[key] == (128, 128)
    assert torch.equal(compat.base_weight(quantized, key), compat.base_weight(twin, key))
    wan_checkpoint(twin, model_dirs.lofa / "wan.safetensors", seed=5)
    conditioning = wan_conditioning(seed=6)
    assert_same_lora(fresh_prediction(comfy, quantized, "wan.safetensors", conditioning),
                     fresh_prediction(comfy, twin, "wan.safetensors", conditioning))


def test_gguf_weights_without_a_decoder_get_a_clear_error(comfy, model_dirs, monkeypatch):
    quantized, twin = gguf_wan(seed=7, qtype="Q4_0")
    wan_checkpoint(twin, model_dirs.lofa / "wan.safetensors", seed=5)
    errors = comfy.pack.lofa_core.errors
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if the 'gguf' package were not installed
    with pytest.raises(errors.WeightError, match=r"'diffusion_model\.blocks\.0\.self_attn\.q\.weight' is "
                                                 r"GGUF-quantised \(Q4_0.*pip install gguf.*safetensors"):
        fresh_prediction(comfy, quantized, "wan.safetensors", wan_conditioning())
