"""The right base model: a checkpoint records a value signature of the model it was trained on, and Predict
refuses (or warns about) a MODEL with the same layers and shapes but other weights, naming both models."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from safetensors.torch import save_file
from support import tiny_wan
from support.comfy_nodes import load_tiny_wan, node
from support.quantized import fp8_scaled
from test_wan import wan_conditioning

from lofa_core import base_signature
from lofa_core.checkpoint import load_checkpoint, save_checkpoint
from lofa_core.factory import SMALL, new_hypernet
from lofa_core.families import build_catalog
from lofa_core.families.wan import TEXT_CONDITION as WAN_TEXT
from training import tiny_models
from training.untrained import randomise_lora_heads_

TRAINED_ON = "wan2.1_t2v_14B_bf16.safetensors (WAN 2.1 T2V 14B)"


def tiny_wan_weights(seed: int) -> dict[str, torch.Tensor]:
    return tiny_models.tiny_wan_state_dict(tiny_models.build_tiny_wan(seed))


def signed_checkpoint(path, sd: dict[str, torch.Tensor], name: str = TRAINED_ON):
    catalog = build_catalog({k: tuple(v.shape) for k, v in sd.items()})
    signature = base_signature.compute(catalog, lambda t: sd[f"{t.path}.weight"], name)
    torch.manual_seed(0)
    net = randomise_lora_heads_(new_hypernet(catalog, WAN_TEXT, **SMALL), seed=0)
    save_checkpoint(path, net, catalog, WAN_TEXT, provenance={"trained": False}, base_signature=signature)
    return catalog, signature


def test_signature_tells_copies_from_other_models(tmp_path):
    base = tiny_wan_weights(seed=1)
    catalog, signature = signed_checkpoint(tmp_path / "m.safetensors", base)
    assert load_checkpoint(tmp_path / "m.safetensors").base_signature == signature
    assert len(signature.samples) == 4, "2 blocks: first/middle/last depth collapse to 2, times 2 layer types"

    def distance_to(sd):
        return base_signature.distance(signature, catalog, lambda t: sd[f"{t.path}.weight"].float())

    layers = [t.path for t in catalog.targets]
    fp8 = fp8_scaled(base, layers)
    dequantised = {f"{p}.weight": fp8[f"{p}.weight"].float() * fp8[f"{p}.scale_weight"] for p in layers}
    assert distance_to(base) == 0
    assert distance_to({k: v.half() for k, v in base.items()}) < 0.002
    assert 0.005 < distance_to(dequantised) < base_signature.SAME_MODEL_TOLERANCE / 2
    other = tiny_wan_weights(seed=2)  # same layers and shapes, other weights (another model)
    assert distance_to(other) > 1.0


def test_predict_refuses_another_model_with_the_same_shapes(comfy, model_dirs, unet_dir, caplog):
    base = tiny_wan_weights(seed=1)
    signed_checkpoint(model_dirs.lofa / "lofa_14b.safetensors", base)
    (handle,) = node(comfy, "LoFAModelLoader").load("lofa_14b.safetensors", "float32")
    predict = node(comfy, "LoFAPredictLoRA").predict
    comfy.pack.nodes.prediction_cache.clear()

    expert = load_tiny_wan(comfy, tiny_wan_weights(seed=2), unet_dir, "wan2.2_t2v_low_noise_14B_fp16.safetensors")
    model_name = ("wan2.2_t2v_low_noise_14B_fp16.safetensors, WAN 2.1 T2V" if tiny_wan.native_available()
                  else "WAN 2.1 T2V")
    errors = comfy.pack.lofa_core.errors
    with pytest.raises(errors.ModelFamilyError, match=rf"trained on {re.escape(TRAINED_ON)}, but this MODEL "
                                                      rf"\({model_name} \(2 blocks, dim 128\)\) has other weights.*"
                                                      rf"differ .* by 1\d\d%.*base_model_check to 'warn'"):
        predict(expert, handle, wan_conditioning(), "all", 0, 8)
    with caplog.at_level(logging.WARNING, logger="ComfyUI-LoFA"):
        lora, _ = predict(expert, handle, wan_conditioning(), "all", 0, 8, base_model_check="warn")
    assert lora and "has other weights" in caplog.text and "Predicting anyway" in caplog.text

    same = load_tiny_wan(comfy, base, unet_dir, "wan2.1_t2v_14B_bf16.safetensors")
    assert predict(same, handle, wan_conditioning(), "all", 0, 8)[0]


def test_predict_accepts_the_same_model_stored_as_fp8_scaled(comfy, model_dirs, unet_dir):
    """What most WAN 14B users download: the fp8_scaled file of the model the checkpoint was trained on."""
    from support.comfy_nodes import require_native_wan

    require_native_wan()
    base = tiny_wan_weights(seed=1)
    catalog, _ = signed_checkpoint(model_dirs.lofa / "lofa_14b.safetensors", base)
    quantized = fp8_scaled(base, [t.path for t in catalog.targets])
    save_file(quantized, str(unet_dir / "wan2.1_t2v_14B_fp8_scaled.safetensors"))
    model = comfy.mappings["UNETLoader"]().load_unet("wan2.1_t2v_14B_fp8_scaled.safetensors", "default")[0]
    (handle,) = node(comfy, "LoFAModelLoader").load("lofa_14b.safetensors", "float32")
    lora, _ = node(comfy, "LoFAPredictLoRA").predict(model, handle, wan_conditioning(), "all", 0, 8)
    assert len([k for k in lora if k.endswith(".alpha")]) == len(catalog)


def test_training_export_signs_the_base_model(tmp_path):
    from training.runs import export

    base = tiny_wan_weights(seed=3)
    catalog = build_catalog({k: tuple(v.shape) for k, v in base.items()})
    weights = {t.path: base[f"{t.path}.weight"] for t in catalog.targets}
    net = new_hypernet(catalog, WAN_TEXT, **SMALL)
    out = export(tmp_path / "lofa.safetensors", net.stage1, net.stage2, catalog, WAN_TEXT, 0.02,
                 {"base_model": "tiny_wan.safetensors"}, weights)
    signature = load_checkpoint(out).base_signature
    assert signature.name == "tiny_wan.safetensors (WAN 2.1 T2V (2 blocks, dim 128))"
    assert base_signature.distance(signature, catalog, lambda t: weights[t.path]) == 0


def test_wan_image_to_video_keeps_its_clear_refusal(comfy, model_dirs, unet_dir):
    """A WAN 2.1 I2V model (k_img/v_img, img_emb) loaded by the stock loader: no LoRA, a message naming the fix."""
    from support.comfy_nodes import require_native_wan

    require_native_wan()
    import comfy.ops as comfy_ops
    from comfy.ldm.wan.model import WanModel

    from training.tiny_models import fill_random_

    i2v = WanModel(model_type="i2v", in_dim=36, dim=128, ffn_dim=256, num_heads=1, num_layers=2,
                   operations=comfy_ops.disable_weight_init)
    sd = fill_random_(i2v).state_dict()
    assert "blocks.0.cross_attn.k_img.weight" in sd and "img_emb.proj.0.bias" in sd
    save_file({k: v.contiguous() for k, v in sd.items()}, str(unet_dir / "wan2.1_i2v_480p_tiny.safetensors"))
    model = comfy.mappings["UNETLoader"]().load_unet("wan2.1_i2v_480p_tiny.safetensors", "default")[0]
    signed_checkpoint(model_dirs.lofa / "t2v.safetensors", tiny_wan_weights(seed=1))
    (handle,) = node(comfy, "LoFAModelLoader").load("t2v.safetensors", "float32")
    with pytest.raises(comfy.pack.lofa_core.errors.ModelFamilyError,
                       match="WAN 2.1 image-to-video model.*text-to-video; load the T2V model"):
        node(comfy, "LoFAPredictLoRA").predict(model, handle, wan_conditioning(), "all", 0, 8)
