"""Frozen base models for training: the files ComfyUI users have, run through diffusers' implementations.

A base model file is a `.safetensors` of the diffusion model in ComfyUI/original key layout (WAN 2.1 as released
by Wan-AI or repackaged by ComfyUI; an SDXL checkpoint or UNet). diffusers' own converters map it to
`WanTransformer3DModel` / `UNet2DConditionModel`; `module_of` maps each LoFA target (ComfyUI names) to the
diffusers Linear that computes it. Each family brings its diffusion objective: flow matching for WAN,
epsilon prediction on the DDPM schedule for SDXL.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from lofa_core.families import build_catalog, sdxl, wan
from lofa_core.families.wan import comfy_to_diffusers_key, diffusers_to_comfy_key
from lofa_core.targets import TargetCatalog, strip_model_prefix

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


class BaseModel:
    """A frozen diffusion model with LoFA's view of it (catalog, target modules, objective)."""

    family: str
    catalog: TargetCatalog
    model: nn.Module
    modules: dict[str, nn.Linear]  # ComfyUI module path -> the diffusers Linear

    def weight(self, path: str) -> torch.Tensor:
        return self.modules[path].weight.detach()

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> BaseModel:
        self.model.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def diffusion_loss(self, latents: torch.Tensor, tokens: torch.Tensor | Captions,
                       pooled: torch.Tensor | None, generator: torch.Generator, reduce: bool = True) -> torch.Tensor:
        """The base model's training loss on `latents` with prompts `tokens` [B, L, D] (+ `pooled` [B, P]) or
        ready-made Captions (then `pooled` is ignored); per sample if not `reduce`."""
        raise NotImplementedError

    def comfy_state_dict(self) -> dict[str, torch.Tensor]:
        """The diffusion model's current weights under ComfyUI/original key names (no container prefix)."""
        raise NotImplementedError

    def save_like(self, source: str | Path, out: str | Path) -> Path:
        """Write `source` (a base model file) with the diffusion weights replaced by this model's, keeping
        everything else a full checkpoint holds (text encoders, VAE) and its key prefixes."""
        from safetensors import safe_open

        from lofa_core.fileio import save_safetensors

        ours = self.comfy_state_dict()
        tensors, used = {}, set()
        with safe_open(str(source), framework="pt") as fh:
            metadata = fh.metadata() or {}
            for key in fh.keys():
                rel = strip_model_prefix(key)
                tensors[key] = fh.get_tensor(key)
                if rel in ours:  # keep the file's dtype
                    tensors[key] = ours[rel].detach().to(tensors[key].dtype).cpu().contiguous()
                    used.add(rel)
        missing = sorted(set(ours) - used)
        if missing:
            raise KeyError(f"{Path(source).name} has no place for diffusion weights {missing[:3]}")
        return save_safetensors(tensors, out, metadata)


def _frozen(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A base model file's tensors with ComfyUI container prefixes removed (`model.diffusion_model.`)."""
    sd = load_file(str(path))
    if any(k.startswith("model.diffusion_model.") for k in sd):  # a full checkpoint: keep the diffusion model
        sd = {k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    return {strip_model_prefix(k): v for k, v in sd.items()}


def load_base_model(path: str | Path, groups: Sequence[str] = ("attn",)) -> BaseModel:
    """Detect the family of a base model file and load it frozen, float32, on the CPU."""
    sd = load_state_dict(path)
    catalog = build_catalog({k: tuple(v.shape) for k, v in sd.items()}, groups)
    return BASE_MODEL_CLASSES[catalog.family](sd, catalog)


# ---------------------------------------------------------------------------------------------- WAN 2.1
def wan_config(sd: Mapping[str, torch.Tensor]) -> dict:
    """diffusers WanTransformer3DModel arguments read off a ComfyUI/original WAN state dict."""
    dim = sd["head.modulation"].shape[-1]
    heads = max(1, dim // 128)  # WAN's head width is 128 (ComfyUI detects it the same way)
    return dict(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=dim // heads,
                in_channels=sd["patch_embedding.weight"].shape[1], out_channels=sd["head.head.weight"].shape[0] // 4,
                text_dim=sd["text_embedding.0.weight"].shape[1], freq_dim=sd["time_embedding.0.weight"].shape[1],
                ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0],
                num_layers=1 + max(int(m.group(1)) for k in sd if (m := _BLOCK.match(k))),
                cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)


@dataclass
class Captions:
    """A batch of prompts as the base model reads them, with WAN's common zero padding already reduced to one
    row that stands for exp(log_padding) rows (see CollapsedPaddingCrossAttention): far less memory and work."""

    tokens: torch.Tensor  # [B, L', D]
    pooled: torch.Tensor | None = None  # [B, P] (SDXL)
    log_padding: float = 0.0
    repeat: int = 1  # each caption fills this many consecutive rows (one LoRA per caption, if any)

    def to(self, device: torch.device | str) -> Captions:
        return Captions(self.tokens.to(device), None if self.pooled is None else self.pooled.to(device),
                        self.log_padding, self.repeat)


def make_captions(tokens: Sequence[torch.Tensor], pooled: Sequence[torch.Tensor] | None = None,
                  repeat: int = 1) -> Captions:
    """Captions for prompts [L, D] (equal L), each repeated `repeat` times in a row (one per latent)."""
    if len({t.shape for t in tokens}) != 1:
        raise ValueError(f"caption shapes differ within a batch ({sorted({tuple(t.shape) for t in tokens})})")
    length = tokens[0].shape[0]
    real = max(_real_rows(t) for t in tokens)
    log_padding = 0.0
    if length - real > 1:
        tokens = [t[: real + 1] for t in tokens]
        log_padding = math.log(length - real)
    stacked = torch.stack(list(tokens)).repeat_interleave(repeat, dim=0)
    pooled_stacked = torch.stack(list(pooled)).repeat_interleave(repeat, dim=0) if pooled is not None else None
    return Captions(stacked, pooled_stacked, log_padding, repeat)


def _real_rows(tokens: torch.Tensor) -> int:
    """Rows up to the last one that is not all zero."""
    nonzero = (tokens.abs().amax(dim=-1) > 0).nonzero()
    return int(nonzero[-1]) + 1 if nonzero.numel() else 0


def as_captions(tokens: torch.Tensor | Captions, pooled: torch.Tensor | None = None) -> Captions:
    if isinstance(tokens, Captions):
        return tokens
    return make_captions(list(tokens), None if pooled is None else list(pooled))


class CollapsedPaddingCrossAttention:
    """A WAN cross-attention processor for trimmed prompts: the last key/value stands for `log_count` padding rows.

    Same computation as diffusers' WanAttnProcessor for text-only cross-attention (projections, per-token
    RMS norm of q and k, scaled dot-product attention, output projection), with an additive logit bias; LoRA
    hooks on to_q/to_k/to_v/to_out fire as usual.
    """

    def __init__(self) -> None:
        self.log_count = 0.0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        key = attn.norm_k(attn.to_k(encoder_hidden_states)).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        value = attn.to_v(encoder_hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        bias = None
        if self.log_count:
            bias = torch.zeros(key.shape[2], dtype=query.dtype, device=query.device)
            bias[-1] = self.log_count
            bias = bias.view(1, -1)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=bias)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class WanBase(BaseModel):
    family = wan.NAME

    def __init__(self, sd: Mapping[str, torch.Tensor], catalog: TargetCatalog, shift: float = 5.0) -> None:
        from diffusers import WanTransformer3DModel
        from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

        model = WanTransformer3DModel(**wan_config(sd))  # not on "meta": its rotary tables are built at init
        model.load_state_dict(convert_wan_transformer_to_diffusers(dict(sd)), strict=True)
        self.model = _frozen(model.float())
        self.catalog = catalog
        self.shift = shift
        self.modules = {t.path: self.model.get_submodule(comfy_to_diffusers_key(t.path + ".weight")[:-7])
                        for t in catalog.targets}
        self.cross_attention = CollapsedPaddingCrossAttention()  # one shared state: the batch's padding count
        for block in self.model.blocks:
            block.attn2.set_processor(self.cross_attention)

    def comfy_state_dict(self) -> dict[str, torch.Tensor]:
        return {diffusers_to_comfy_key(k): v for k, v in self.model.state_dict().items()}

    def forward(self, noisy: torch.Tensor, timestep: torch.Tensor, captions: Captions) -> torch.Tensor:
        """The velocity prediction, with the prompts' common zero padding collapsed (exact, much cheaper)."""
        self.cross_attention.log_count = captions.log_padding
        return self.model(hidden_states=noisy, timestep=timestep, encoder_hidden_states=captions.tokens,
                          return_dict=False)[0]

    def diffusion_loss(self, latents, tokens, pooled, generator, reduce=True):
        """Rectified-flow (flow matching) loss: x_t = (1 - s) x0 + s eps, target eps - x0, shifted s as WAN."""
        x0 = latents.to(self.device, torch.float32)
        eps = torch.randn(x0.shape, generator=generator).to(x0.device)
        s = torch.rand(x0.shape[0], generator=generator).to(x0.device)
        s = self.shift * s / (1 + (self.shift - 1) * s)
        view = s.view(-1, *([1] * (x0.dim() - 1)))
        noisy = (1 - view) * x0 + view * eps
        pred = self.forward(noisy, s * 1000, as_captions(tokens, pooled).to(x0.device))
        loss = (pred.float() - (eps - x0)).pow(2).flatten(1).mean(1)
        return loss.mean() if reduce else loss


# ------------------------------------------------------------------------------------------------- SDXL
class SharedCaptionCrossAttention:
    """SDXL cross-attention for batches in which each caption fills `repeat` consecutive rows: keys and values are
    computed once per distinct caption (exact; LoRA hooks on to_k/to_v see one row per caption, which is also one
    row per LoRA when each caption's rows share a LoRA). Anything unusual goes to diffusers' own processor."""

    def __init__(self) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.stock = AttnProcessor2_0()
        self.repeat = 1

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        r = self.repeat
        plain = (encoder_hidden_states is not None and attention_mask is None and hidden_states.ndim == 3
                 and attn.spatial_norm is None and attn.group_norm is None and not attn.norm_cross
                 and not attn.residual_connection and not args and not kwargs)
        if r == 1 or not plain or hidden_states.shape[0] % r:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        batch = hidden_states.shape[0]
        context = encoder_hidden_states[::r]
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(x.shape[0], -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key).repeat_interleave(r, 0), heads(value).repeat_interleave(r, 0)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def sdxl_unet_config(sd: Mapping[str, torch.Tensor]) -> dict:
    """diffusers UNet2DConditionModel arguments read off a ComfyUI (ldm/sgm) SDXL UNet state dict."""
    channels = sd["input_blocks.0.0.weight"].shape[0]
    downsamples = sorted(int(k.split(".")[1]) for k in sd if re.match(r"^input_blocks\.\d+\.0\.op\.weight$", k))
    n_input = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("input_blocks."))
    levels, current = [], []
    for i in range(1, n_input):
        if i in downsamples:
            levels.append(current)
            current = []
        else:
            current.append(i)
    levels.append(current)
    mult, depth = [], []
    for blocks in levels:
        mult.append(sd[f"input_blocks.{blocks[0]}.0.out_layers.3.weight"].shape[0] // channels)
        depth.append(sum(1 for k in sd if re.match(rf"^input_blocks\.{blocks[0]}\.1\.transformer_blocks\.\d+"
                                                       r"\.attn1\.to_q\.weight$", k)))
    widths = [channels * m for m in mult]
    head_width = 64
    return dict(
        sample_size=128, in_channels=sd["input_blocks.0.0.weight"].shape[1], out_channels=sd["out.2.weight"].shape[0],
        down_block_types=tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depth),
        up_block_types=tuple("CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depth)),
        block_out_channels=tuple(widths), layers_per_block=len(levels[0]),
        transformer_layers_per_block=tuple(max(1, d) for d in depth),
        attention_head_dim=tuple(max(1, w // head_width) for w in widths),
        cross_attention_dim=next(v.shape[1] for k, v in sd.items() if k.endswith("attn2.to_k.weight")),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=sd["label_emb.0.0.weight"].shape[1], norm_num_groups=32,
    )


class SdxlBase(BaseModel):
    family = sdxl.NAME
    TIME_IDS = (1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0)  # original size, crop, target size (SDXL defaults)

    def __init__(self, sd: Mapping[str, torch.Tensor], catalog: TargetCatalog) -> None:
        from diffusers import UNet2DConditionModel
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

        config = sdxl_unet_config(sd)
        prefixed = {"model.diffusion_model." + k: v for k, v in sd.items()}
        converted = convert_ldm_unet_checkpoint(prefixed, config)
        by_tensor = {id(v): k for k, v in sd.items()}
        self.comfy_names = {k: by_tensor[id(v)] for k, v in converted.items() if id(v) in by_tensor}
        diffusers_path = {c[:-len(".weight")]: d[:-len(".weight")]
                          for d, c in self.comfy_names.items() if d.endswith(".weight")}
        model = UNet2DConditionModel(**config)
        model.load_state_dict(converted, strict=True)
        self.model = _frozen(model.float())
        self.catalog = catalog
        self.modules = {t.path: self.model.get_submodule(diffusers_path[t.path]) for t in catalog.targets}
        self.cross_attention = SharedCaptionCrossAttention()
        for name, module in self.model.named_modules():
            if name.endswith(".attn2"):
                module.set_processor(self.cross_attention)
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float32) ** 2
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)

    def comfy_state_dict(self) -> dict[str, torch.Tensor]:
        state = self.model.state_dict()
        unnamed = sorted(set(state) - set(self.comfy_names))
        if unnamed:
            raise KeyError(f"no ComfyUI name known for diffusers UNet tensors {unnamed[:3]}")
        return {self.comfy_names[k]: v for k, v in state.items()}

    def diffusion_loss(self, latents, tokens, pooled, generator, reduce=True):
        """Epsilon-prediction loss on SDXL's scaled-linear DDPM schedule."""
        x0 = latents.to(self.device, torch.float32)
        eps = torch.randn(x0.shape, generator=generator).to(x0.device)
        t = torch.randint(0, 1000, (x0.shape[0],), generator=generator)
        abar = self.alphas_cumprod[t].to(x0.device).view(-1, 1, 1, 1)
        noisy = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
        time_ids = torch.tensor(self.TIME_IDS, device=x0.device).expand(x0.shape[0], -1)
        captions = as_captions(tokens, pooled)
        tokens, pooled = captions.tokens, captions.pooled
        self.cross_attention.repeat = captions.repeat
        pred = self.model(noisy, t.to(x0.device), encoder_hidden_states=tokens.to(x0.device),
                          added_cond_kwargs={"text_embeds": pooled.to(x0.device), "time_ids": time_ids},
                          return_dict=False)[0]
        loss = (pred.float() - eps).pow(2).flatten(1).mean(1)
        return loss.mean() if reduce else loss


def load_target_weights(path: str | Path, catalog: TargetCatalog) -> dict[str, torch.Tensor]:
    """Only the target matrices of a base model file (float32), without building the model."""
    from safetensors import safe_open

    wanted = {t.path: t for t in catalog.targets}
    out = {}
    with safe_open(str(path), framework="pt") as fh:
        for key in fh.keys():
            rel = strip_model_prefix(key)
            if rel.endswith(".weight") and rel[: -len(".weight")] in wanted:
                out[rel[: -len(".weight")]] = fh.get_tensor(key).float()
    missing = [p for p in wanted if p not in out]
    if missing:
        raise KeyError(f"{Path(path).name} lacks target weights {missing[:3]}")
    return out


# family name -> the diffusers model that trains LoRAs on it (a new family needs one here to be trained)
BASE_MODEL_CLASSES: dict[str, type[BaseModel]] = {WanBase.family: WanBase, SdxlBase.family: SdxlBase}
