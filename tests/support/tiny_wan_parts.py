"""The rest of a WAN 2.1 graph in tiny form, for running the shipped WAN workflows headless on current ComfyUI.

* umT5 text encoder: ComfyUI's CLIPLoader (type wan) always builds umT5-XXL, so this file registers one small
  model class that stands in for that loader's model only: ComfyUI's own umT5 model class (`SDClipModel` over
  `comfy.text_encoders.t5.T5`, end token 1, zero-masked padding) with a tiny config (4096 wide like umT5-XXL, two
  layers, a small vocabulary), fed by ComfyUI's own WAN tokenizer from the file's `spiece_model`, exactly as the
  real file works. Its CONDITIONING therefore has the stock layout: [1, max(512, n+1), 4096], zeros after EOS.
* The WAN 2.1 VAE: ComfyUI's own WanVAE class at width 16, which the stock VAELoader detects unchanged.
* A pose video (H.264 .mp4) for Load Video.

`register()` runs in a test ComfyUI server through its helper node file (demo.runtime.prepare_server_root);
it does nothing on a ComfyUI without WAN. Import only where `comfy` is importable.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import torch

TINY_UMT5 = {"d_ff": 32, "d_kv": 8, "d_model": 4096, "num_heads": 2, "num_layers": 2,
             "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True, "layer_norm_epsilon": 1e-6,
             "model_type": "umt5", "eos_token_id": 1, "pad_token_id": 0, "relative_attention_num_buckets": 32}
_MARK = "encoder.block.0.layer.1.DenseReluDense.wi_1.weight"
_TOO_DEEP = f"encoder.block.{TINY_UMT5['num_layers']}.layer.1.DenseReluDense.wi_1.weight"
# Sentences the tokenizer is trained on: the workflows' prompts use these words (others become <unk>).
CORPUS = ["a man performs a jumping jack he jumps spreads his arms and legs wide then returns to standing",
          "full body plain studio background a dancer in a white studio performs the moves steady camera",
          "a lighthouse on a cliff at sunset waves crashing cinematic a person a photo of",
          "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量"]


def _config_dir() -> Path:
    folder = Path(os.environ.get("LOFA_TINY_CONFIG_DIR", Path(__file__).resolve().parent / ".tiny_configs"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def tokenizer_model(vocab_size: int = 160) -> bytes:
    """A small SentencePiece model with umT5's special ids (pad 0, eos 1, unk 2, no bos)."""
    import sentencepiece

    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4), model_writer=proto, vocab_size=vocab_size, hard_vocab_limit=False,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, model_type="unigram",
        minloglevel=2, num_threads=1)
    return proto.getvalue()


def _umt5_classes(vocab_size: int):
    import comfy.sd1_clip
    import comfy.text_encoders.t5

    path = _config_dir() / f"tiny_umt5_{vocab_size}.json"
    text = json.dumps({**TINY_UMT5, "vocab_size": vocab_size}, indent=1)
    if not path.exists() or path.read_text() != text:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    class TinyUMT5Model(comfy.sd1_clip.SDClipModel):  # ComfyUI's UMT5XXlModel, tiny config
        def __init__(self, device="cpu", layer="last", layer_idx=None, dtype=None, model_options={}):  # noqa: B006
            super().__init__(device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config=str(path),
                             dtype=dtype, special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5,
                             enable_attention_masks=True, zero_out_masked=True, model_options=model_options)

    class TinyWanT5Model(comfy.sd1_clip.SD1ClipModel):  # ComfyUI's WanT5Model around it
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):  # noqa: B006
            super().__init__(device=device, dtype=dtype, model_options=model_options, name="umt5xxl",
                             clip_model=TinyUMT5Model, **kwargs)

    return TinyUMT5Model, TinyWanT5Model


def is_tiny_umt5(sd) -> bool:
    return ("spiece_model" in sd and _MARK in sd and _TOO_DEEP not in sd
            and sd[_MARK].shape[0] == TINY_UMT5["d_ff"])


def _load_tiny_umt5(sd, embedding_directory, model_options, disable_dynamic):
    import comfy.sd
    import comfy.text_encoders.wan
    import comfy.utils

    class Target:
        params = {}
        clip = _umt5_classes(sd["shared.weight"].shape[0])[1]
        tokenizer = comfy.text_encoders.wan.WanT5Tokenizer

    return comfy.sd.CLIP(Target(), embedding_directory=embedding_directory,
                         parameters=comfy.utils.calculate_parameters(sd),
                         tokenizer_data={"spiece_model": sd["spiece_model"]}, state_dict=[sd],
                         model_options=model_options, disable_dynamic=disable_dynamic)


def register() -> None:
    """Let the stock CLIPLoader (type wan) load a tiny umT5 file; every other file loads as before. Idempotent."""
    import comfy.sd

    if not hasattr(comfy.sd.CLIPType, "WAN"):
        return
    original = comfy.sd.load_text_encoder_state_dicts
    if getattr(original, "lofa_tiny_umt5", False):
        return

    def load_text_encoder_state_dicts(state_dicts=(), embedding_directory=None,
                                      clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION, model_options={},  # noqa: B006
                                      disable_dynamic=False):
        if len(state_dicts) == 1 and clip_type == comfy.sd.CLIPType.WAN and is_tiny_umt5(state_dicts[0]):
            return _load_tiny_umt5(state_dicts[0], embedding_directory, model_options, disable_dynamic)
        return original(list(state_dicts), embedding_directory=embedding_directory, clip_type=clip_type,
                        model_options=model_options, disable_dynamic=disable_dynamic)

    load_text_encoder_state_dicts.lofa_tiny_umt5 = True
    comfy.sd.load_text_encoder_state_dicts = load_text_encoder_state_dicts


def save_umt5(path: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny umT5 file in the stock layout (`encoder.*`, `shared.weight`, `spiece_model`)."""
    from safetensors.torch import save_file

    from training.tiny_models import fill_random_

    spiece = tokenizer_model()
    vocab = _vocab_size(spiece)
    model_class = _umt5_classes(vocab)[0]
    with torch.no_grad():
        model = model_class(dtype=torch.float32)
        fill_random_(model.transformer, seed, std=0.05)
    sd = {k: v.contiguous() for k, v in model.transformer.state_dict().items()}
    sd["spiece_model"] = torch.frombuffer(bytearray(spiece), dtype=torch.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def _vocab_size(spiece: bytes) -> int:
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_proto=spiece).get_piece_size()


def save_vae(path: str | os.PathLike, seed: int = 0) -> Path:
    """ComfyUI's WAN 2.1 VAE class at width 16, randomly initialised (what VAELoader detects as a WAN 2.1 VAE)."""
    import comfy.ldm.wan.vae
    from safetensors.torch import save_file

    from training.tiny_models import fill_random_

    with torch.no_grad():
        vae = comfy.ldm.wan.vae.WanVAE(dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                       temperal_downsample=[False, True, True])
        fill_random_(vae, seed, std=0.05)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path))
    return path


def save_pose_video(path: str | os.PathLike, frames: int = 8, size: int = 32) -> Path:
    """A short H.264 video of a white limb swinging on black, like rendered 2D pose frames."""
    import av
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            image = np.zeros((size, size, 3), dtype=np.uint8)
            angle = math.pi * i / frames
            for r in range(size // 2):
                x = int(size / 2 + r * math.cos(angle))
                y = int(size / 2 + r * math.sin(angle))
                image[max(0, y - 1):y + 2, max(0, x - 1):x + 2] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
