"""The condition cache: prompts encoded once, stored exactly as ComfyUI's CONDITIONING would hold them.

* WAN: umT5-XXL (`UMT5EncoderModel`) on the prompt plus its EOS token, untruncated; the rows are ComfyUI's
  CONDITIONING rows before its zero padding (which `prepare_condition` re-creates identically at inference).
* SDXL: CLIP-L and CLIP-G penultimate hidden states (no final LayerNorm) over 77 tokens, concatenated to
  [77, 2048], plus CLIP-G's projected pooled embedding [1280], as ComfyUI's SDXL CLIP gives them.

Encoders load from local folders with transformers (`local_files_only`): nothing is downloaded. A cache file
`conditions/<hash>.safetensors` holds "tokens" [n, D] (and "pooled"); identical prompts share one file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import torch

from lofa_core.fileio import save_safetensors

from .dataset import metadata_path, read_records


class UMT5TextEncoder:
    """umT5 encoder of WAN 2.1 from a local transformers folder (config, weights, tokenizer)."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu") -> None:
        from transformers import AutoTokenizer, UMT5EncoderModel

        self.name = f"umt5:{Path(folder).name}"
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.model = UMT5EncoderModel.from_pretrained(str(folder), local_files_only=True,
                                                      dtype=torch.float32).to(device).eval()
        self.device = torch.device(device)

    @torch.no_grad()
    def encode(self, prompt: str) -> tuple[torch.Tensor, None]:
        ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"].to(self.device)  # ends with EOS
        return self.model(input_ids=ids).last_hidden_state[0].float().cpu(), None


class SDXLClipTextEncoder:
    """SDXL's CLIP-L (`folder/clip_l`) and CLIP-G with projection (`folder/clip_g`), local transformers folders."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu") -> None:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        folder = Path(folder)
        self.name = f"sdxl-clip:{folder.name}"
        self.tok_l = CLIPTokenizer.from_pretrained(str(folder / "clip_l"), local_files_only=True)
        self.tok_g = CLIPTokenizer.from_pretrained(str(folder / "clip_g"), local_files_only=True)
        self.clip_l = CLIPTextModel.from_pretrained(str(folder / "clip_l"), local_files_only=True).to(device).eval()
        self.clip_g = CLIPTextModelWithProjection.from_pretrained(str(folder / "clip_g"), local_files_only=True
                                                                  ).to(device).eval()
        self.device = torch.device(device)

    @torch.no_grad()
    def encode(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        ids_l = self.tok_l(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        ids_g = self.tok_g(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        out_l = self.clip_l(input_ids=ids_l["input_ids"].to(self.device), output_hidden_states=True)
        out_g = self.clip_g(input_ids=ids_g["input_ids"].to(self.device), output_hidden_states=True)
        tokens = torch.cat([out_l.hidden_states[-2][0], out_g.hidden_states[-2][0]], dim=-1)
        return tokens.float().cpu(), out_g.text_embeds[0].float().cpu()


def load_text_encoder(folder: str | Path, family: str, device: str | torch.device = "cpu"):
    if family == "sdxl":
        return SDXLClipTextEncoder(folder, device)
    return UMT5TextEncoder(folder, device)


def cache_name(encoder_name: str, prompt: str) -> str:
    return hashlib.sha256(f"{encoder_name}\n{prompt}".encode()).hexdigest()[:16] + ".safetensors"


def encode_prompts(encoder, prompts: Iterable[str], cache_dir: Path) -> dict[str, Path]:
    """Encode each distinct prompt once into `cache_dir`; returns prompt -> cache file."""
    out = {}
    for prompt in dict.fromkeys(prompts):
        if not prompt or not prompt.strip():
            raise ValueError("an empty prompt cannot be encoded")
        path = cache_dir / cache_name(encoder.name, prompt)
        if not path.exists():
            tokens, pooled = encoder.encode(prompt)
            tensors = {"tokens": tokens} | ({"pooled": pooled} if pooled is not None else {})
            try:
                save_safetensors(tensors, path, {"prompt": prompt, "encoder": encoder.name})
            except FileExistsError:  # written meanwhile by another process
                pass
        out[prompt] = path
    return out


def encode_dataset(folder: str | Path, encoder) -> int:
    """Fill in `condition.embedding` for every text sample with a prompt; rewrites the metadata atomically."""
    folder = Path(folder)
    records = read_records(folder)
    prompts = [r["condition"]["prompt"] for r in records if (r.get("condition") or {}).get("prompt")]
    files = encode_prompts(encoder, prompts, folder / "conditions")
    changed = 0
    for rec in records:
        cond = rec.get("condition") or {}
        if cond.get("prompt"):
            rel = str(files[cond["prompt"]].relative_to(folder))
            changed += cond.get("embedding") != rel
            cond["embedding"] = rel
    write_metadata(folder, records)
    return changed


def write_metadata(folder: Path, records: list[dict]) -> Path:
    path = metadata_path(folder) if any((folder / n).exists() for n in ("metadata.jsonl", "metadata.json")) \
        else folder / "metadata.jsonl"
    text = (json.dumps(records, indent=1) if path.suffix == ".json"
            else "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    from lofa_core.fileio import publish_new_file

    return publish_new_file(path, lambda tmp: Path(tmp).write_text(text), overwrite=True)
