"""The family registry: every family-specific fact comes from one ModelFamily, and a new family plugs in."""

from __future__ import annotations

import pytest

import lofa_core.families as families
from lofa_core.conditioning import ConditionSpec
from lofa_core.errors import ModelFamilyError
from lofa_core.families import build_catalog, family_names, family_of_module_paths, get_family, sdxl, wan
from lofa_core.families.spec import ModelFamily
from lofa_core.lora_keys import STYLE_COMFYUI, STYLE_KOHYA
from lofa_core.lora_metadata import file_metadata
from lofa_core.targets import Target, TargetCatalog

WAN_SHAPES = {"blocks.0.self_attn.q.weight": (8, 8), "blocks.0.cross_attn.q.weight": (8, 8),
              "patch_embedding.weight": (8, 16, 1, 2, 2), "head.modulation": (1, 2, 8)}


def test_names_and_aliases_reach_the_same_family():
    assert get_family("wan") is get_family("wan2.1-t2v") is wan.FAMILY
    assert get_family("sdxl") is sdxl.FAMILY
    assert set(family_names()) >= {"wan", "wan2.1-t2v", "sdxl"}
    with pytest.raises(ModelFamilyError, match=r"unknown model family 'flux'.*wan2\.1-t2v"):
        get_family("flux")


def test_each_family_answers_for_its_own_facts():
    assert wan.FAMILY.text_condition.length == 512 and wan.FAMILY.text_condition.token_dim == 4096
    assert sdxl.FAMILY.text_condition.pooled_dim == 1280 and sdxl.FAMILY.text_condition.length is None
    assert (wan.FAMILY.lora_key_style, sdxl.FAMILY.lora_key_style) == (STYLE_COMFYUI, STYLE_KOHYA)
    assert wan.FAMILY.latent_channels(WAN_SHAPES) == 16
    assert sdxl.FAMILY.latent_channels({"input_blocks.0.0.weight": (320, 4, 3, 3)}) == 4
    assert wan.FAMILY.modelspec("WAN 2.2 TI2V 5B")[0] == "wan2.2/lora"
    assert wan.FAMILY.modelspec("WAN 2.1 T2V 1.3B")[0] == "wan2.1/lora"
    assert wan.FAMILY.to_module_path("blocks.3.attn1.to_q") == "blocks.3.self_attn.q"


def test_a_lora_without_its_model_is_placed_by_its_paths():
    assert family_of_module_paths(["blocks.0.self_attn.q"]) is wan.FAMILY
    assert family_of_module_paths(["input_blocks.4.1.transformer_blocks.0.attn1.to_q"]) is sdxl.FAMILY
    assert family_of_module_paths(["something.else"]) is wan.FAMILY  # ComfyUI's generic names, as saved for WAN


def test_saved_file_metadata_comes_from_the_family():
    meta = file_metadata({}, family="sdxl", rank=4, key_style=STYLE_KOHYA, title="t")
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_a_new_family_is_one_module_in_the_registry(monkeypatch):
    """A toy family with its own keys: detected, catalogued, and its condition used, with no other code changed."""

    def build(rel, groups):
        targets = (Target("layers.0.attn.qkv", 8, 4, 0, 0),)
        return TargetCatalog("toy", ("attn.qkv",), 1, groups, targets, "a toy model")

    toy = ModelFamily(name="toy", aliases=("toy-1",), matches=lambda rel: "layers.0.attn.qkv.weight" in rel,
                      build_catalog=build, text_condition=ConditionSpec(token_dim=32, length=None),
                      lora_key_style=STYLE_COMFYUI, latent_channels_key="stem.weight",
                      signature_types=("attn.qkv", "attn.qkv"), owns_module_path=lambda p: p.startswith("layers."),
                      modelspec=lambda base: ("toy/lora", "https://example.invalid"))
    monkeypatch.setattr(families, "FAMILIES", (*families.FAMILIES, toy))
    catalog = build_catalog({"diffusion_model.layers.0.attn.qkv.weight": (8, 4)})
    assert catalog.family == "toy" and catalog.targets[0].key == "diffusion_model.layers.0.attn.qkv.weight"
    assert get_family("toy-1").text_condition.token_dim == 32
    assert family_of_module_paths(["layers.0.attn.qkv"]) is toy
    assert build_catalog(WAN_SHAPES).family == "wan2.1-t2v"  # the others are still found first
