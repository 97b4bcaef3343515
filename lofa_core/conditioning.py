"""Prompt conditions: what a checkpoint expects and how ComfyUI's tensors are turned into exactly that.

The hypernetwork must see at inference what it saw in training. For WAN the authors fed umT5-XXL tokens
[512, 4096] zero-padded past the prompt; ComfyUI's WAN CONDITIONING is [max(512, n+1), 4096] with exact zeros
after the prompt's EOS token. `prepare_condition` strips that padding and pads/truncates to the checkpoint's
length. SDXL CONDITIONING ([77k, 2048] + pooled [1280]) carries no zero padding and is used as given.
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


@dataclass(frozen=True)
class ConditionSpec:
    """What a checkpoint's condition input looks like."""

    kind: str = KIND_TEXT
    token_dim: int = 4096
    length: int | None = 512  # fixed token count (zero-padded); None = as many as the encoder gives
    strip_zero_padding: bool = True  # treat all-zero trailing rows as padding (umT5 in ComfyUI)
    pooled_dim: int = 0  # a pooled vector is required when > 0 (SDXL: 1280)
    encoder: str = "umT5-XXL (WAN 2.1 text encoder)"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping) -> ConditionSpec:
        return cls(**dict(data))


WAN_TEXT = ConditionSpec()
SDXL_TEXT = ConditionSpec(token_dim=2048, length=None, strip_zero_padding=False, pooled_dim=1280,
                          encoder="SDXL CLIP-L + CLIP-G text encoders")
DEFAULT_FOR_FAMILY = {"wan2.1-t2v": WAN_TEXT, "sdxl": SDXL_TEXT}


@dataclass(frozen=True)
class Condition:
    """A prepared condition: tokens [L, token_dim] and optional pooled [pooled_dim], float32 on CPU."""

    tokens: torch.Tensor
    pooled: torch.Tensor | None
    real_tokens: int  # prompt tokens before padding (for reporting)


def prepare_condition(tokens: torch.Tensor, pooled: torch.Tensor | None, spec: ConditionSpec) -> Condition:
    """Validate an encoder's output against `spec` and shape it the way the checkpoint was trained."""
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
