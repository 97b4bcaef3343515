"""LoFA Predict LoRA: MODEL + LOFA_MODEL + a prompt -> LORA_MODEL (+ Stage-I response maps).

The prompt is a text CONDITIONING (CLIP Text Encode) or a LOFA_CONDITION from the LoFA condition nodes (text,
image or pose); exactly one of the two is connected.
"""

from __future__ import annotations

from ..lofa_core import base_signature
from ..lofa_core.errors import ConditionError, LoFAError, ModelFamilyError
from ..lofa_core.families import build_catalog
from ..lofa_core.file_hash import sha256_file
from ..lofa_core.lora_formats import PredictedLoRA, to_lora_model
from ..lofa_core.lora_metadata import prediction_metadata
from ..lofa_core.predict import predict, shape_groups, truncate_rank
from ..lofa_core.targets import check_compatible, select_targets
from . import prediction_cache
from .comfy_compat import Progress, base_weight, intermediate_device, log, model_file_name, model_weight_shapes
from .condition_nodes import LoFACondition, from_conditioning

CATEGORY = "LoFA"
TARGET_CHOICES = ["all", "self-attention", "cross-attention"]
BASE_MODEL_CHECKS = ["refuse", "warn"]


class LoFAPredictLoRA:
    DESCRIPTION = ("Predicts a personalised LoRA for the MODEL from a prompt in one forward pass of the LoFA "
                   "hypernetwork (no training). Reads the base weights without copying or changing the MODEL.")
    CATEGORY = CATEGORY
    FUNCTION = "predict"
    RETURN_TYPES = ("LORA_MODEL", "LOFA_RESPONSE")
    RETURN_NAMES = ("lora", "response")
    OUTPUT_TOOLTIPS = (
        "The predicted LoRA (ComfyUI LORA_MODEL dict): connect to LoFA Apply LoRA, LoFA Save LoRA or ComfyUI's "
        "Load LoRA Model.",
        "Stage-I response maps (which weights the LoRA changes by more than tau): connect to LoFA Response Map "
        "Preview.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The base model (WAN 2.1 T2V or SDXL) the LoFA checkpoint was "
                                               "trained for."}),
                "lofa_model": ("LOFA_MODEL", {"tooltip": "From Load LoFA Model."}),
                "targets": (TARGET_CHOICES, {"default": "all", "tooltip": "Which attention layers get a LoRA."}),
                "rank": ("INT", {"default": 0, "min": 0, "max": 1024, "tooltip": "0 = the checkpoint's rank; "
                                 "smaller = best low-rank approximation (smaller file, slightly different)."}),
                "batch_size": ("INT", {"default": 8, "min": 1, "max": 512, "tooltip": "Weight matrices per "
                                       "forward pass. Lower it if the GPU runs out of memory."}),
            },
            "optional": {
                "conditioning": ("CONDITIONING", {"tooltip": "A text prompt, from CLIP Text Encode on the base "
                                                             "model's text encoder (first entry used)."}),
                "condition": ("LOFA_CONDITION", {"tooltip": "Or a prompt from a LoFA Text / Image / Pose Condition "
                                                            "node."}),
                "base_model_check": (BASE_MODEL_CHECKS, {
                    "default": "refuse",
                    "tooltip": "When the MODEL has the right shapes but not the weights of the base model the LoFA "
                               "checkpoint was trained on (e.g. WAN 2.1 14B vs a WAN 2.2 A14B expert, or a "
                               "fine-tune): refuse, or warn in the log and predict anyway."}),
            },
        }

    def predict(self, model, lofa_model, conditioning=None, targets="all", rank=0, batch_size=8, condition=None,
                base_model_check="refuse"):
        ckpt = lofa_model.checkpoint
        model_catalog = build_catalog(model_weight_shapes(model), ckpt.catalog.groups)
        check_compatible(ckpt.catalog, model_catalog, ckpt.name)
        chosen = select_targets(ckpt.catalog, targets)
        if not chosen.targets:
            raise LoFAError(f"No '{targets}' layers are among the targets of '{ckpt.name}'; choose 'all'.")
        condition = _prompt(conditioning, condition).prepare(ckpt.condition)

        def read(t):
            return base_weight(model, t.key)

        model_name = _model_name(model_file_name(model), model_catalog)
        _check_base_model(ckpt, model_catalog, read, model_name, base_model_check)

        prompt_digest = prediction_cache.condition_digest(condition)
        cache_key = prediction_cache.key(
            prediction_cache.file_identity(lofa_model.path), str(lofa_model.dtype), targets, rank,
            prediction_cache.weights_fingerprint(chosen.targets, read), prompt_digest)
        cached = prediction_cache.get(cache_key)
        if cached is not None:
            log.info("LoFA: same checkpoint, base weights and prompt as before: reusing the predicted LoRA")
            return cached
        device = lofa_model.load()
        progress = Progress(len(shape_groups(chosen.targets, batch_size)))
        result = predict(ckpt, chosen.targets, read, condition,
                         device=device, dtype=lofa_model.dtype, chunk_size=batch_size,
                         output_device=intermediate_device(), on_chunk=progress)
        lora = result.lora
        own_rank = next(iter(lora.factors.values())).rank
        if rank > own_rank:
            log.warning("LoFA: rank %d is above the checkpoint's rank %d; the LoRA keeps rank %d (set rank 0 for the "
                        "checkpoint's own, or lower to shrink it)", rank, own_rank, own_rank)
        elif rank:
            lora = PredictedLoRA(lora.family, {p: truncate_rank(f, rank) for p, f in lora.factors.items()})
        log.info("LoFA: predicted a rank-%d LoRA for %d layers (%d prompt tokens); %.1f%% of weights respond",
                 next(iter(lora.factors.values())).rank, len(lora), condition.real_tokens,
                 100 * result.response.mean_active())
        metadata = prediction_metadata(
            checkpoint=ckpt.name, checkpoint_sha256=sha256_file(lofa_model.path), base_model=model_name,
            prompt_kind=condition.kind, prompt_digest=prompt_digest, targets=targets, layers=len(lora))
        output = (to_lora_model(lora, metadata=metadata), result.response)
        prediction_cache.put(cache_key, output)
        return output


def _model_name(file_name: str | None, catalog) -> str:
    return f"{file_name}, {catalog.describe()}" if file_name else catalog.describe()


def _check_base_model(ckpt, model_catalog, read, model_name: str, mode: str) -> None:
    """Same shapes are not the same model: compare the MODEL's weights with the checkpoint's base signature."""
    signature = ckpt.base_signature
    if signature is None:
        return
    difference = base_signature.distance(signature, model_catalog, read)
    if difference <= base_signature.SAME_MODEL_TOLERANCE:
        return
    message = (f"LoFA checkpoint '{ckpt.name}' was trained on {signature.name}, but this MODEL ({model_name}) has "
               f"other weights: they differ from that model's by {difference:.0%} where the checkpoint recorded them "
               f"(the same model stored in another precision or quantised differs by under "
               f"{base_signature.SAME_MODEL_TOLERANCE:.0%}). Models with the same layers and shapes can still be "
               f"different models, e.g. WAN 2.1 T2V 14B and the WAN 2.2 A14B high- and low-noise experts.")
    if mode == "warn":
        log.warning("LoFA: %s Predicting anyway (base_model_check is 'warn').", message)
        return
    raise ModelFamilyError(f"{message} Load {signature.name} as the MODEL, or set base_model_check to 'warn' to "
                           f"use this checkpoint on a fine-tuned or merged variant of it anyway.")


def _prompt(conditioning, condition: LoFACondition | None) -> LoFACondition:
    if (conditioning is None) == (condition is None):
        raise ConditionError("Connect exactly one prompt to LoFA Predict LoRA: a text CONDITIONING (CLIP Text "
                             "Encode) or a LOFA_CONDITION (LoFA Text / Image / Pose Condition).")
    if condition is not None:
        return condition
    if conditioning and len(conditioning) > 1:
        log.warning("LoFA uses the first of %d conditionings (combine prompts before encoding instead).",
                    len(conditioning))
    return from_conditioning(conditioning)
