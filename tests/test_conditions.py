"""Image and pose prompts next to text: preparation, encoders, checkpoints, nodes, and ComfyUI equivalence."""

from __future__ import annotations

import pytest
import torch
from support.comfy_nodes import node
from test_comfy_sdxl import sdxl_conditioning

from lofa_core.checkpoint import load_checkpoint, save_checkpoint
from lofa_core.conditioning import (
    image_spec,
    pose_spec,
    prepare_condition,
    prepare_image_condition,
    prepare_pose_condition,
)
from lofa_core.errors import CheckpointError, ConditionError
from lofa_core.factory import SMALL, new_hypernet
from lofa_core.families import build_catalog
from lofa_core.families.sdxl import TEXT_CONDITION as SDXL_TEXT
from lofa_core.families.wan import TEXT_CONDITION as WAN_TEXT
from lofa_core.hypernet_encoders import MixedImageProjector
from lofa_core.predict import predict
from training.untrained import randomise_lora_heads_


def test_pose_frames_any_count_and_size_are_resampled_and_letterboxed():
    spec = pose_spec(frames=8, frame_size=32)
    video = torch.zeros(20, 48, 96, 3)
    video[:, :, :, 0] = torch.arange(20).view(20, 1, 1) / 19  # red channel = time
    cond = prepare_pose_condition(video, spec)
    assert cond.tokens.shape == (3, 8, 32, 32) and cond.kind == "pose"
    red = cond.tokens[0, :, 16, 16]
    assert torch.all(red[1:] >= red[:-1]) and red[0] == 0 and abs(red[-1] - 1) < 1e-3  # first to last frame
    assert cond.tokens[0, 0, :4].abs().max() < 1e-6, "a 48x96 frame gets black bars above and below"
    assert cond.tokens[0, 3, 16].min() > 0.1, "the picture itself fills the middle rows"
    assert prepare_pose_condition(torch.rand(3, 40, 40, 4), spec).tokens.shape == (3, 8, 32, 32)  # RGBA, few
    with pytest.raises(ConditionError, match="IMAGE batch"):
        prepare_pose_condition(torch.rand(40, 40, 3), spec)
    with pytest.raises(ConditionError, match="1 to 256"):
        prepare_pose_condition(torch.rand(300, 8, 8, 3), spec)


def test_image_condition_uses_the_checkpoints_feature_and_checks_the_clip_width():
    out = {"penultimate_hidden_states": torch.randn(1, 257, 1024), "last_hidden_state": torch.randn(1, 257, 1024),
           "image_embeds": torch.randn(1, 768)}
    assert prepare_image_condition(out, image_spec(1024)).tokens.shape == (257, 1024)
    assert prepare_image_condition(out, image_spec(768, "image_embeds")).tokens.shape == (1, 768)
    vit_h = {"penultimate_hidden_states": torch.randn(1, 257, 1280)}
    with pytest.raises(ConditionError, match="1024 wide from CLIP ViT-L/14.*1280 wide \\(CLIP ViT-H/14\\).*Load CLIP"):
        prepare_image_condition(vit_h, image_spec(1024))
    with pytest.raises(ConditionError, match="expects an image condition.*given a text condition.*LoFA Image"):
        prepare_condition(image_spec(1024), "text", tokens=torch.randn(1, 77, 2048))
    with pytest.raises(ConditionError, match="expects a text condition.*given a pose condition"):
        prepare_condition(WAN_TEXT, "pose", frames=torch.rand(4, 8, 8, 3))


def _catalog():
    shapes = {f"blocks.{d}.{a}.{x}.weight": (64, 64) for d in range(2) for a in ("self_attn", "cross_attn")
              for x in "qkvo"}
    return build_catalog(shapes | {"head.modulation": (1, 2, 64)})


@pytest.mark.parametrize("spec,payload", [
    (image_spec(48), {"image": {"penultimate_hidden_states": torch.randn(1, 50, 48)}}),
    (image_spec(32, "image_embeds"), {"image": {"image_embeds": torch.randn(1, 32)}}),
    (pose_spec(frames=4, frame_size=32), {"frames": torch.rand(10, 40, 30, 3)}),
    (image_spec(32, "image_embeds", second_dim=24), {"image": {"image_embeds": torch.randn(1, 32)},
                                                     "image_2": {"image_embeds": torch.randn(1, 24)}}),
])
def test_image_and_pose_checkpoints_round_trip_and_predict(tmp_path, spec, payload):
    catalog = _catalog()
    torch.manual_seed(0)
    net = randomise_lora_heads_(new_hypernet(catalog, spec, **SMALL), seed=0)
    path = save_checkpoint(tmp_path / "m.safetensors", net, catalog, spec)
    ckpt = load_checkpoint(path)
    assert ckpt.condition == spec and ckpt.net.stage1.cfg.condition == spec.kind
    encoder = "image_proj" if spec.kind == "image" else "pose_encoder"
    assert any(k.startswith(f"{encoder}.") for k in ckpt.net.stage1.state_dict())
    cond = prepare_condition(spec, spec.kind, **payload)
    pred = predict(ckpt, catalog.targets, lambda t: torch.randn(t.shape), cond, device=torch.device("cpu"),
                   dtype=torch.float32)
    assert len(pred.lora) == 16 and all(f.delta().abs().max() > 0 for f in pred.lora.factors.values())
    with pytest.raises(CheckpointError, match="encodes .* conditions, the condition spec says"):
        save_checkpoint(tmp_path / "bad.safetensors", net, catalog, WAN_TEXT)


def clip_vision_encode(comfy, clip_vision, image):
    """ComfyUI's CLIPVisionEncode with center crop (the only behaviour before `crop` became an input in 2025)."""
    encode_node = comfy.mappings["CLIPVisionEncode"]
    extra = {"crop": "center"} if "crop" in encode_node.INPUT_TYPES()["required"] else {}
    return encode_node().encode(clip_vision, image, **extra)


def _image_checkpoint(comfy, model, path, width):
    shapes = {k: tuple(v.shape) for k, v in model.model_state_dict(filter_prefix="diffusion_model.").items()}
    catalog = build_catalog(shapes)
    spec = image_spec(width)
    torch.manual_seed(1)
    net = randomise_lora_heads_(new_hypernet(catalog, spec, **SMALL), seed=1)
    save_checkpoint(path, net, catalog, spec, provenance={"trained": False})


def test_mixed_image_features_are_a_softmax_gated_sum_of_two_branches(tmp_path):
    torch.manual_seed(0)
    mix = MixedImageProjector(8, 6, 16, tokens=2)
    x = torch.randn(3, 1, 14)
    torch.testing.assert_close(mix.scores(x).sum(-1), torch.ones(3, 1))
    out = mix(x)
    assert out.shape == (3, 2, 16)
    with torch.no_grad():
        mix.gate.weight.zero_()
        mix.gate.bias.copy_(torch.tensor([30.0, -30.0]))
    torch.testing.assert_close(mix(x), mix.first(x[..., :8]))  # the gate chose the first feature only
    with torch.no_grad():
        mix.gate.bias.copy_(torch.tensor([-30.0, 30.0]))
    torch.testing.assert_close(mix(x), mix.second(x[..., 8:]))
    catalog = _catalog()
    net = new_hypernet(catalog, image_spec(32, "image_embeds", second_dim=24), **SMALL)
    with pytest.raises(CheckpointError, match="mixes a second image feature 24 wide, the condition spec says 0"):
        save_checkpoint(tmp_path / "bad.safetensors", net, catalog, image_spec(32, "image_embeds"))
    with pytest.raises(ValueError, match="image_feature='image_embeds'"):
        image_spec(1024, "penultimate_hidden_states", second_dim=768)


def test_image_prompt_through_the_nodes(comfy, model_dirs, tmp_path):
    from support import tiny_clip_vision as tiny_clip

    model = comfy.tiny_sdxl.build_model(seed=0)
    _image_checkpoint(comfy, model, model_dirs.lofa / "face.safetensors", tiny_clip.CONFIG["hidden_size"])
    (handle,) = node(comfy, "LoFAModelLoader").load("face.safetensors", "float32")
    clip_vision = tiny_clip.build(seed=2)
    (encoded,) = clip_vision_encode(comfy, clip_vision, torch.rand(1, 96, 80, 3))
    (condition,) = node(comfy, "LoFAImageCondition").make(encoded)
    predict_node = node(comfy, "LoFAPredictLoRA")
    lora, response = predict_node.predict(model, handle, None, "all", 0, 8, condition=condition)
    assert len(response.maps) == 56 and any(k.endswith("lora_up.weight") for k in lora)
    errors = comfy.pack.lofa_core.errors
    (text_condition,) = node(comfy, "LoFATextCondition").make(sdxl_conditioning())
    with pytest.raises(errors.ConditionError, match="expects an image condition.*given a text condition"):
        predict_node.predict(model, handle, None, "all", 0, 8, condition=text_condition)
    with pytest.raises(errors.ConditionError, match="Connect exactly one prompt"):
        predict_node.predict(model, handle, sdxl_conditioning(), "all", 0, 8, condition=condition)
    with pytest.raises(errors.ConditionError, match="Connect exactly one prompt"):
        predict_node.predict(model, handle, None, "all", 0, 8)
    wide = comfy.pack.nodes.condition_nodes.LoFACondition("image", image={
        "penultimate_hidden_states": torch.randn(1, 257, 1024)})
    with pytest.raises(errors.ConditionError, match="1024 wide \\(CLIP ViT-L/14\\)"):
        predict_node.predict(model, handle, None, "all", 0, 8, condition=wide)
    (pose,) = node(comfy, "LoFAPoseCondition").make(torch.rand(5, 32, 32, 3))
    with pytest.raises(errors.ConditionError, match="expects an image condition.*given a pose condition"):
        predict_node.predict(model, handle, None, "all", 0, 8, condition=pose)


def test_two_image_features_through_the_nodes(comfy, model_dirs):
    """A checkpoint that mixes two image features (DiffLoRA MIF) takes a second CLIP Vision Encode output; each
    missing, extra or wrong-width second input gets an error naming the socket and the fix."""
    from support import tiny_clip_vision as tiny_clip

    model = comfy.tiny_sdxl.build_model(seed=0)
    shapes = {k: tuple(v.shape) for k, v in model.model_state_dict(filter_prefix="diffusion_model.").items()}
    catalog = build_catalog(shapes)
    width = tiny_clip.CONFIG["projection_dim"]
    for name, second in (("mix.safetensors", width), ("mix_wide.safetensors", width + 8)):
        spec = image_spec(width, "image_embeds", second_dim=second)
        torch.manual_seed(1)
        net = randomise_lora_heads_(new_hypernet(catalog, spec, **SMALL), seed=1)
        save_checkpoint(model_dirs.lofa / name, net, catalog, spec, provenance={"trained": False})
    (handle,) = node(comfy, "LoFAModelLoader").load("mix.safetensors", "float32")
    assert handle.checkpoint.condition.second_dim == width
    image = torch.rand(1, 96, 80, 3)
    (whole,) = clip_vision_encode(comfy, tiny_clip.build(seed=2), image)
    (face,) = clip_vision_encode(comfy, tiny_clip.build(seed=3), image[:, 20:60, 10:50])
    condition_node, predict_node = node(comfy, "LoFAImageCondition"), node(comfy, "LoFAPredictLoRA")
    (mixed,) = condition_node.make(whole, face)
    lora, _ = predict_node.predict(model, handle, None, "all", 0, 8, condition=mixed)
    (other,) = condition_node.make(whole, whole)
    lora_other, _ = predict_node.predict(model, handle, None, "all", 0, 8, condition=other)
    assert any(not torch.equal(lora[k], lora_other[k]) for k in lora), "the second feature must matter"
    errors = comfy.pack.lofa_core.errors
    (single,) = condition_node.make(whole)
    with pytest.raises(errors.ConditionError, match="mixes two image features: connect a second CLIP Vision Encode"):
        predict_node.predict(model, handle, None, "all", 0, 8, condition=single)
    (wide,) = node(comfy, "LoFAModelLoader").load("mix_wide.safetensors", "float32")
    with pytest.raises(errors.ConditionError, match=f"clip_vision_output_2: .*expects image_embeds {width + 8} wide"):
        predict_node.predict(model, wide, None, "all", 0, 8, condition=mixed)
    _image_checkpoint(comfy, model, model_dirs.lofa / "one.safetensors", tiny_clip.CONFIG["hidden_size"])
    (one,) = node(comfy, "LoFAModelLoader").load("one.safetensors", "float32")
    with pytest.raises(errors.ConditionError, match="takes one image feature; disconnect clip_vision_output_2"):
        predict_node.predict(model, one, None, "all", 0, 8, condition=mixed)


def test_text_condition_node_equals_direct_conditioning(comfy, model_dirs):
    from test_comfy_sdxl import make_checkpoint

    model = comfy.tiny_sdxl.build_model(seed=3)
    make_checkpoint(comfy, model, model_dirs.lofa / "t.safetensors", seed=3)
    (handle,) = node(comfy, "LoFAModelLoader").load("t.safetensors", "float32")
    comfy.pack.nodes.prediction_cache.clear()
    direct, _ = node(comfy, "LoFAPredictLoRA").predict(model, handle, sdxl_conditioning(seed=9), "all", 0, 8)
    comfy.pack.nodes.prediction_cache.clear()
    (condition,) = node(comfy, "LoFATextCondition").make(sdxl_conditioning(seed=9))
    via_node, _ = node(comfy, "LoFAPredictLoRA").predict(model, handle, None, "all", 0, 8, condition=condition)
    for key in direct:
        assert torch.equal(direct[key], via_node[key]), key
    assert SDXL_TEXT.kind == "text"


def test_training_image_features_equal_comfyui_clip_vision_encode(comfy, tmp_path):
    from support import tiny_clip_vision as tiny_clip

    from training.encoding import CLIPVisionFeatures

    clip_vision = tiny_clip.build(seed=4)
    tiny_clip.save(clip_vision, tmp_path / "tiny_clip_vision.safetensors", tmp_path / "hf")
    ours = CLIPVisionFeatures(tmp_path / "hf")
    image = torch.rand(1, 120, 90, 3)
    (theirs,) = clip_vision_encode(comfy, clip_vision, image)
    features = ours.encode(image)
    for name in ("last_hidden_state", "penultimate_hidden_states", "image_embeds"):
        torch.testing.assert_close(features[name], getattr(theirs, name)[0].float(), rtol=2e-3, atol=2e-3,
                                   msg=name)
