"""WAN 2.1 T2V: target catalogs from WAN's real key names and shapes, and a tiny WAN patched by ComfyUI."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from support import tiny_wan
from support.comfy_nodes import node

from lofa_core.checkpoint import save_checkpoint
from lofa_core.factory import SMALL, new_hypernet
from lofa_core.families import build_catalog
from lofa_core.families.wan import ATTENTION_TYPES, comfy_to_diffusers_key, diffusers_to_comfy_key
from lofa_core.families.wan import TEXT_CONDITION as WAN_TEXT
from lofa_core.lora_formats import read_lora_state_dict
from lofa_core.targets import GROUP_ATTENTION, GROUP_FFN
from training import tiny_models
from training.untrained import randomise_lora_heads_

OFFICIAL = {"1.3B": dict(dim=1536, heads=12, ffn_dim=8960, num_layers=30),
            "14B": dict(dim=5120, heads=40, ffn_dim=13824, num_layers=40)}


def wan_key_shapes(size: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a real-size WAN 2.1 T2V, built on the meta device and named the ComfyUI way."""
    with torch.device("meta"):
        model = _meta_diffusers(**OFFICIAL[size])
    return {"diffusion_model." + diffusers_to_comfy_key(k): tuple(v.shape) for k, v in model.state_dict().items()}


def _meta_diffusers(dim, heads, ffn_dim, num_layers):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=dim // heads,
                                 in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=ffn_dim,
                                 num_layers=num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads")


@pytest.mark.parametrize("size,dim,blocks", [("1.3B", 1536, 30), ("14B", 5120, 40)])
def test_catalog_of_real_wan_sizes(size, dim, blocks):
    shapes = wan_key_shapes(size)
    assert shapes["diffusion_model.blocks.0.self_attn.q.weight"] == (dim, dim)
    assert shapes["diffusion_model.text_embedding.0.weight"] == (dim, 4096)
    assert shapes["diffusion_model.head.modulation"] == (1, 2, dim)
    catalog = build_catalog(shapes)
    assert catalog.family == "wan2.1-t2v" and size in catalog.describe()
    assert len(catalog) == 8 * blocks and catalog.num_depths == blocks
    assert catalog.type_names == ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                                  "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o")
    for i, t in enumerate(catalog.targets):  # depth-major, authors' VALID_LAYERS type order
        assert (t.depth, t.type_index) == divmod(i, 8)
        assert t.key == f"diffusion_model.blocks.{t.depth}.{ATTENTION_TYPES[t.type_index]}.weight"
        assert t.shape == (dim, dim) and t.key in shapes
    with_ffn = build_catalog(shapes, groups=(GROUP_ATTENTION, GROUP_FFN))
    assert len(with_ffn) == 10 * blocks
    ffn0 = with_ffn.by_path()["blocks.0.ffn.0"]
    assert ffn0.shape == (OFFICIAL[size]["ffn_dim"], dim) and ffn0.type_index == 8
    assert with_ffn.by_path()["blocks.0.ffn.2"].shape == (dim, OFFICIAL[size]["ffn_dim"])


def test_key_mapping_round_trips_every_key():
    model = tiny_models.build_tiny_wan(0)
    for key in model.state_dict():
        assert comfy_to_diffusers_key(diffusers_to_comfy_key(key)) == key
    view = tiny_wan.ComfyWanView(model)
    assert set(view.state_dict()) == set(tiny_models.tiny_wan_state_dict(model)), "view and key map must agree"


def wan_conditioning(real_tokens: int = 20, seed: int = 0):
    """ComfyUI's WAN CONDITIONING: [1, max(512, n+1), 4096], exact zeros after the prompt's EOS."""
    gen = torch.Generator().manual_seed(seed)
    cond = torch.zeros(1, max(512, real_tokens + 1), 4096)
    cond[0, :real_tokens] = torch.randn(real_tokens, 4096, generator=gen)
    return [[cond, {"pooled_output": None}]]


def wan_checkpoint(model_patcher, path, seed=0):
    shapes = {k: tuple(v.shape) for k, v in model_patcher.model_state_dict(filter_prefix="diffusion_model.").items()}
    catalog = build_catalog(shapes)
    torch.manual_seed(seed)
    net = randomise_lora_heads_(new_hypernet(catalog, WAN_TEXT, **SMALL), seed=seed)
    save_checkpoint(path, net, catalog, WAN_TEXT, provenance={"trained": False})
    return catalog


def test_tiny_wan_patched_by_model_patcher(comfy, model_dirs):
    import comfy.model_management as mm

    patcher, diffusers_model = tiny_wan.build_view_patcher(seed=3)
    before = {k: v.detach().clone() for k, v in patcher.model.state_dict().items()}
    base_out = tiny_wan.diffusers_forward(diffusers_model)
    catalog = wan_checkpoint(patcher, model_dirs.lofa / "wan.safetensors")
    assert len(catalog) == 16
    (handle,) = node(comfy, "LoFAModelLoader").load("wan.safetensors", "float32")
    lora, _ = node(comfy, "LoFAPredictLoRA").predict(patcher, handle, wan_conditioning(), "all", 0, 4)
    (patched,) = node(comfy, "LoFAApplyLoRA").apply(patcher, lora, 0.5)
    factors, leftovers = read_lora_state_dict(lora, catalog.by_path())
    assert not leftovers and len(factors) == 16
    mm.load_models_gpu([patched])
    try:
        patched_out = tiny_wan.diffusers_forward(diffusers_model)
        after = {k: v.detach().clone() for k, v in patcher.model.state_dict().items()}
    finally:
        mm.unload_all_models()
    for key, w0 in before.items():
        path = key[len("diffusion_model."):-len(".weight")]
        if path in factors:
            torch.testing.assert_close(after[key], w0 + 0.5 * factors[path].delta(), rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(after[key], w0), key
    assert not torch.allclose(patched_out, base_out), "the diffusers forward must see the patched weights"
    torch.testing.assert_close(tiny_wan.diffusers_forward(diffusers_model), base_out, rtol=0, atol=0)

    saved = node(comfy, "LoFASaveLoRA").save(lora, "wan/lofa", "auto", "float32")["ui"]["lofa_lora"][0]
    file_sd = load_file(model_dirs.loras / saved)
    assert "diffusion_model.blocks.0.self_attn.q.lora_up.weight" in file_sd
    assert "diffusion_model.blocks.1.cross_attn.o.alpha" in file_sd
    reread, leftovers = read_lora_state_dict(file_sd, catalog.by_path())
    assert not leftovers
    for path, f in factors.items():  # the file folds the scale into the factors: float32 rounding only
        delta = f.delta()
        torch.testing.assert_close(reread[path].delta(), delta, rtol=1e-5, atol=1e-5 * delta.abs().max().item())


def test_key_mapping_matches_comfy_wan_numerically(native_wan):
    patcher, diffusers_model = native_wan
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 1, 4, 4, generator=gen)
    context = torch.randn(1, 8, 4096, generator=gen)
    with torch.no_grad():
        ours = diffusers_model(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=context,
                               return_dict=False)[0]
        theirs = patcher.model.diffusion_model(x, torch.tensor([500.0]), context)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def test_wan_file_loads_in_stock_loader_on_native_wan(comfy, model_dirs, native_wan):
    import comfy.model_management as mm

    patcher, _ = native_wan
    before = {k: v.detach().clone() for k, v in patcher.model.state_dict().items()}
    catalog = wan_checkpoint(patcher, model_dirs.lofa / "wan.safetensors", seed=2)
    (handle,) = node(comfy, "LoFAModelLoader").load("wan.safetensors", "float32")
    lora, _ = node(comfy, "LoFAPredictLoRA").predict(patcher, handle, wan_conditioning(), "all", 0, 8)
    saved = node(comfy, "LoFASaveLoRA").save(lora, "wan/lofa", "auto", "float32")["ui"]["lofa_lora"][0]
    (stock,) = comfy.mappings["LoraLoaderModelOnly"]().load_lora_model_only(patcher, saved, 1.0)
    mm.load_models_gpu([stock])
    after = {k: v.detach().clone() for k, v in patcher.model.state_dict().items()}
    mm.unload_all_models()
    factors, _ = read_lora_state_dict(lora, catalog.by_path())
    for path, f in factors.items():
        key = f"diffusion_model.{path}.weight"
        torch.testing.assert_close(after[key], before[key] + f.delta(), rtol=1e-5, atol=1e-6)
