"""SDXL end to end on the real (2024) ComfyUI: predict -> apply -> ComfyUI patches -> unpatch -> save -> reload."""

from __future__ import annotations

import pytest
import torch
from support.comfy_nodes import node, stock_training_node

from lofa_core.checkpoint import load_checkpoint, save_checkpoint
from lofa_core.conditioning import prepare_text_condition
from lofa_core.factory import SMALL, new_hypernet
from lofa_core.families import build_catalog
from lofa_core.families.sdxl import TEXT_CONDITION as SDXL_TEXT
from lofa_core.predict import predict
from training.untrained import randomise_lora_heads_

STRENGTH = 0.7


def sdxl_conditioning(seed: int = 0, chunks: int = 1):
    gen = torch.Generator().manual_seed(seed)
    cond = torch.randn(1, 77 * chunks, 2048, generator=gen)
    pooled = torch.randn(1, 1280, generator=gen)
    return [[cond, {"pooled_output": pooled}]]


def make_checkpoint(comfy, model, path, seed=0, **sizes):
    shapes = {k: tuple(v.shape) for k, v in model.model_state_dict(filter_prefix="diffusion_model.").items()}
    catalog = build_catalog(shapes)
    torch.manual_seed(seed)
    net = randomise_lora_heads_(new_hypernet(catalog, SDXL_TEXT, **(SMALL | sizes)), seed=seed)
    save_checkpoint(path, net, catalog, SDXL_TEXT, provenance={"trained": False, "source": "test"})
    return catalog


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


def expected_deltas(ckpt_path, catalog, weights, conditioning):
    """The LoRA computed directly with lofa_core (outside ComfyUI) from the same inputs."""
    ckpt = load_checkpoint(ckpt_path)
    cond = prepare_text_condition(conditioning[0][0], conditioning[0][1]["pooled_output"], SDXL_TEXT)
    pred = predict(ckpt, catalog.targets, lambda t: weights[t.key], cond, device=torch.device("cpu"),
                   dtype=torch.float32)
    return {f"diffusion_model.{p}.weight": f.delta() for p, f in pred.lora.factors.items()}


def run_nodes(comfy, model, ckpt_name, conditioning, **predict_args):
    (handle,) = node(comfy, "LoFAModelLoader").load(ckpt_name, "float32")
    args = dict(targets="all", rank=0, batch_size=8) | predict_args
    lora, response = node(comfy, "LoFAPredictLoRA").predict(model, handle, conditioning, **args)
    return lora, response


def test_predict_apply_patch_unpatch_exact(comfy, model_dirs):
    import comfy.model_management as mm

    model = comfy.tiny_sdxl.build_model(seed=0)
    before = snapshot(model)
    catalog = make_checkpoint(comfy, model, model_dirs.lofa / "tiny.safetensors")
    conditioning = sdxl_conditioning()
    lora, response = run_nodes(comfy, model, "tiny.safetensors", conditioning)
    # tiny UNet: 1+1 input, 1 middle, 2+2 output transformer blocks, 8 projections each
    assert len(response.maps) == len(catalog) == 7 * 8
    (patched,) = node(comfy, "LoFAApplyLoRA").apply(model, lora, STRENGTH)
    assert patched is not model and len(patched.patches) == len(catalog)
    assert not model.patches, "the input MODEL must stay unpatched"

    expected = expected_deltas(model_dirs.lofa / "tiny.safetensors", catalog, before, conditioning)
    assert max(d.abs().max().item() for d in expected.values()) > 1e-6, "the test LoRA must not be zero"
    mm.load_models_gpu([patched])
    try:
        after = {k: v.detach().clone() for k, v in model.model.state_dict().items()}
    finally:
        mm.unload_all_models()
    for key, w0 in before.items():
        if key in expected:
            torch.testing.assert_close(after[key], w0 + STRENGTH * expected[key], rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(after[key], w0), f"untargeted weight {key} changed"
    restored = model.model.state_dict()
    for key, w0 in before.items():
        assert torch.equal(restored[key], w0), f"{key} not restored bit-exactly after unpatching"


def test_saved_file_loads_in_stock_lora_loader(comfy, model_dirs):
    import comfy.model_management as mm

    model = comfy.tiny_sdxl.build_model(seed=1)
    before = snapshot(model)
    catalog = make_checkpoint(comfy, model, model_dirs.lofa / "tiny.safetensors", seed=1)
    conditioning = sdxl_conditioning(seed=1)
    lora, _ = run_nodes(comfy, model, "tiny.safetensors", conditioning)
    result = node(comfy, "LoFASaveLoRA").save(lora, "LoFA/test", "auto", "float32")
    (saved,) = result["ui"]["lofa_lora"]
    assert (model_dirs.loras / saved).is_file() and saved.endswith("test_0_steps_00001.safetensors")
    from safetensors.torch import load_file

    keys = load_file(model_dirs.loras / saved)
    assert all(k.startswith("lora_unet_") for k in keys), "SDXL files use kohya names (load on 2024 ComfyUI)"

    (stock,) = comfy.mappings["LoraLoaderModelOnly"]().load_lora_model_only(model, saved, STRENGTH)
    (ours,) = node(comfy, "LoFAApplyLoRA").apply(model, lora, STRENGTH)
    weights = {}
    for patcher in (stock, ours):
        mm.load_models_gpu([patcher])
        weights[id(patcher)] = {k: v.detach().clone() for k, v in model.model.state_dict().items()}
        mm.unload_all_models()
    expected = expected_deltas(model_dirs.lofa / "tiny.safetensors", catalog, before, conditioning)
    for key in expected:
        torch.testing.assert_close(weights[id(stock)][key], before[key] + STRENGTH * expected[key],
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(weights[id(stock)][key], weights[id(ours)][key], rtol=1e-5, atol=1e-6)

    second = node(comfy, "LoFASaveLoRA").save(lora, "LoFA/test", "auto", "float16")["ui"]["lofa_lora"][0]
    assert second.endswith("test_0_steps_00002.safetensors") and (model_dirs.loras / saved).is_file()


def test_average_of_two_lofa_models_patches_their_mean_update_and_saves_it(comfy, model_dirs):
    """LoFA Average LoRAs: the patched weight is W + strength * (dW_1 + dW_2) / 2 exactly, the saved file (rank of
    both) loads in ComfyUI's own LoRA loader to the same weights and names both checkpoints, and LoRAs for other
    layers are refused with the fix named."""
    import comfy.model_management as mm
    from safetensors import safe_open

    model = comfy.tiny_sdxl.build_model(seed=2)
    before = snapshot(model)
    conditioning = sdxl_conditioning(seed=2)
    names = ("member_a.safetensors", "member_b.safetensors")
    catalogs = [make_checkpoint(comfy, model, model_dirs.lofa / n, seed=10 + i) for i, n in enumerate(names)]
    loras = [run_nodes(comfy, model, n, conditioning)[0] for n in names]
    (mean,) = node(comfy, "LoFAAverageLoRAs").average(*loras)
    expected = [expected_deltas(model_dirs.lofa / n, c, before, conditioning) for n, c in zip(names, catalogs)]
    assert any(not torch.allclose(expected[0][k], expected[1][k]) for k in expected[0])  # two different models
    (ours,) = node(comfy, "LoFAApplyLoRA").apply(model, mean, STRENGTH)
    saved = node(comfy, "LoFASaveLoRA").save(mean, "LoFA/mean", "auto", "float32")["ui"]["lofa_lora"][0]
    (stock,) = comfy.mappings["LoraLoaderModelOnly"]().load_lora_model_only(model, saved, STRENGTH)
    for patcher in (ours, stock):
        mm.load_models_gpu([patcher])
        try:
            after = {k: v.detach().clone() for k, v in model.model.state_dict().items()}
        finally:
            mm.unload_all_models()
        for key, w0 in before.items():
            if key in expected[0]:
                mean_delta = (expected[0][key] + expected[1][key]) / 2
                torch.testing.assert_close(after[key], w0 + STRENGTH * mean_delta, rtol=1e-5, atol=1e-6)
            else:
                assert torch.equal(after[key], w0), f"untargeted weight {key} changed"
    with safe_open(str(model_dirs.loras / saved), "pt") as f:
        meta = f.metadata()
    assert meta["lofa.averaged_loras"] == "2" and meta["lofa.checkpoint"] == " + ".join(names)
    assert meta["modelspec.description"].startswith("The average of 2 LoRAs")
    partial = type(loras[1])({k: v for k, v in loras[1].items() if ".output_blocks." not in k})
    with pytest.raises(Exception, match="average only LoRAs of checkpoints trained for the same base model"):
        node(comfy, "LoFAAverageLoRAs").average(loras[0], partial)


def test_cancel_button_stops_prediction(comfy, model_dirs):
    import comfy.model_management as mm

    model = comfy.tiny_sdxl.build_model(seed=2)
    make_checkpoint(comfy, model, model_dirs.lofa / "tiny.safetensors", seed=2)
    (handle,) = node(comfy, "LoFAModelLoader").load("tiny.safetensors", "float32")
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            node(comfy, "LoFAPredictLoRA").predict(model, handle, sdxl_conditioning(), "all", 0, 1)
    finally:
        mm.interrupt_current_processing(False)


def test_lora_model_plugs_into_stock_lora_model_loader(comfy, model_dirs):
    """Current ComfyUI's own LoraModelLoader (LORA_MODEL input) applies the predicted LoRA identically."""
    import comfy.model_management as mm

    stock_node = stock_training_node(comfy, "LoraModelLoader")
    model = comfy.tiny_sdxl.build_model(seed=3)
    make_checkpoint(comfy, model, model_dirs.lofa / "tiny.safetensors", seed=3)
    lora, _ = run_nodes(comfy, model, "tiny.safetensors", sdxl_conditioning(seed=3))
    if hasattr(stock_node, "execute"):  # V3 node (newer ComfyUI)
        stock = stock_node.execute(model=model, lora=lora, strength_model=STRENGTH)[0]
    else:
        stock = getattr(stock_node(), stock_node.FUNCTION)(model, lora, STRENGTH)[0]
    (ours,) = node(comfy, "LoFAApplyLoRA").apply(model, lora, STRENGTH)
    weights = []
    for patcher in (stock, ours):
        mm.load_models_gpu([patcher])
        weights.append({k: v.detach().clone() for k, v in model.model.state_dict().items()})
        mm.unload_all_models()
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=1e-6, atol=1e-7)


def count_predictions(comfy, monkeypatch) -> list:
    """Empty the prediction cache; the returned list grows by one each time the hypernetwork really runs."""
    module = comfy.pack.nodes.predict
    comfy.pack.nodes.prediction_cache.clear()
    calls = []
    real = module.predict
    monkeypatch.setattr(module, "predict", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_predictions_are_reused_only_for_the_same_checkpoint_weights_and_prompt(comfy, model_dirs, monkeypatch):
    calls = count_predictions(comfy, monkeypatch)
    model = comfy.tiny_sdxl.build_model(seed=4)
    make_checkpoint(comfy, model, model_dirs.lofa / "tiny.safetensors", seed=4)
    first, _ = run_nodes(comfy, model, "tiny.safetensors", sdxl_conditioning(seed=5))
    again, _ = run_nodes(comfy, model.clone(), "tiny.safetensors", sdxl_conditioning(seed=5))  # equal content
    assert again is first and len(calls) == 1
    run_nodes(comfy, model, "tiny.safetensors", sdxl_conditioning(seed=6))  # another prompt
    other = comfy.tiny_sdxl.build_model(seed=7)  # another base model of the same shapes
    run_nodes(comfy, other, "tiny.safetensors", sdxl_conditioning(seed=5))
    run_nodes(comfy, model, "tiny.safetensors", sdxl_conditioning(seed=5), rank=2)  # other options
    assert len(calls) == 4


def test_prediction_cache_is_bounded_by_bytes_not_entries(comfy, model_dirs, monkeypatch):
    cache = comfy.pack.nodes.prediction_cache
    calls = count_predictions(comfy, monkeypatch)
    model = comfy.tiny_sdxl.build_model(seed=8)
    make_checkpoint(comfy, model, model_dirs.lofa / "tiny.safetensors", seed=8)
    lora, response = run_nodes(comfy, model, "tiny.safetensors", sdxl_conditioning(seed=20))
    storages = {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes()
                for v in [*lora.values(), *response.maps]}  # the maps of one chunk are views of one tensor
    size = cache.tensor_bytes((lora, response))
    assert size == sum(storages.values()) and size > sum(v.numel() * 4 for v in lora.values())

    monkeypatch.setenv("LOFA_PREDICTION_CACHE_MB", str(2.5 * size / 2**20))  # room for two predictions
    for seed in (21, 22, 23, 24):
        run_nodes(comfy, model, "tiny.safetensors", sdxl_conditioning(seed=seed))
        assert cache.total_bytes() <= 2.5 * size
    assert len(calls) == 5 and cache.total_bytes() == 2 * size
    run_nodes(comfy, model, "tiny.safetensors", sdxl_conditioning(seed=24))  # kept
    run_nodes(comfy, model, "tiny.safetensors", sdxl_conditioning(seed=23))  # kept
    assert len(calls) == 5
    run_nodes(comfy, model, "tiny.safetensors", sdxl_conditioning(seed=21))  # evicted: predicted again
    assert len(calls) == 6

    monkeypatch.setenv("LOFA_PREDICTION_CACHE_MB", "0")  # off
    run_nodes(comfy, model, "tiny.safetensors", sdxl_conditioning(seed=21))
    assert len(calls) == 7 and cache.total_bytes() == 0
