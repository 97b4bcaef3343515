"""A tiny synthetic task suite that exercises the real training pipeline in minutes on a CPU.

Task groups differ in a way their prompt describes: procedurally generated latents whose pattern (stripes,
columns, checks, rings, diagonals), palette (which channels carry it, how strongly) and motion or intensity
depend on words in the prompt. Each group's clips share the pattern's phase (up to a small jitter), so a task is
a distinct look, as a personalisation task is; 16 clips per group train its LoRA and 8 more are held out to
evaluate LoRAs on. Two sets of word combinations are held out as whole tasks: `val` (for choosing settings)
and `test` (reported); every word is still seen in training, so held-out predictions test whether the
hypernetwork composes what the prompt says.

The suite's base model knows the domain but not the tasks (`pretrain_base`): a randomly initialised tiny model
trained on all training tasks' clips under one generic caption. For WAN the suite makes that tiny base model
itself (diffusers `WanTransformer3DModel`, saved in ComfyUI/original key layout) and a tiny umT5 text encoder
with a word-level tokenizer, both in local folders loaded the normal way.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import torch

from lofa_core.families import get_family, wan
from lofa_core.fileio import save_safetensors

PATTERNS = ("stripes", "columns", "checks", "rings", "diagonals")
PALETTES = ("pale", "vivid", "warm")  # which channels carry the pattern, and how strongly
# more words for a larger grid of training tasks (suite setting tasks.palettes / tasks.patterns); the held-out
# tasks stay the same, so a larger grid only adds training tasks
EXTRA_PATTERNS = ("waves", "spots", "grid")
EXTRA_PALETTES = ("cool", "deep", "dim", "bright")
MOTIONS = ("still", "drifting", "flickering")  # WAN (video latents have a time axis)
# a fourth motion (suite setting tasks.motions = 4, WAN only): one more training example of every palette-pattern
# pair; the held-out tasks stay the same
EXTRA_MOTIONS = ("fading",)
INTENSITIES = ("faint", "bold", "inverted")  # SDXL (images): the whole image scaled by 0.5, 1.5 or -1
# SDXL's other choice of third word (suite setting tasks.image_third = "overlay"): a shape added to every channel,
# whatever the palette and pattern, so that the third word's effect on a clip adds to the other two words' instead
# of multiplying it (with "intensity" the image is palette x pattern x intensity, a three-way product)
OVERLAYS = ("framed", "shaded", "centred")
IMAGE_THIRDS = ("intensity", "overlay")
# whole tasks held out, each palette twice and each motion/intensity twice per split
VAL = {("pale", "columns", 0), ("vivid", "diagonals", 1), ("warm", "rings", 0), ("pale", "checks", 1),
       ("vivid", "checks", 2), ("warm", "diagonals", 2)}
TEST = {("pale", "rings", 1), ("vivid", "stripes", 2), ("warm", "checks", 0), ("pale", "diagonals", 2),
        ("vivid", "columns", 0), ("warm", "stripes", 1)}
AMPLITUDE = {"pale": 0.4, "vivid": 1.6, "warm": 1.0, "cool": 1.2, "deep": 0.7, "dim": 0.5, "bright": 1.4}
TRAIN_CLIPS, HELD_OUT_CLIPS = 16, 8
FRESH_CLIPS_SEED = 10_000  # `make_tasks(seed=...)` for newly drawn clips of the same tasks (the noise ceiling)
PHASE_JITTER = 0.3  # radians: clips of one task vary a little around its pattern


def _pattern(name: str, size: int, phase: float) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                          indexing="ij")
    k = 2 * math.pi / size
    if name == "stripes":
        return torch.sin(k * y + phase)
    if name == "columns":
        return torch.sin(k * x + phase)
    if name == "checks":
        return torch.sin(k * y + phase) * torch.sin(k * x + phase) * 1.5
    if name == "rings":
        c = (size - 1) / 2
        return torch.sin(1.5 * k * ((y - c) ** 2 + (x - c) ** 2).sqrt() + phase)
    if name == "waves":
        return torch.sin(k * y + 1.5 * torch.sin(k * x) + phase)
    if name == "spots":
        return torch.sin(2 * k * y + phase) * torch.sin(2 * k * x + phase) * 1.5
    if name == "grid":
        return (torch.sin(2 * k * y + phase) + torch.sin(2 * k * x + phase)) / 1.4
    return torch.sin(k * (x + y) / 1.4 + phase)


def channel_weights(palette: str, channels: int) -> torch.Tensor:
    """How strongly each latent channel carries the pattern: pale the first half, vivid the second, warm the even
    channels, cool the odd ones, deep the middle half, dim the outer quarters, bright every third channel from the
    second, each at its own amplitude."""
    ch, half, quarter = torch.arange(channels), channels // 2, channels // 4
    carries = {"pale": ch < half, "vivid": ch >= half, "warm": ch % 2 == 0, "cool": ch % 2 == 1,
               "deep": (ch >= quarter) & (ch < channels - quarter),
               "dim": (ch < quarter) | (ch >= channels - quarter), "bright": ch % 3 == 1}[palette]
    return carries.float() * AMPLITUDE[palette]


def _overlay(third: int, size: int) -> torch.Tensor:
    """[size, size]: a frame of the border pixels, a left-to-right ramp, or a blob in the centre."""
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                          indexing="ij")
    if third == 0:
        return ((y == 0) | (x == 0) | (y == size - 1) | (x == size - 1)).float()
    if third == 1:
        return 2 * x / (size - 1) - 1
    c = (size - 1) / 2
    return torch.exp(-((y - c) ** 2 + (x - c) ** 2) / (size / 4) ** 2)


def make_latents(family: str, palette: str, pattern: str, third: int, count: int, seed: int,
                 image_third: str = "intensity") -> torch.Tensor:
    """[count, C, T, H, W] (WAN) or [count, C, H, W] (SDXL) latents of one task group."""
    gen = torch.Generator().manual_seed(seed)
    weights = channel_weights(palette, 16 if family == wan.NAME else 4)
    out = []
    for _ in range(count):
        phase = PHASE_JITTER * (2 * float(torch.rand(1, generator=gen)) - 1)
        amp = 0.8 + 0.4 * float(torch.rand(1, generator=gen))
        base = _pattern(pattern, 8, phase)
        if family == wan.NAME:
            second = {0: base, 1: _pattern(pattern, 8, phase + math.pi / 2), 2: -base, 3: 0.25 * base}[third]
            frames = torch.stack([base, second])  # [T=2, H, W]
            latent = amp * weights.view(-1, 1, 1, 1) * frames.unsqueeze(0)
        elif image_third == "overlay":
            latent = amp * (weights.view(-1, 1, 1) * base.unsqueeze(0) + _overlay(third, 8).unsqueeze(0))
        else:
            latent = amp * {0: 0.5, 1: 1.5, 2: -1.0}[third] * weights.view(-1, 1, 1) * base.unsqueeze(0)
        out.append(latent + 0.1 * torch.randn(latent.shape, generator=gen))
    return torch.stack(out)


def split_of(palette: str, pattern: str, third: int) -> str:
    combo = (palette, pattern, third)
    return "val" if combo in VAL else "test" if combo in TEST else "train"


def prompt_of(family: str, palette: str, pattern: str, third: int, image_third: str = "intensity") -> str:
    if family == wan.NAME:
        return f"a {palette} {pattern} pattern that is {(MOTIONS + EXTRA_MOTIONS)[third]}"
    return f"a {palette} {pattern} pattern , {(OVERLAYS if image_third == 'overlay' else INTENSITIES)[third]}"


def _group_seeds(palettes: tuple[str, ...], patterns: tuple[str, ...],
                 motions: int = 3) -> dict[tuple[str, str, int], int]:
    """A fixed seed offset per group: the default grid's groups keep theirs whatever grid they are part of."""
    default = list(itertools.product(PALETTES, PATTERNS, range(3)))
    extra = [g for g in itertools.product(palettes, patterns, range(3)) if g not in default]
    fourth = list(itertools.product(palettes, patterns, range(3, motions)))
    return ({g: i for i, g in enumerate(default)} | {g: 1000 + i for i, g in enumerate(extra)}
            | {g: 2000 + i for i, g in enumerate(fourth)})


def make_tasks(folder: Path, family: str, seed: int = 0, palettes: tuple[str, ...] = PALETTES,
               patterns: tuple[str, ...] = PATTERNS, motions: int = 3, image_third: str = "intensity") -> Path:
    """Latents ("latents": training clips, "heldout": clips for evaluation) and tasks.jsonl for every
    (palette, pattern, motion/intensity) group, with the first `motions` motions; returns tasks.jsonl.
    `image_third` (SDXL): what the third word does, "intensity" or "overlay" (its latents in their own folder)."""
    unknown = sorted(set(palettes) - set(PALETTES + EXTRA_PALETTES)) + sorted(
        set(patterns) - set(PATTERNS + EXTRA_PATTERNS))
    missing = sorted({w for combo in VAL | TEST for w in combo[:2]} - set(palettes) - set(patterns))
    if unknown or missing:
        raise SystemExit(f"task grid: unknown words {unknown}, missing words of the held-out tasks {missing}")
    most = len(MOTIONS + EXTRA_MOTIONS) if family == wan.NAME else 3
    if not 3 <= motions <= most:
        raise SystemExit(f"task grid: tasks.motions is {motions}; use 3 to {most} for {family} "
                         "(the held-out tasks need the first three)")
    if image_third not in IMAGE_THIRDS or (image_third != "intensity" and family == wan.NAME):
        raise SystemExit(f"task grid: tasks.image_third is {image_third!r}; use one of {IMAGE_THIRDS} "
                         "(SDXL only; WAN's third word is a motion)")
    latent_dir = "latents" if image_third == "intensity" else f"latents_{image_third}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / latent_dir).mkdir(exist_ok=True)
    lines = []
    seeds = _group_seeds(tuple(palettes), tuple(patterns), motions)
    for palette, pattern, third in itertools.product(palettes, patterns, range(motions)):
        group = f"{palette}_{pattern}_{third}"
        path = folder / latent_dir / f"{group}.safetensors"
        if not path.exists():
            clips = make_latents(family, palette, pattern, third, TRAIN_CLIPS + HELD_OUT_CLIPS,
                                 seed + seeds[(palette, pattern, third)], image_third)
            save_safetensors({"latents": clips[:TRAIN_CLIPS].contiguous(),
                              "heldout": clips[TRAIN_CLIPS:].contiguous()}, path)
        lines.append({"group": group, "prompt": prompt_of(family, palette, pattern, third, image_third),
                      "latents": f"{latent_dir}/{group}.safetensors", "split": split_of(palette, pattern, third)})
    tasks = folder / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(t) + "\n" for t in lines))
    return tasks


# -- image and pose variants of the suite: the same tasks, told by a picture or a pose sequence ---------------
COLORS = {"pale": (0.72, 0.80, 0.95), "vivid": (0.95, 0.22, 0.10), "warm": (0.95, 0.62, 0.15),
          "cool": (0.20, 0.55, 0.95), "deep": (0.25, 0.15, 0.45), "dim": (0.35, 0.35, 0.35),
          "bright": (1.0, 0.95, 0.55)}


def parse_group(group: str) -> tuple[str, str, int]:
    palette, pattern, third = group.split("_")
    return palette, pattern, int(third)


def render_style_image(palette: str, pattern: str, third: int, size: int = 64) -> torch.Tensor:
    """A 'style image' [size, size, 3] in [0, 1] showing the task: its pattern, in its palette's colour,
    plain / hatched / inverted / dimmed for the third word."""
    m = (_pattern(pattern, size, 0.0) + 1) / 2
    if third == 1:
        y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        m = m * (0.55 + 0.45 * (((x + y) // 4) % 2))
    elif third == 2:
        m = 1 - m
    elif third == 3:
        m = 0.4 * m
    color = torch.tensor(COLORS[palette])
    return (m.unsqueeze(-1) * color).clamp(0, 1)


def render_pose_frames(palette: str, pattern: str, third: int, frames: int = 8, size: int = 32) -> torch.Tensor:
    """Rendered 'pose' frames [frames, size, size, 3]: a limb from the centre whose start angle follows the
    pattern, whose motion follows the third word (still / turning / swinging / turning back) and whose thickness
    the palette."""
    index = PATTERNS.index(pattern) if pattern in PATTERNS else EXTRA_PATTERNS.index(pattern) + 0.5
    angle0 = index * 2 * math.pi / len(PATTERNS)
    width = {"pale": 1.2, "vivid": 3.0, "warm": 2.0, "cool": 1.6, "deep": 2.5, "dim": 1.0, "bright": 3.5}[palette]
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                          indexing="ij")
    c = (size - 1) / 2
    out = []
    for f in range(frames):
        angle = angle0 + {0: 0.0, 1: f * math.pi / 8, 2: (math.pi / 4) * (-1) ** f, 3: -f * math.pi / 8}[third]
        ex, ey = c + 0.42 * size * math.cos(angle), c + 0.42 * size * math.sin(angle)
        px, py = x - c, y - c
        dx, dy = ex - c, ey - c
        t = ((px * dx + py * dy) / (dx * dx + dy * dy)).clamp(0, 1)
        dist = ((px - t * dx) ** 2 + (py - t * dy) ** 2).sqrt()
        out.append((dist <= width).float().unsqueeze(-1).expand(-1, -1, 3))
    return torch.stack(out)


def make_condition_dataset(text_dataset: Path, kind: str, out: Path, image_encoder: Path | None = None,
                           image_encoder_2: Path | None = None) -> Path:
    """The text suite's LoRAs and latents, with image or pose conditions (captions stay the task prompts); with
    `image_encoder_2` each image also gets the second encoder's features (for a mixing model)."""
    from PIL import Image

    from .dataset import read_records
    from .encoding import CLIPVisionFeatures, encode_dataset, write_metadata

    out.mkdir(parents=True, exist_ok=True)
    rel = Path("..") / text_dataset.name
    records = []
    for rec in read_records(text_dataset):
        palette, pattern, third = parse_group(rec["group"])
        if kind == "image":
            path = out / "images" / f"{rec['group']}.png"
            if not path.exists():
                path.parent.mkdir(exist_ok=True)
                pixels = (render_style_image(palette, pattern, third) * 255).round().byte().numpy()
                Image.fromarray(pixels).save(path)
            condition = {"kind": "image", "image": f"images/{rec['group']}.png"}
        else:
            path = out / "poses" / f"{rec['group']}.safetensors"
            if not path.exists():
                save_safetensors({"frames": render_pose_frames(palette, pattern, third)}, path)
            condition = {"kind": "pose", "frames": f"poses/{rec['group']}.safetensors"}
        records.append({"id": rec["id"], "lora": str(rel / rec["lora"]), "latents": str(rel / rec["latents"]),
                        "group": rec["group"], "split": rec["split"], "condition": condition,
                        "caption": {"kind": "text", "prompt": rec["condition"]["prompt"],
                                    "embedding": str(rel / rec["condition"]["embedding"])}})
    write_metadata(out, records)
    if kind == "image":
        encode_dataset(out, None, CLIPVisionFeatures(image_encoder),
                       CLIPVisionFeatures(image_encoder_2) if image_encoder_2 else None)
    return out


# -- the suite's base model knows the domain, not the tasks ---------------------------------------------------
GENERIC_CAPTION = "a pattern"


def pretrain_base(base_model: Path, tasks: Path, text_encoder: str, out: Path, steps: int, lr: float,
                  batch_size: int, seed: int = 0) -> Path:
    """Fine-tune every weight of the (randomly initialised) tiny base model on the training tasks' latents as one
    mixture under a generic caption, then save it like `base_model` to `out`.

    A real base model (WAN, SDXL) already generates its domain; a LoRA then only adds what is specific to its
    task. Without this step every per-task LoRA would mostly learn the domain itself, the same for all tasks.
    """
    from tqdm import tqdm

    from lofa_core.conditioning import prepare_text_condition

    from .base_models import load_base_model, make_captions
    from .dataset import load_latents
    from .encoding import load_text_encoder
    from .lora_builder import read_tasks

    base = load_base_model(base_model)
    tokens, pooled = load_text_encoder(text_encoder, base.family).encode(GENERIC_CAPTION)
    caption = prepare_text_condition(tokens, pooled, get_family(base.family).text_condition)
    pool = torch.cat([load_latents(tasks.parent / t["latents"]).float() for t in read_tasks(tasks)
                      if t.get("split", "train") == "train"])
    captions = make_captions([caption.tokens], None if caption.pooled is None else [caption.pooled],
                             repeat=batch_size)
    params = list(base.model.parameters())
    for p in params:
        p.requires_grad_(True)
    base.model.train()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="base model", unit="step"):
        batch = pool[torch.randint(len(pool), (batch_size,), generator=gen)]
        base.diffusion_loss(batch, captions, None, gen).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    return base.save_like(base_model, out)
