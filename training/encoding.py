"""The condition cache: prompts encoded once, stored exactly as ComfyUI's CONDITIONING would hold them.

* WAN: umT5-XXL (`UMT5EncoderModel`) on the prompt plus its EOS token, untruncated; the rows are ComfyUI's
  CONDITIONING rows before its zero padding (which `prepare_text_condition` re-creates identically at inference).
* SDXL: CLIP-L and CLIP-G penultimate hidden states (no final LayerNorm) over 77 tokens, concatenated to
  [77, 2048], plus CLIP-G's projected pooled embedding [1280], as ComfyUI's SDXL CLIP gives them.

* Images (style, face): CLIP vision (`CLIPVisionModelWithProjection`) features as ComfyUI's CLIP Vision Encode
  gives them: `last_hidden_state`, `penultimate_hidden_states` and `image_embeds`, after the usual CLIP
  preprocessing (shorter side resized to the model's size, bicubic with antialiasing, centre crop, 8-bit levels,
  CLIP mean/std).

Encoders load from local folders with transformers (`local_files_only`): nothing is downloaded. A cache file
`conditions/<hash>.safetensors` holds "tokens" [n, D] (and "pooled") for a prompt, or the three image features
for an image; identical inputs share one file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import torch

from lofa_core.families import sdxl, wan
from lofa_core.fileio import publish_new_file, save_safetensors

from .dataset import metadata_path, read_records


def encoder_identity(kind: str, folder: str | Path) -> str:
    """Names an encoder in cache keys: folder name plus its files' names, sizes and modification times, so two
    models in folders of the same name, or a replaced model, never share cached embeddings."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    stamp = "\n".join(f"{p.relative_to(folder)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return f"{kind}:{folder.name}:{hashlib.sha256(stamp.encode()).hexdigest()[:12]}"


class UMT5TextEncoder:
    """umT5 encoder of WAN 2.1 from a local transformers folder (config, weights, tokenizer)."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu") -> None:
        from transformers import AutoTokenizer, UMT5EncoderModel

        self.name = encoder_identity("umt5", folder)
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
        self.name = encoder_identity("sdxl-clip", folder)
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


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(image: torch.Tensor, size: int) -> torch.Tensor:
    """IMAGE-layout [B, H, W, 3] in [0, 1] -> normalised CLIP pixels [B, 3, size, size] (centre crop)."""
    x = image[..., :3].movedim(-1, 1).float()
    if x.shape[-2:] != (size, size):
        scale = size / min(x.shape[-2:])
        x = torch.nn.functional.interpolate(x, size=(round(scale * x.shape[-2]), round(scale * x.shape[-1])),
                                            mode="bicubic", antialias=True)
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        x = x[..., top:top + size, left:left + size]
    x = (x * 255).clamp(0, 255).round() / 255
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class CLIPVisionFeatures:
    """A CLIP vision model from a local transformers folder, giving ComfyUI's CLIP_VISION_OUTPUT fields."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu") -> None:
        from transformers import CLIPVisionModelWithProjection

        self.name = encoder_identity("clip-vision", folder)
        self.model = CLIPVisionModelWithProjection.from_pretrained(str(folder), local_files_only=True,
                                                                   dtype=torch.float32).to(device).eval()
        self.size = self.model.config.image_size
        self.device = torch.device(device)

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """[H, W, 3] or [1, H, W, 3] in [0, 1] -> {last_hidden_state [L, W], penultimate_hidden_states [L, W],
        image_embeds [P]}."""
        pixels = clip_pixels(image.reshape(-1, *image.shape[-3:])[:1], self.size).to(self.device)
        out = self.model(pixel_values=pixels, output_hidden_states=True)
        return {"last_hidden_state": out.last_hidden_state[0].float().cpu(),
                "penultimate_hidden_states": out.hidden_states[-2][0].float().cpu(),
                "image_embeds": out.image_embeds[0].float().cpu()}


def load_image(path: str | Path) -> torch.Tensor:
    """An image file as ComfyUI's IMAGE layout [H, W, 3] in [0, 1]."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)


def encode_images(encoder: CLIPVisionFeatures, paths: Iterable[Path], cache_dir: Path) -> dict[Path, Path]:
    """Encode each distinct image once into `cache_dir`; returns image path -> cache file."""
    out = {}
    for path in dict.fromkeys(paths):
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
        target = cache_dir / cache_name(encoder.name, digest)
        if not target.exists():
            try:
                save_safetensors(encoder.encode(load_image(path)), target, {"image": Path(path).name,
                                                                            "encoder": encoder.name})
            except FileExistsError:
                pass
        out[path] = target
    return out


def load_text_encoder(folder: str | Path, family: str, device: str | torch.device = "cpu"):
    return {wan.NAME: UMT5TextEncoder, sdxl.NAME: SDXLClipTextEncoder}[family](folder, device)


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


def encode_dataset(folder: str | Path, encoder=None, image_encoder: CLIPVisionFeatures | None = None,
                   image_encoder_2: CLIPVisionFeatures | None = None) -> int:
    """Fill in cached embeddings: text conditions and captions (prompt -> embedding) with `encoder`, image
    conditions (image -> embedding) with `image_encoder` and, for models that mix two image features,
    (image_2 or image -> embedding_2) with `image_encoder_2`. Blocks already encoded are kept when no encoder
    of their kind is given. Rewrites the metadata atomically."""
    folder = Path(folder)
    records = read_records(folder)
    texts = [block for r in records for block in (r.get("condition"), r.get("caption"))
             if block and block.get("prompt") and block.get("kind", "text") == "text"]
    images = all_images = [r["condition"] for r in records if (r.get("condition") or {}).get("kind") == "image"]
    if encoder is None:
        texts = [b for b in texts if not b.get("embedding")]
    if image_encoder is None:
        images = [b for b in images if not b.get("embedding")]
    if texts and encoder is None:
        raise SystemExit("the dataset has prompts without embeddings: give --text-encoder")
    if images and image_encoder is None:
        raise SystemExit("the dataset has image conditions: give --image-encoder (a CLIP vision model folder)")
    changed = 0
    if texts:
        files = encode_prompts(encoder, [b["prompt"] for b in texts], folder / "conditions")
        for block in texts:
            rel = str(files[block["prompt"]].relative_to(folder))
            changed += block.get("embedding") != rel
            block["embedding"] = rel
    if images:
        changed += _encode_image_blocks(folder, images, image_encoder, "image", "embedding")
    if image_encoder_2 is not None:
        changed += _encode_image_blocks(folder, all_images, image_encoder_2, "image_2", "embedding_2")
    write_metadata(folder, records)
    return changed


def _encode_image_blocks(folder: Path, blocks: list[dict], encoder: CLIPVisionFeatures, source: str,
                         target: str) -> int:
    """Encode each block's image (`source`, falling back to "image") into the cache; set `target` to the file."""
    paths = [folder / block.get(source, block["image"]) for block in blocks]
    files = encode_images(encoder, paths, folder / "conditions")
    changed = 0
    for block, path in zip(blocks, paths):
        rel = str(files[path].relative_to(folder))
        changed += block.get(target) != rel
        block[target] = rel
    return changed


def write_metadata(folder: Path, records: list[dict]) -> Path:
    path = metadata_path(folder) if any((folder / n).exists() for n in ("metadata.jsonl", "metadata.json")) \
        else folder / "metadata.jsonl"
    text = (json.dumps(records, indent=1) if path.suffix == ".json"
            else "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return publish_new_file(path, lambda tmp: Path(tmp).write_text(text), overwrite=True)
