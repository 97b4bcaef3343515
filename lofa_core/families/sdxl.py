"""SDXL UNet: every transformer block's attn1/attn2 projections, depth = block order through the UNet."""

from __future__ import annotations

import re
from collections.abc import Mapping

from ..conditioning import ConditionSpec
from ..lora_keys import STYLE_KOHYA
from ..targets import GROUP_ATTENTION, GROUP_FFN, Target, TargetCatalog
from .spec import ModelFamily

NAME = "sdxl"
CONTEXT_DIM = 2048
ADM_DIM = 2816
ATTENTION_TYPES = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
)
FFN_TYPES = ("ff.net.0.proj", "ff.net.2")
# CLIP-L + CLIP-G tokens ([77k, 2048]) and the pooled CLIP-G vector, used as ComfyUI gives them
TEXT_CONDITION = ConditionSpec(token_dim=CONTEXT_DIM, length=None, strip_zero_padding=False, pooled_dim=1280,
                               encoder="SDXL CLIP-L + CLIP-G text encoders")
_SECTION_ORDER = {"input_blocks": 0, "middle_block": 1, "output_blocks": 2}
_BLOCK_WEIGHT = re.compile(
    r"^(input_blocks\.(\d+)\.\d+|middle_block\.\d+|output_blocks\.(\d+)\.\d+)"
    r"\.transformer_blocks\.(\d+)\.(.+)\.weight$"
)


def matches(rel: Mapping[str, tuple[int, ...]]) -> bool:
    """SDXL base: a UNet with an ADM (label_emb) input of 2816 and a 2048-wide cross-attention context."""
    adm = rel.get("label_emb.0.0.weight")
    if adm is None or len(adm) != 2 or adm[1] != ADM_DIM:
        return False
    return any(k.endswith("attn2.to_k.weight") and v[-1] == CONTEXT_DIM for k, v in rel.items())


def _block_order(m: re.Match) -> tuple[int, int, int]:
    section = m.group(1).split(".")[0]
    index = int(m.group(2) or m.group(3) or 0)
    return (_SECTION_ORDER[section], index, int(m.group(4)))


def build(rel: Mapping[str, tuple[int, ...]], groups: tuple[str, ...]) -> TargetCatalog:
    type_names = ATTENTION_TYPES + (FFN_TYPES if GROUP_FFN in groups else ())
    wanted = set(type_names if GROUP_ATTENTION in groups else FFN_TYPES)
    type_index = {name: i for i, name in enumerate(type_names)}
    found = []
    for key, shape in rel.items():
        m = _BLOCK_WEIGHT.match(key)
        if m and m.group(5) in wanted and len(shape) == 2:
            found.append((_block_order(m), f"{m.group(1)}.transformer_blocks.{m.group(4)}", m.group(5), shape))
    blocks = sorted({(order, block) for order, block, _, _ in found})
    depth_of = {block: d for d, (_, block) in enumerate(blocks)}
    targets = sorted(
        (Target(f"{block}.{name}", shape[0], shape[1], depth_of[block], type_index[name])
         for _, block, name, shape in found),
        key=lambda t: (t.depth, t.type_index),
    )
    channels = rel.get("input_blocks.0.0.weight", (0,))[0]
    summary = f"SDXL UNet ({len(blocks)} transformer blocks, {channels} base channels)"
    return TargetCatalog(NAME, type_names, len(blocks), groups, tuple(targets), summary)


def _owns_module_path(path: str) -> bool:
    return path.startswith(("input_blocks.", "middle_block.", "output_blocks."))


def _modelspec(base_description: str) -> tuple[str, str]:
    return "stable-diffusion-xl-v1-base/lora", "https://github.com/Stability-AI/generative-models"


# kohya names load on every ComfyUI version and in other tools
FAMILY = ModelFamily(
    name=NAME, aliases=(), matches=matches, build_catalog=build, text_condition=TEXT_CONDITION,
    lora_key_style=STYLE_KOHYA, latent_channels_key="input_blocks.0.0.weight",
    signature_types=("attn1.to_q", "attn2.to_k"), owns_module_path=_owns_module_path, modelspec=_modelspec,
)
