"""WAN text-to-video (2.1 1.3B / 14B, 2.2 5B and A14B experts, or any size): targets in the authors'
`VALID_LAYERS` order. All of them share key names; sizes name the model where they can (2.1 14B and the 2.2 A14B
experts have the same shapes: lofa_core.base_signature tells those apart)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from ..conditioning import ConditionSpec
from ..errors import ModelFamilyError
from ..lora_keys import STYLE_COMFYUI
from ..targets import GROUP_ATTENTION, GROUP_FFN, Target, TargetCatalog
from .spec import ModelFamily

NAME = "wan2.1-t2v"
# umT5-XXL tokens as ComfyUI's WAN CONDITIONING gives them ([max(512, n+1), 4096], zeros after EOS), taken as the
# authors fed them: 512 tokens, zero-padded
TEXT_CONDITION = ConditionSpec()
ATTENTION_TYPES = (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
)
FFN_TYPES = ("ffn.0", "ffn.2")
_BLOCK_WEIGHT = re.compile(r"^blocks\.(\d+)\.(.+)\.weight$")
# (dim, blocks, latent channels in) -> name
_KNOWN_SIZES = {(1536, 30, 16): "WAN 2.1 T2V 1.3B", (5120, 40, 16): "WAN 2.1 T2V 14B or a WAN 2.2 A14B expert",
                (3072, 30, 48): "WAN 2.2 TI2V 5B"}


def matches(rel: Mapping[str, tuple[int, ...]]) -> bool:
    return "blocks.0.self_attn.q.weight" in rel and "blocks.0.cross_attn.q.weight" in rel and (
        "head.modulation" in rel or "patch_embedding.weight" in rel
    )


def build(rel: Mapping[str, tuple[int, ...]], groups: tuple[str, ...]) -> TargetCatalog:
    if any(k.startswith("img_emb.") for k in rel):
        raise ModelFamilyError(
            "This is a WAN 2.1 image-to-video model (it has img_emb / k_img layers). LoFA's WAN support "
            "is for WAN 2.1 text-to-video; load the T2V model (e.g. wan2.1_t2v_1.3B)."
        )
    type_names = ATTENTION_TYPES + (FFN_TYPES if GROUP_FFN in groups else ())
    wanted = set(type_names if GROUP_ATTENTION in groups else FFN_TYPES)
    type_index = {name: i for i, name in enumerate(type_names)}
    targets = []
    depths = set()
    for key, shape in rel.items():
        m = _BLOCK_WEIGHT.match(key)
        if not m or m.group(2) not in wanted or len(shape) != 2:
            continue
        depth = int(m.group(1))
        depths.add(depth)
        targets.append(Target(f"blocks.{depth}.{m.group(2)}", shape[0], shape[1], depth, type_index[m.group(2)]))
    targets.sort(key=lambda t: (t.depth, t.type_index))
    num_depths = max(depths) + 1
    dim = rel["blocks.0.self_attn.q.weight"][0]
    in_channels = rel.get("patch_embedding.weight", (dim, 16))[1]
    name = _KNOWN_SIZES.get((dim, num_depths, in_channels), "WAN 2.1 T2V" if in_channels == 16 else "WAN 2.2 T2V")
    summary = f"{name} ({num_depths} blocks, dim {dim})"
    return TargetCatalog(NAME, type_names, num_depths, groups, tuple(targets), summary)


# diffusers' WanTransformer3DModel names -> ComfyUI/original names, per block.
_DIFFUSERS_TO_COMFY = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o",
    "attn1.norm_q": "self_attn.norm_q", "attn1.norm_k": "self_attn.norm_k",
    "attn2.norm_q": "cross_attn.norm_q", "attn2.norm_k": "cross_attn.norm_k",
    "norm2": "norm3", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
}
_DIFFUSERS_TOP = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "proj_out": "head.head",
    "patch_embedding": "patch_embedding",
}
_DIFFUSERS_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_BLOCK = re.compile(r"^blocks\.\d+$")
_COMFY_TO_DIFFUSERS = {v: k for k, v in _DIFFUSERS_TO_COMFY.items()}
_COMFY_TOP = {v: k for k, v in _DIFFUSERS_TOP.items()}


def _rename_module(path: str, block_map: dict[str, str], top_map: dict[str, str]) -> str:
    m = _DIFFUSERS_BLOCK.match(path)
    if m and m.group(2) in block_map:
        return f"blocks.{m.group(1)}.{block_map[m.group(2)]}"
    return top_map.get(path, path)


def _rename_key(key: str, block_map: dict[str, str], top_map: dict[str, str], head_table: tuple[str, str],
                block_table: tuple[str, str]) -> str:
    """Rename a state-dict key; the modulation tables are parameters whose own names differ too."""
    if key == head_table[0]:
        return head_table[1]
    module, _, param = key.rpartition(".")
    if _BLOCK.match(module) and param == block_table[0]:
        return f"{module}.{block_table[1]}"
    return f"{_rename_module(module, block_map, top_map)}.{param}"


def diffusers_to_comfy_path(path: str) -> str:
    """Map a diffusers WAN module path (blocks.3.attn1.to_q) to ComfyUI's (blocks.3.self_attn.q); else as is."""
    return _rename_module(path, _DIFFUSERS_TO_COMFY, _DIFFUSERS_TOP)


def diffusers_to_comfy_key(key: str) -> str:
    """Map a full diffusers WAN state-dict key to the ComfyUI/original key (parameters included)."""
    return _rename_key(key, _DIFFUSERS_TO_COMFY, _DIFFUSERS_TOP, ("scale_shift_table", "head.modulation"),
                       ("scale_shift_table", "modulation"))


def comfy_to_diffusers_key(key: str) -> str:
    """Inverse of `diffusers_to_comfy_key`."""
    return _rename_key(key, _COMFY_TO_DIFFUSERS, _COMFY_TOP, ("head.modulation", "scale_shift_table"),
                       ("modulation", "scale_shift_table"))


def _modelspec(base_description: str) -> tuple[str, str]:
    if "WAN 2.2" in base_description:
        return "wan2.2/lora", "https://github.com/Wan-Video/Wan2.2"
    return "wan2.1/lora", "https://github.com/Wan-Video/Wan2.1"


def _owns_module_path(path: str) -> bool:
    return path.startswith("blocks.")


FAMILY = ModelFamily(
    name=NAME, aliases=("wan",), matches=matches, build_catalog=build, text_condition=TEXT_CONDITION,
    lora_key_style=STYLE_COMFYUI, latent_channels_key="patch_embedding.weight",
    signature_types=("self_attn.q", "cross_attn.k"), owns_module_path=_owns_module_path, modelspec=_modelspec,
    to_module_path=diffusers_to_comfy_path,
)
