"""Prompt conditions: what a checkpoint expects and how ComfyUI's tensors are turned into exactly that.

Three kinds of user prompt (paper Sec. 4):

* text: for WAN the authors fed umT5-XXL tokens [512, 4096] zero-padded past the prompt; ComfyUI's WAN
  CONDITIONING is [max(512, n+1), 4096] with exact zeros after the EOS token, so `prepare_text_condition` strips that
  padding and pads/truncates to the checkpoint's length. SDXL CONDITIONING ([77k, 2048] + pooled [1280]) is
  used as given.
* image (a style or face image): one feature of ComfyUI's CLIP_VISION_OUTPUT, chosen by the checkpoint:
  `penultimate_hidden_states` (default; [257, width] tokens), `last_hidden_state` or the pooled `image_embeds`.
  A checkpoint may mix a second pooled feature in (DiffLoRA's Mixed Image Features: e.g. a face crop, or the
  same image through another CLIP model): both are `image_embeds`, concatenated into one condition token that
  the checkpoint's gate network splits, scores and combines.
* pose: a batch of rendered pose frames (ComfyUI IMAGE [T, H, W, 3]); any count and size: resampled uniformly
  in time to the checkpoint's frame count, letterboxed to a square (black bars) and resized.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import ConditionError

log = logging.getLogger(__name__)

KIND_TEXT = "text"
KIND_IMAGE = "image"
KIND_POSE = "pose"
KINDS = (KIND_TEXT, KIND_IMAGE, KIND_POSE)
IMAGE_FEATURES = ("penultimate_hidden_states", "last_hidden_state", "image_embeds")
CLIP_VISION_NAMES = {1024: "CLIP ViT-L/14", 1280: "CLIP ViT-H/14", 1664: "CLIP ViT-bigG/14"}
CLIP_PROJECTION_NAMES = {768: "CLIP ViT-L/14", 1024: "CLIP ViT-H/14", 1280: "CLIP ViT-bigG/14"}
MAX_POSE_FRAMES = 256


@dataclass(frozen=True)
class ConditionSpec:
    """What a checkpoint's condition input looks like."""

    kind: str = KIND_TEXT
    token_dim: int = 4096
    length: int | None = 512  # fixed token count (zero-padded); None = as many as the encoder gives
    strip_zero_padding: bool = True  # treat all-zero trailing rows as padding (umT5 in ComfyUI)
    pooled_dim: int = 0  # a pooled vector is required when > 0 (SDXL: 1280)
    encoder: str = "umT5-XXL (WAN 2.1 text encoder)"
    image_feature: str = ""  # image: which CLIP_VISION_OUTPUT field (IMAGE_FEATURES)
    frames: int = 0  # pose: frames the encoder takes
    frame_size: int = 0  # pose: frames are letterboxed and resized to frame_size x frame_size
    second_dim: int = 0  # image: width of a second pooled image feature mixed in by a gate; 0 = none
    second_encoder: str = ""  # image: what produces that second feature

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping) -> ConditionSpec:
        spec = cls(**dict(data))
        if spec.kind not in KINDS:
            raise ValueError(f"unknown condition kind {spec.kind!r}; this ComfyUI-LoFA knows {KINDS}")
        return spec

    def describe(self) -> str:
        if self.kind == KIND_IMAGE:
            mixed = (f", mixed with image_embeds of {self.second_encoder} ({self.second_dim} wide) on "
                     f"clip_vision_output_2" if self.second_dim else "")
            return f"an image condition ({self.image_feature} of {self.encoder}, {self.token_dim} wide{mixed})"
        if self.kind == KIND_POSE:
            return f"a pose condition ({self.frames} frames at {self.frame_size}x{self.frame_size})"
        return f"a text condition ({self.encoder})"


def image_spec(width: int, feature: str = "penultimate_hidden_states", name: str | None = None,
               second_dim: int = 0, second_name: str | None = None) -> ConditionSpec:
    """Spec of an image condition read from CLIP_VISION_OUTPUT.`feature` (`width` wide), optionally mixed with
    a second CLIP_VISION_OUTPUT's image_embeds (`second_dim` wide; then `feature` must be image_embeds too)."""
    if feature not in IMAGE_FEATURES:
        raise ValueError(f"image feature must be one of {IMAGE_FEATURES}, not {feature!r}")
    if second_dim and feature != "image_embeds":
        raise ValueError("mixing two image features works on pooled features: use image_feature='image_embeds'")
    names = CLIP_PROJECTION_NAMES if feature == "image_embeds" else CLIP_VISION_NAMES
    second = (second_name or CLIP_PROJECTION_NAMES.get(second_dim, f"a CLIP vision model ({second_dim} wide)")
              if second_dim else "")
    return ConditionSpec(kind=KIND_IMAGE, token_dim=width, length=None, strip_zero_padding=False,
                         encoder=name or names.get(width, f"a CLIP vision model ({width} wide)"),
                         image_feature=feature, second_dim=second_dim, second_encoder=second)


def pose_spec(frames: int = 16, frame_size: int = 64) -> ConditionSpec:
    return ConditionSpec(kind=KIND_POSE, token_dim=3, length=None, strip_zero_padding=False,
                         encoder="rendered pose frames (IMAGE batch)", frames=frames, frame_size=frame_size)


@dataclass(frozen=True)
class Condition:
    """A prepared condition, float32 on CPU: tokens [L, token_dim] (text, image) and optional pooled
    [pooled_dim], or pose frames [3, T, S, S] in `tokens` with kind "pose"."""

    tokens: torch.Tensor
    pooled: torch.Tensor | None
    real_tokens: int  # prompt tokens before padding (for reporting)
    kind: str = KIND_TEXT


def check_kind(spec: ConditionSpec, kind: str) -> None:
    if kind != spec.kind:
        raise ConditionError(
            f"This LoFA checkpoint expects {spec.describe()}, but it was given a {kind} condition. Connect a "
            f"LoFA {spec.kind.capitalize()} Condition node (or, for text, the CLIP Text Encode output)."
        )


def prepare_image_condition(features: Mapping[str, torch.Tensor], spec: ConditionSpec,
                            second: Mapping[str, torch.Tensor] | None = None) -> Condition:
    """One CLIP_VISION_OUTPUT field -> [L, width] tokens (pooled image_embeds -> one token); with a mixing
    checkpoint, the second output's image_embeds appended to that token ([1, width + second_dim])."""
    check_kind(spec, KIND_IMAGE)
    tokens = _image_tokens(features, spec.image_feature, spec.token_dim, spec.encoder, "")
    if spec.second_dim:
        if second is None:
            raise ConditionError(f"This LoFA checkpoint mixes two image features: connect a second CLIP Vision "
                                 f"Encode ({spec.second_encoder}) to clip_vision_output_2 of LoFA Image Condition.")
        extra = _image_tokens(second, "image_embeds", spec.second_dim, spec.second_encoder, "clip_vision_output_2: ")
        tokens = torch.cat([tokens, extra], dim=-1)
    elif second is not None:
        raise ConditionError("This LoFA checkpoint takes one image feature; disconnect clip_vision_output_2 of "
                             "LoFA Image Condition.")
    return Condition(tokens=tokens, pooled=None, real_tokens=tokens.shape[0], kind=KIND_IMAGE)


def _image_tokens(features: Mapping[str, torch.Tensor] | None, feature: str, width: int, encoder: str,
                  where: str) -> torch.Tensor:
    """One validated feature of a CLIP_VISION_OUTPUT as [L, width] float32 tokens on CPU."""
    value = features.get(feature) if features is not None else None
    if value is None:
        raise ConditionError(f"{where}The CLIP vision output has no {feature}; this LoFA checkpoint needs it. "
                             f"Use ComfyUI's CLIP Vision Encode on {encoder}.")
    value = value.detach().float().cpu()
    pooled = feature == "image_embeds"
    value = value.reshape(-1, value.shape[-1]) if pooled else value.reshape(-1, *value.shape[-2:])
    if value.shape[0] > 1:
        log.warning("LoFA uses the first of %d encoded images", value.shape[0])
    tokens = value[:1] if pooled else value[0]  # pooled: one condition token
    if tokens.shape[-1] != width:
        names = CLIP_PROJECTION_NAMES if pooled else CLIP_VISION_NAMES
        found = names.get(tokens.shape[-1], "another CLIP vision model")
        raise ConditionError(
            f"{where}This LoFA checkpoint expects {feature} {width} wide from {encoder}, but the CLIP vision "
            f"output is {tokens.shape[-1]} wide ({found}). Load {encoder} in Load CLIP Vision."
        )
    if not torch.isfinite(tokens).all():
        raise ConditionError(f"{where}The CLIP vision features contain NaN or Inf; re-encode the image.")
    return tokens


def prepare_pose_condition(images: torch.Tensor, spec: ConditionSpec) -> Condition:
    """ComfyUI IMAGE [T, H, W, 3] in [0, 1] -> frames [3, spec.frames, S, S] (time-resampled, letterboxed)."""
    check_kind(spec, KIND_POSE)
    if images is None or not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[-1] not in (3, 4):
        shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ConditionError(f"Pose frames must be an IMAGE batch [frames, height, width, 3]; got {shape}. Load "
                             f"the pose video or frames with a Load Video / Load Image node.")
    if not 1 <= images.shape[0] <= MAX_POSE_FRAMES:
        raise ConditionError(f"Pose input has {images.shape[0]} frames; LoFA takes 1 to {MAX_POSE_FRAMES} (they are "
                             f"resampled to {spec.frames}). Trim the video.")
    frames = images[..., :3].detach().float().cpu().clamp(0, 1)
    if not torch.isfinite(frames).all():
        raise ConditionError("The pose frames contain NaN or Inf.")
    index = torch.linspace(0, frames.shape[0] - 1, spec.frames).round().long()
    frames = frames[index].permute(0, 3, 1, 2)  # [T, 3, H, W]
    h, w = frames.shape[-2:]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    frames = F.pad(frames, (left, side - w - left, top, side - h - top))
    frames = F.interpolate(frames, size=(spec.frame_size, spec.frame_size), mode="bilinear", antialias=True,
                           align_corners=False)
    return Condition(tokens=frames.permute(1, 0, 2, 3).contiguous(), pooled=None, real_tokens=spec.frames,
                     kind=KIND_POSE)

def prepare_text_condition(tokens: torch.Tensor, pooled: torch.Tensor | None, spec: ConditionSpec) -> Condition:
    """Validate an encoder's output against `spec` and shape it the way the checkpoint was trained."""
    check_kind(spec, KIND_TEXT)
    if tokens is None or not isinstance(tokens, torch.Tensor):
        raise ConditionError("No prompt condition was given. Connect the output of a CLIP Text Encode node.")
    if tokens.dim() == 3:
        if tokens.shape[0] != 1:
            log.warning("LoFA uses the first of %d batched conditions", tokens.shape[0])
        tokens = tokens[0]
    if tokens.dim() != 2 or tokens.shape[0] == 0:
        raise ConditionError(f"The prompt condition is empty or malformed (shape {list(tokens.shape)}). "
                             f"Connect a CLIP Text Encode output with a non-empty prompt.")
    if tokens.shape[-1] != spec.token_dim:
        raise ConditionError(
            f"This LoFA checkpoint expects {spec.token_dim}-wide condition tokens from the {spec.encoder}, but "
            f"the CONDITIONING has {tokens.shape[-1]}-wide tokens{_guess_encoder(tokens.shape[-1])}. Encode the "
            f"prompt with the text encoder of the base model the checkpoint was trained for."
        )
    tokens = tokens.detach().float().cpu()
    if not torch.isfinite(tokens).all():
        raise ConditionError("The prompt condition contains NaN or Inf values; re-encode the prompt.")
    real = tokens.shape[0]
    if spec.strip_zero_padding:
        nonzero = (tokens.abs().sum(dim=-1) > 0).nonzero()
        if nonzero.numel() == 0:
            raise ConditionError("The prompt condition is all zeros (an empty prompt?). Type a prompt.")
        real = int(nonzero[-1]) + 1
        tokens = tokens[:real]
        if real == 1:  # umT5 of "" is its end-of-text token alone
            log.warning("The prompt is empty (only the end-of-text token): LoFA predicts a LoRA for no particular "
                        "subject; type a prompt in CLIP Text Encode.")
    if spec.length is not None:
        if real > spec.length:
            log.warning("prompt has %d tokens; LoFA uses the first %d, as in training", real, spec.length)
            tokens = tokens[: spec.length]
        elif real < spec.length:
            tokens = torch.cat([tokens, tokens.new_zeros(spec.length - real, spec.token_dim)])
    pooled_out = None
    if spec.pooled_dim:
        if pooled is None:
            raise ConditionError(
                f"This LoFA checkpoint also needs the pooled text embedding ({spec.pooled_dim} wide) that the "
                f"{spec.encoder} produce; the CONDITIONING has none. Use a CLIP Text Encode node on the base "
                f"model's CLIP."
            )
        pooled_out = pooled.detach().float().cpu().reshape(-1, pooled.shape[-1])[0]
        if pooled_out.shape[0] != spec.pooled_dim:
            raise ConditionError(f"The pooled text embedding is {pooled_out.shape[0]} wide; this LoFA checkpoint "
                                 f"expects {spec.pooled_dim} from the {spec.encoder}.")
        if not torch.isfinite(pooled_out).all():
            raise ConditionError("The pooled text embedding contains NaN or Inf values; re-encode the prompt with "
                                 "CLIP Text Encode.")
    return Condition(tokens=tokens, pooled=pooled_out, real_tokens=min(real, spec.length or real))


def _guess_encoder(width: int) -> str:
    names = {4096: "umT5-XXL / T5-XXL", 2048: "SDXL CLIP-L + CLIP-G", 768: "SD1.x CLIP-L", 1024: "SD2.x OpenCLIP-H"}
    return f" (that looks like {names[width]})" if width in names else ""


def collapse_padding(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[L, D] tokens -> (distinct leading tokens plus one zero row, log-multiplicities).

    The zero rows that pad a WAN prompt to 512 are identical, so the hypernetwork attends to them as one key with
    log(count) added to its logit: exactly the same attention, a fraction of the work.
    """
    nonzero = (tokens.abs().sum(dim=-1) > 0).nonzero()
    real = int(nonzero[-1]) + 1 if nonzero.numel() else 0
    padding = tokens.shape[0] - real
    if padding <= 1:
        return tokens, torch.zeros(tokens.shape[0])
    kept = torch.cat([tokens[:real], tokens.new_zeros(1, tokens.shape[1])])
    log_counts = torch.zeros(real + 1)
    log_counts[-1] = math.log(padding)
    return kept, log_counts


def stack_collapsed(conditions: list[Condition]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Collapsed tokens of several prompts in one batch: (tokens [S, L, D], log_counts [S, L], pooled)."""
    parts = [collapse_padding(c.tokens) for c in conditions]
    length = max(t.shape[0] for t, _ in parts)
    tokens = torch.stack([F.pad(t, (0, 0, 0, length - t.shape[0])) for t, _ in parts])
    log_counts = torch.stack([F.pad(c, (0, length - c.shape[0]), value=-math.inf) for _, c in parts])
    pooled = torch.stack([c.pooled for c in conditions]) if conditions[0].pooled is not None else None
    return tokens, log_counts, pooled


def prepare_condition(spec: ConditionSpec, kind: str, *, tokens: torch.Tensor | None = None,
                      pooled: torch.Tensor | None = None, image: Mapping[str, torch.Tensor] | None = None,
                      image_2: Mapping[str, torch.Tensor] | None = None,
                      frames: torch.Tensor | None = None) -> Condition:
    """Prepare a condition of `kind` for a checkpoint, with a clear error if the checkpoint wants another kind."""
    check_kind(spec, kind)
    if kind == KIND_IMAGE:
        return prepare_image_condition(image, spec, image_2)
    if kind == KIND_POSE:
        return prepare_pose_condition(frames, spec)
    return prepare_text_condition(tokens, pooled, spec)
