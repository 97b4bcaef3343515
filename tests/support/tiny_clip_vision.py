"""A tiny CLIP vision model for tests and the demo, in ComfyUI's own CLIP vision classes.

ComfyUI recognises CLIP vision files only by the layer counts of ViT-L/H/G, so `register()` teaches its loader
this tiny 3-layer configuration too (used by the test server's helper node; real models never need it). The
same weights are also written as a transformers folder, so `training.encoding.CLIPVisionFeatures` can be
checked against ComfyUI's CLIP Vision Encode.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import comfy.clip_vision
import torch
from safetensors.torch import save_file

CONFIG = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
          "image_size": 224, "patch_size": 32, "projection_dim": 32, "hidden_act": "quick_gelu",
          "layer_norm_eps": 1e-5, "num_channels": 3, "attention_dropout": 0.0, "dropout": 0.0,
          "initializer_factor": 1.0, "initializer_range": 0.02, "model_type": "clip_vision_model"}
_MARK = "vision_model.encoder.layers.2.layer_norm1.weight"
_TOO_DEEP = "vision_model.encoder.layers.3.layer_norm1.weight"


def config_path() -> str:
    folder = Path(os.environ.get("LOFA_TINY_CONFIG_DIR", Path(__file__).resolve().parent / ".tiny_configs"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny_clip_vision.json"
    text = json.dumps(CONFIG, indent=1)
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return str(path)


def _is_tiny(sd) -> bool:
    return _MARK in sd and _TOO_DEEP not in sd and sd[_MARK].shape[0] == CONFIG["hidden_size"]


def register() -> None:
    """Let ComfyUI's CLIP vision loader accept the tiny model. Idempotent."""
    original = comfy.clip_vision.load_clipvision_from_sd
    if getattr(original, "lofa_tiny", False):
        return

    def load_clipvision_from_sd(sd, prefix="", convert_keys=False):
        if not convert_keys and _is_tiny(sd):
            model = comfy.clip_vision.ClipVisionModel(config_path())
            model.load_sd(sd)
            return model
        return original(sd, prefix, convert_keys)

    load_clipvision_from_sd.lofa_tiny = True
    comfy.clip_vision.load_clipvision_from_sd = load_clipvision_from_sd


def build(seed: int = 0):
    """A randomly initialised tiny ComfyUI ClipVisionModel."""
    from training.tiny_models import fill_random_

    with torch.no_grad():
        model = comfy.clip_vision.ClipVisionModel(config_path())
        fill_random_(model.model, seed, std=0.05)
    return model


def save(model, comfy_file: str | os.PathLike, transformers_dir: str | os.PathLike | None = None) -> Path:
    """Write the model for ComfyUI's Load CLIP Vision (and, optionally, as a transformers folder)."""
    sd = {k: v.float().contiguous() for k, v in model.get_sd().items() if not k.endswith("position_ids")}
    comfy_file = Path(comfy_file)
    comfy_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(comfy_file))
    if transformers_dir is not None:
        folder = Path(transformers_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({**CONFIG, "architectures": ["CLIPVisionModelWithProjection"]}))
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return comfy_file
