"""A tiny SDXL built from ComfyUI's own SDXL classes, for tests and the demo (never downloaded, never trained).

ComfyUI recognises SDXL only by its real config, so this registers a subclass of `comfy.supported_models.SDXL`
with a small UNet config (same model class `model_base.SDXL`, context 2048, pooled 1280, linear transformers,
three resolution levels so LoRA targets come in two widths and non-square attn2.to_k/to_v). Its text encoder
is ComfyUI's SDXL CLIP-L + CLIP-G with one narrow layer each (hidden widths stay 768 + 1280 so CONDITIONING is
SDXL-shaped) and its VAE is ComfyUI's TAESD. Import only where `comfy` is importable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import comfy.model_management
import comfy.sd
import comfy.sd1_clip
import comfy.sdxl_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.taesd.taesd
import torch

from training.tiny_models import fill_random_

UNET_CONFIG = {
    "model_channels": 32,
    "use_linear_in_transformer": True,
    "transformer_depth": [0, 1, 1],
    "context_dim": 2048,
    "adm_in_channels": 2816,
    "use_temporal_attention": False,
}
FULL_UNET_CONFIG = {
    **UNET_CONFIG,
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "in_channels": 4, "out_channels": 4, "num_res_blocks": [1, 1, 1],
    "channel_mult": [1, 2, 4], "transformer_depth_output": [0, 0, 1, 1, 1, 1], "transformer_depth_middle": 1,
    "use_temporal_resblock": False,
}
_CLIP_L = {"hidden_size": 768, "intermediate_size": 64, "num_attention_heads": 12, "num_hidden_layers": 3,
           "projection_dim": 768, "hidden_act": "quick_gelu"}
_CLIP_G = {"hidden_size": 1280, "intermediate_size": 64, "num_attention_heads": 20, "num_hidden_layers": 3,
           "projection_dim": 1280, "hidden_act": "gelu"}
_CLIP_COMMON = {"architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0,
                "eos_token_id": 2, "initializer_factor": 1.0, "initializer_range": 0.02, "layer_norm_eps": 1e-05,
                "max_position_embeddings": 77, "model_type": "clip_text_model", "pad_token_id": 1,
                "torch_dtype": "float32", "vocab_size": 49408}
_CONFIG_DIR = Path(os.environ.get("LOFA_TINY_CONFIG_DIR", Path(__file__).resolve().parent / ".tiny_configs"))


def _clip_config(name: str, sizes: dict) -> str:
    _CONFIG_DIR.mkdir(parents=True, exist_ok=True)
    path = _CONFIG_DIR / f"{name}.json"
    text = json.dumps({**_CLIP_COMMON, **sizes}, indent=1)
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return str(path)


class TinyClipL(comfy.sd1_clip.SDClipModel):
    def __init__(self, device="cpu", dtype=None, **kwargs):  # kwargs: model_options on current ComfyUI
        super().__init__(device=device, layer="hidden", layer_idx=-2, textmodel_json_config=_clip_config(
            "tiny_clip_l", _CLIP_L), dtype=dtype, layer_norm_hidden_state=False, **kwargs)


class TinyClipG(comfy.sd1_clip.SDClipModel):
    def __init__(self, device="cpu", dtype=None, **kwargs):
        if "model_options" in kwargs:
            kwargs["model_options"] = {**kwargs["model_options"], "model_name": "clip_g"}
        super().__init__(device=device, freeze=True, layer="hidden", layer_idx=-2,
                         textmodel_json_config=_clip_config("tiny_clip_g", _CLIP_G), dtype=dtype,
                         special_tokens={"start": 49406, "end": 49407, "pad": 0}, layer_norm_hidden_state=False,
                         **kwargs)


class TinySDXLClipModel(comfy.sdxl_clip.SDXLClipModel):
    def __init__(self, device="cpu", dtype=None, **kwargs):
        torch.nn.Module.__init__(self)
        self.clip_l = TinyClipL(device=device, dtype=dtype, **kwargs)
        self.clip_g = TinyClipG(device=device, dtype=dtype, **kwargs)
        self.dtypes = {dtype}


class TinySDXL(comfy.supported_models.SDXL):
    """Matches only the tiny UNet above; everything else is ComfyUI's SDXL."""

    unet_config = dict(UNET_CONFIG)

    def clip_target(self, state_dict=None):
        return comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, TinySDXLClipModel)


def register() -> None:
    """Let ComfyUI's loaders (CheckpointLoaderSimple, UNETLoader) detect tiny SDXL files. Idempotent."""
    models = comfy.supported_models.models
    if not any(m is TinySDXL or getattr(m, "__name__", "") == "TinySDXL" for m in models):
        models.insert(0, TinySDXL)


def build_model(seed: int = 0):
    """A ModelPatcher around a randomly initialised tiny `model_base.SDXL` (what UNETLoader would return)."""
    register()
    config = TinySDXL(dict(FULL_UNET_CONFIG))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "", device=torch.device("cpu"))
    fill_random_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def build_clip(seed: int = 1):
    register()
    target = TinySDXL(dict(FULL_UNET_CONFIG)).clip_target()
    with torch.no_grad():  # ComfyUI builds text encoders with gradients off (it fills some weights in place)
        clip = comfy.sd.CLIP(target)
    fill_random_(clip.cond_stage_model, seed)
    return clip


def build_vae(seed: int = 2):
    taesd = fill_random_(comfy.taesd.taesd.TAESD(), seed, std=0.05)
    sd = {k: v for k, v in taesd.state_dict().items()}
    return comfy.sd.VAE(sd=sd)


def save_checkpoint(path: str | os.PathLike, seed: int = 0) -> Path:
    """A full tiny SDXL checkpoint (UNet + CLIP-L/G + TAESD VAE) for CheckpointLoaderSimple."""
    model, clip, vae = build_model(seed), build_clip(seed + 1), build_vae(seed + 2)
    clip.cond_stage_model.to(torch.float16)  # halves the file (the token tables dominate); loads back as usual
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    comfy.sd.save_checkpoint(str(path), model, clip, vae, metadata={"lofa.tiny_sdxl": "1"})
    return path


def export_text_encoders(clip, folder: str | os.PathLike) -> Path:
    """Save a tiny SDXL CLIP in transformers' layout (`clip_l/`, `clip_g/`, with ComfyUI's CLIP tokenizer files),
    so `training.encoding.SDXLClipTextEncoder` encodes prompts exactly as this ComfyUI CLIP does."""
    import shutil

    from safetensors.torch import save_file

    folder = Path(folder)
    tokenizer_dir = Path(comfy.sd1_clip.__file__).parent / "sd1_tokenizer"
    parts = {"clip_l": (clip.cond_stage_model.clip_l, _CLIP_L, "CLIPTextModel", "<|endoftext|>"),
             "clip_g": (clip.cond_stage_model.clip_g, _CLIP_G, "CLIPTextModelWithProjection", "!")}
    for name, (model, sizes, arch, pad) in parts.items():
        out = folder / name
        out.mkdir(parents=True, exist_ok=True)
        config = {**_CLIP_COMMON, **sizes, "architectures": [arch], "torch_dtype": "float32"}
        (out / "config.json").write_text(json.dumps(config, indent=1))
        sd = {k: v.float().contiguous() for k, v in model.transformer.state_dict().items()
              if k.startswith("text_model.") or (arch.endswith("Projection") and k == "text_projection.weight")}
        sd.pop("text_model.embeddings.position_ids", None)
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
        for file in tokenizer_dir.iterdir():
            shutil.copyfile(file, out / file.name)
        special = json.loads((out / "special_tokens_map.json").read_text())
        special["pad_token"] = pad
        (out / "special_tokens_map.json").write_text(json.dumps(special))
        tok_config = json.loads((out / "tokenizer_config.json").read_text())
        tok_config["pad_token"] = pad
        (out / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return folder
