"""Bad input through the real nodes: every failure names what is wrong and how to fix it; nothing is written."""

from __future__ import annotations

import pytest
import torch
from support import tiny_wan
from support.comfy_nodes import node
from test_comfy_sdxl import make_checkpoint, sdxl_conditioning
from test_wan import wan_checkpoint, wan_conditioning

from lofa_core.checkpoint import save_checkpoint
from lofa_core.errors import ModelFamilyError
from lofa_core.factory import new_hypernet
from lofa_core.families import build_catalog
from lofa_core.families.sdxl import TEXT_CONDITION as SDXL_TEXT


def errors(comfy):
    return comfy.pack.lofa_core.errors  # the pack's own copy of lofa_core (loaded by ComfyUI)


def load(comfy, name):
    return node(comfy, "LoFAModelLoader").load(name, "float32")[0]


def predict(comfy, model, handle, conditioning):
    return node(comfy, "LoFAPredictLoRA").predict(model, handle, conditioning, "all", 0, 8)


def real_sdxl_shapes(comfy) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the real SDXL UNet, built with ComfyUI's own class on the meta device."""
    import comfy.ops
    import comfy.supported_models
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    config = comfy.supported_models.SDXL({**comfy.supported_models.SDXL.unet_config,
                                          "in_channels": 4, "out_channels": 4, "num_res_blocks": [2, 2, 2],
                                          "channel_mult": [1, 2, 4], "transformer_depth_middle": 10,
                                          "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
                                          "num_classes": "sequential", "use_spatial_transformer": True,
                                          "legacy": False, "use_checkpoint": False, "image_size": 32,
                                          "use_temporal_resblock": False})
    unet = UNetModel(**config.unet_config, device="meta", operations=comfy.ops.disable_weight_init)
    return {f"diffusion_model.{k}": tuple(v.shape) for k, v in unet.state_dict().items()}


def test_real_sdxl_catalog(comfy):
    catalog = build_catalog(real_sdxl_shapes(comfy))
    assert catalog.family == "sdxl" and len(catalog) == 560 and catalog.num_depths == 70
    shapes = {t.path: t.shape for t in catalog.targets}
    assert shapes["input_blocks.4.1.transformer_blocks.0.attn2.to_k"] == (640, 2048)
    assert shapes["middle_block.1.transformer_blocks.9.attn2.to_v"] == (1280, 2048)
    assert shapes["output_blocks.5.1.transformer_blocks.1.attn1.to_out.0"] == (640, 640)
    first, last = catalog.targets[0], catalog.targets[-1]
    assert first.path == "input_blocks.4.1.transformer_blocks.0.attn1.to_q" and first.depth == 0
    assert last.path == "output_blocks.5.1.transformer_blocks.1.attn2.to_out.0" and last.depth == 69
    middle = [t.depth for t in catalog.targets if t.path.startswith("middle_block")]
    assert min(middle) == 2 * 2 + 2 * 10, "depth runs input blocks, then middle, then output blocks"


def test_unknown_model_family_is_named(comfy):
    """An SD1.x-like UNet: no ADM input, 768-wide cross-attention context."""
    shapes = {k: ((v[0], 768) if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) else v)
              for k, v in real_sdxl_shapes(comfy).items() if "label_emb" not in k}
    with pytest.raises(ModelFamilyError, match="SD1.x UNet \\(cross-attention context dim 768\\).*WAN 2.1 T2V or SDXL"):
        build_catalog(shapes)
    with pytest.raises(ModelFamilyError, match="empty state dict"):
        build_catalog({})


def test_wrong_family_checkpoint(comfy, model_dirs):
    wan_patcher, _ = tiny_wan.build_view_patcher(seed=0)
    wan_checkpoint(wan_patcher, model_dirs.lofa / "wan.safetensors")
    sdxl = comfy.tiny_sdxl.build_model(seed=0)
    with pytest.raises(errors(comfy).ModelFamilyError, match="trained for WAN 2.1 T2V.*MODEL is SDXL"):
        predict(comfy, sdxl, load(comfy, "wan.safetensors"), sdxl_conditioning())


def test_checkpoint_for_other_shapes(comfy, model_dirs):
    catalog = build_catalog(real_sdxl_shapes(comfy))
    net = new_hypernet(catalog, SDXL_TEXT, d_model=32, n_heads=4, n_blocks=1, patch_size=128, rank=2)
    save_checkpoint(model_dirs.lofa / "full_sdxl.safetensors", net, catalog, SDXL_TEXT)
    tiny = comfy.tiny_sdxl.build_model(seed=0)
    with pytest.raises(errors(comfy).ModelFamilyError, match="layers differ.*missing.*trained for"):
        predict(comfy, tiny, load(comfy, "full_sdxl.safetensors"), sdxl_conditioning())


def test_corrupt_and_missing_checkpoint_files(comfy, model_dirs):
    model = comfy.tiny_sdxl.build_model(seed=0)
    make_checkpoint(comfy, model, model_dirs.lofa / "good.safetensors")
    data = (model_dirs.lofa / "good.safetensors").read_bytes()
    (model_dirs.lofa / "cut.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(errors(comfy).CheckpointError, match="'cut.safetensors'.*(truncated|corrupt)"):
        load(comfy, "cut.safetensors")
    with pytest.raises(errors(comfy).CheckpointError, match="'gone.safetensors' was not found in models/lofa"):
        load(comfy, "gone.safetensors")


def test_bad_conditioning(comfy, model_dirs):
    model = comfy.tiny_sdxl.build_model(seed=0)
    make_checkpoint(comfy, model, model_dirs.lofa / "m.safetensors")
    handle = load(comfy, "m.safetensors")
    err = errors(comfy).ConditionError
    with pytest.raises(err, match="CONDITIONING is empty.*CLIP Text Encode"):
        predict(comfy, model, handle, [])
    with pytest.raises(err, match="expects 2048-wide.*SDXL.*has 4096-wide.*umT5"):
        predict(comfy, model, handle, wan_conditioning())
    no_pooled = [[sdxl_conditioning()[0][0], {}]]
    with pytest.raises(err, match="pooled text embedding"):
        predict(comfy, model, handle, no_pooled)


def test_nan_weights_name_the_layer_and_nothing_is_written(comfy, model_dirs):
    model = comfy.tiny_sdxl.build_model(seed=0)
    make_checkpoint(comfy, model, model_dirs.lofa / "m.safetensors")
    key = "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight"
    with torch.no_grad():
        comfy.pack.nodes.comfy_compat.comfy.utils.get_attr(model.model, key)[0, 0] = float("nan")
    with pytest.raises(errors(comfy).WeightError, match=f"{key}.*NaN.*clean copy"):
        predict(comfy, model, load(comfy, "m.safetensors"), sdxl_conditioning())
    assert not any(model_dirs.loras.iterdir())


def test_apply_rejects_a_lora_for_another_model(comfy, model_dirs):
    wan_patcher, _ = tiny_wan.build_view_patcher(seed=0)
    wan_checkpoint(wan_patcher, model_dirs.lofa / "wan.safetensors")
    lora, _ = predict(comfy, wan_patcher, load(comfy, "wan.safetensors"), wan_conditioning())
    sdxl = comfy.tiny_sdxl.build_model(seed=0)
    with pytest.raises(errors(comfy).LoRAFormatError, match="fit no layer of this MODEL.*different base model"):
        node(comfy, "LoFAApplyLoRA").apply(sdxl, lora, 1.0)
    assert not sdxl.patches


def small_lora_model(value: float = 0.01, rank: int = 2) -> dict[str, torch.Tensor]:
    """A LORA_MODEL dict for two SDXL layers, as LoFA Predict LoRA returns it."""
    paths = ["input_blocks.4.1.transformer_blocks.0.attn1.to_q", "middle_block.1.transformer_blocks.0.attn2.to_k"]
    lora = {}
    for path in paths:
        lora[f"diffusion_model.{path}.lora_up.weight"] = torch.full((8, rank), value)
        lora[f"diffusion_model.{path}.lora_down.weight"] = torch.full((rank, 8), value)
        lora[f"diffusion_model.{path}.alpha"] = torch.tensor(float(rank))
    return lora


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("prefix,saved", [(".", "lofa_0_steps_00001.safetensors"),
                                          ("./", "lofa_0_steps_00001.safetensors"),
                                          ("./.", "lofa_0_steps_00001.safetensors"),
                                          ("LoFA/", "LoFA/lofa_0_steps_00001.safetensors"),
                                          ("LoFA/./x", "LoFA/x_0_steps_00001.safetensors")])
def test_save_prefix_always_stays_in_the_loras_folder(comfy, model_dirs, tmp_path, prefix, saved):
    result = node(comfy, "LoFASaveLoRA").save(small_lora_model(), prefix, "auto", "float16")
    assert result["ui"]["lofa_lora"] == [saved]
    assert files_under(tmp_path) == [f"loras/{saved}"], "nothing may be written outside models/loras"


@pytest.mark.parametrize("prefix,why", [("../x", "does not stay inside"), ("LoFA/../../x", "does not stay inside"),
                                        ("/tmp/lofa_escape", "does not stay inside"), ("..", "does not stay inside"),
                                        ("a\0b", "contains a NUL character")])
def test_save_prefix_escaping_the_loras_folder_is_refused(comfy, model_dirs, tmp_path, prefix, why):
    with pytest.raises(errors(comfy).LoFAError, match=f"filename_prefix .* {why}") as err:
        node(comfy, "LoFASaveLoRA").save(small_lora_model(), prefix, "auto", "float16")
    assert "models/loras" in str(err.value) and "'LoFA/lofa'" in str(err.value), "the message names the fix"
    assert files_under(tmp_path) == [] and not list(tmp_path.parent.glob("x_0*"))


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_saved_lora_gets_the_usual_file_permissions(comfy, model_dirs, umask):
    import os

    old = os.umask(umask)
    try:
        result = node(comfy, "LoFASaveLoRA").save(small_lora_model(), "LoFA/perm", "auto", "float16")
    finally:
        os.umask(old)
    mode = (model_dirs.loras / result["ui"]["lofa_lora"][0]).stat().st_mode & 0o777
    assert mode == 0o666 & ~umask, oct(mode)


def test_nan_pooled_or_huge_prompt_values_are_refused(comfy, model_dirs):
    model = comfy.tiny_sdxl.build_model(seed=0)
    make_checkpoint(comfy, model, model_dirs.lofa / "m.safetensors")
    handle = load(comfy, "m.safetensors")
    err = errors(comfy).ConditionError
    nan_pooled = sdxl_conditioning()
    nan_pooled[0][1]["pooled_output"][0, 3] = float("nan")
    with pytest.raises(err, match="pooled text embedding contains NaN or Inf.*re-encode"):
        predict(comfy, model, handle, nan_pooled)
    huge = sdxl_conditioning()
    huge[0][0].mul_(1e30)  # finite in float32, but no text encoder gives such values
    with pytest.raises(err, match="prompt condition overflows.*reach [0-9.]+e\\+30.*Re-encode the prompt"):
        predict(comfy, model, handle, huge)


def test_non_finite_prediction_is_refused_naming_the_layer(comfy, model_dirs):
    model = comfy.tiny_sdxl.build_model(seed=0)
    make_checkpoint(comfy, model, model_dirs.lofa / "m.safetensors")
    handle = load(comfy, "m.safetensors")
    with torch.no_grad():  # a checkpoint whose B head overflows float32 on every layer
        for name, p in handle.checkpoint.net.stage2.named_parameters():
            if name.startswith("head_B."):
                p.fill_(3e38)
    with pytest.raises(errors(comfy).LoFAError, match="prediction for diffusion_model\\..* is not finite .*B"):
        predict(comfy, model, handle, sdxl_conditioning())


def test_save_refuses_non_finite_factors_and_float16_overflow(comfy, model_dirs):
    save = node(comfy, "LoFASaveLoRA").save
    err = errors(comfy).LoRAFormatError
    broken = small_lora_model()
    next(v for k, v in broken.items() if k.endswith("lora_down.weight"))[0, 0] = float("nan")
    with pytest.raises(err, match="lora_down of 'input_blocks.4.1.transformer_blocks.0.attn1.to_q'.*NaN or Inf"):
        save(broken, "LoFA/x", "auto", "float32")
    big = small_lora_model(value=7e4)  # finite, but beyond float16's largest value 65504
    with pytest.raises(err, match="up to [0-9.]+e\\+04.*float16.*65504.*bfloat16 or float32"):
        save(big, "LoFA/x", "auto", "float16")
    assert files_under(model_dirs.loras) == []
    (saved,) = save(big, "LoFA/x", "auto", "float32")["ui"]["lofa_lora"]
    from safetensors.torch import load_file

    values = load_file(model_dirs.loras / saved)
    assert all(torch.isfinite(v).all() for v in values.values())


@pytest.mark.parametrize("strength", [float("nan"), float("inf"), float("-inf")])
def test_apply_refuses_a_non_finite_strength(comfy, model_dirs, strength):
    model = comfy.tiny_sdxl.build_model(seed=0)
    make_checkpoint(comfy, model, model_dirs.lofa / "m.safetensors")
    lora, _ = predict(comfy, model, load(comfy, "m.safetensors"), sdxl_conditioning())
    with pytest.raises(errors(comfy).LoFAError, match="strength_model is .*; set a finite number such as 1.0"):
        node(comfy, "LoFAApplyLoRA").apply(model, lora, strength)
    assert not model.patches


def test_apply_refuses_a_nan_lora(comfy, model_dirs):
    model = comfy.tiny_sdxl.build_model(seed=0)
    make_checkpoint(comfy, model, model_dirs.lofa / "m.safetensors")
    lora, _ = predict(comfy, model, load(comfy, "m.safetensors"), sdxl_conditioning())
    broken = {k: v.clone() for k, v in lora.items()}
    next(v for k, v in broken.items() if k.endswith("lora_up.weight"))[0, 0] = float("nan")
    with pytest.raises(errors(comfy).LoRAFormatError, match="lora_up of '.*' contains NaN or Inf.*Predict it again"):
        node(comfy, "LoFAApplyLoRA").apply(model, broken, 1.0)
    assert not model.patches


def test_rank_zero_lora_is_named_not_a_zero_division(comfy, model_dirs):
    model = comfy.tiny_sdxl.build_model(seed=0)
    make_checkpoint(comfy, model, model_dirs.lofa / "m.safetensors")
    lora, _ = predict(comfy, model, load(comfy, "m.safetensors"), sdxl_conditioning())
    empty = {k: (v[:, :0] if k.endswith("lora_up.weight") else v[:0] if k.endswith("lora_down.weight") else v)
             for k, v in lora.items()}
    with pytest.raises(errors(comfy).LoRAFormatError, match="rank 0 .*alpha.*empty"):
        node(comfy, "LoFAApplyLoRA").apply(model, empty, 1.0)


def test_rank_above_the_checkpoints_is_reported(comfy, model_dirs, caplog):
    model = comfy.tiny_sdxl.build_model(seed=0)
    make_checkpoint(comfy, model, model_dirs.lofa / "m.safetensors")
    handle = load(comfy, "m.safetensors")
    rank = handle.checkpoint.net.stage2.cfg.rank
    with caplog.at_level("WARNING"):
        lora, _ = node(comfy, "LoFAPredictLoRA").predict(model, handle, sdxl_conditioning(), "all", rank + 60, 8)
    assert any(f"rank {rank + 60} is above the checkpoint's rank {rank}" in r.getMessage() and
               f"keeps rank {rank}" in r.getMessage() for r in caplog.records), caplog.text
    assert {v.shape[0] for k, v in lora.items() if k.endswith("lora_down.weight")} == {rank}


def test_predict_in_another_dtype_than_the_network_is_a_clear_error(comfy, model_dirs):
    from lofa_core.checkpoint import load_checkpoint
    from lofa_core.conditioning import prepare_text_condition
    from lofa_core.predict import predict as core_predict

    model = comfy.tiny_sdxl.build_model(seed=0)
    catalog = make_checkpoint(comfy, model, model_dirs.lofa / "m.safetensors")
    ckpt = load_checkpoint(model_dirs.lofa / "m.safetensors")  # float32
    weights = model.model_state_dict()
    cond = prepare_text_condition(*[sdxl_conditioning()[0][0], sdxl_conditioning()[0][1]["pooled_output"]], SDXL_TEXT)
    with pytest.raises(ValueError, match="bfloat16.*'m.safetensors' is loaded in float32.*dtype=torch.bfloat16"):
        core_predict(ckpt, catalog.targets, lambda t: weights[t.key], cond, device=torch.device("cpu"),
                     dtype=torch.bfloat16)


def test_lofa_folder_from_extra_model_paths_lists_only_checkpoints(comfy, tmp_path, monkeypatch):
    """extra_model_paths.yaml adds `lofa: path` before custom nodes load, with an empty extension set."""
    fp = comfy.folder_paths
    monkeypatch.delitem(fp.folder_names_and_paths, "lofa", raising=False)
    if isinstance(getattr(fp, "filename_list_cache", None), dict):
        monkeypatch.setattr(fp, "filename_list_cache", {})
    fp.add_model_folder_path("lofa", str(tmp_path))  # what ComfyUI does for the yaml entry
    for name in ("a.safetensors", "stage2_x.pth", "notes.txt", "image.png", "b.ckpt"):
        (tmp_path / name).write_bytes(b"x")
    comfy.pack.nodes.comfy_compat.register_model_folder()
    paths, _ = fp.folder_names_and_paths["lofa"]
    assert paths[0] == str(tmp_path) and paths[-1].endswith("lofa")
    assert sorted(fp.get_filename_list("lofa")) == ["a.safetensors", "stage2_x.pth"]


def test_empty_wan_prompt_gets_a_warning(comfy, model_dirs, caplog):
    wan_patcher, _ = tiny_wan.build_view_patcher(seed=0)
    wan_checkpoint(wan_patcher, model_dirs.lofa / "wan.safetensors")
    handle = load(comfy, "wan.safetensors")
    with caplog.at_level("WARNING"):
        predict(comfy, wan_patcher, handle, wan_conditioning(real_tokens=5))
    assert "empty" not in caplog.text
    with caplog.at_level("WARNING"):
        predict(comfy, wan_patcher, handle, wan_conditioning(real_tokens=1))  # umT5 of "": only the EOS token
    assert "The prompt is empty" in caplog.text and "type a prompt in CLIP Text Encode" in caplog.text
