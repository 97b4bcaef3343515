"""Tiny, randomly initialised models of the real architectures, for the synthetic suite, the tests and the
benchmarks (no download): WAN 2.1 T2V (diffusers `WanTransformer3DModel`), a umT5 text encoder with a
word-level tokenizer, and a CLIP vision model, the last two as local transformers folders.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lofa_core.families.wan import diffusers_to_comfy_key
from lofa_core.fileio import save_safetensors

from .synthetic import INTENSITIES, MOTIONS, PALETTES, PATTERNS

TINY_WAN = dict(dim=128, heads=1, ffn_dim=256, num_layers=2, in_channels=16, text_dim=4096, freq_dim=256)


def fill_random_(module: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """ComfyUI builds models with uninitialised memory; give every tensor defined random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.state_dict().items():
            if not p.is_floating_point():
                continue
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight", "_norm.weight",
                              "layer_norm1.weight", "layer_norm2.weight", "final_layer_norm.weight")):
                p.copy_(1 + std * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))
    return module


def build_tiny_wan(seed: int = 0, std: float = 0.02, **overrides):
    """A randomly initialised tiny diffusers `WanTransformer3DModel` (norm scales around 1, the rest ~N(0, std))."""
    from diffusers import WanTransformer3DModel

    cfg = {**TINY_WAN, **overrides}
    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=cfg["heads"], attention_head_dim=cfg["dim"] // cfg["heads"],
        in_channels=cfg["in_channels"], out_channels=cfg["in_channels"], text_dim=cfg["text_dim"],
        freq_dim=cfg["freq_dim"], ffn_dim=cfg["ffn_dim"], num_layers=cfg["num_layers"], cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6,
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm2.weight")):
                p.copy_(1 + std * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))
    return model.eval()


def tiny_wan_state_dict(model) -> dict[str, torch.Tensor]:
    """A diffusers WAN's weights under ComfyUI/original WAN key names (as the released files have them)."""
    return {diffusers_to_comfy_key(k): v for k, v in model.state_dict().items()}


def make_tiny_wan(path: Path, seed: int = 0) -> Path:
    """The suite's tiny WAN 2.1 T2V base model, saved like the released files (ComfyUI/original key names)."""
    if path.exists():
        return path
    sd = {k: v.contiguous() for k, v in tiny_wan_state_dict(build_tiny_wan(seed, std=0.05)).items()}
    save_safetensors(sd, path, {"lofa.synthetic": "tiny WAN 2.1 T2V"})
    return path


def make_tiny_umt5(folder: Path, seed: int = 0, extra_words: tuple[str, ...] = ()) -> Path:
    """A tiny umT5 encoder (4096-wide outputs like umT5-XXL) with a word-level tokenizer, in a local folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    if (folder / "config.json").exists():
        return folder
    words = sorted({w for p in PALETTES for w in [p]} | set(PATTERNS) | set(MOTIONS) | set(INTENSITIES)
                   | {"a", "pattern", "that", "is", ","} | set(extra_words))
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(seed)
    config = UMT5Config(vocab_size=len(vocab), d_model=4096, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0,
                        eos_token_id=1, decoder_start_token_id=0)
    model = UMT5EncoderModel(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    fast.save_pretrained(str(folder))
    return folder


def make_tiny_clip_vision(folder: Path, seed: int = 0, width: int = 64, projection: int = 32) -> Path:
    """A tiny randomly initialised CLIP vision model (with projection) in a local transformers folder."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3,
                              num_attention_heads=4, image_size=224, patch_size=32, projection_dim=projection,
                              hidden_act="quick_gelu")
    folder.mkdir(parents=True, exist_ok=True)
    CLIPVisionModelWithProjection(config).save_pretrained(str(folder))
    return folder
