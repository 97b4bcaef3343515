"""The paper's data preparation: train one ordinary LoRA per task group with the base model's own objective.

Input: a tasks file (`tasks.jsonl` or `.json`) listing {"group", "prompt", "latents", "split"}; `latents` is a
`.safetensors` with "latents" [N, C, ...] (the group's training clips/images, already VAE-encoded). Each group
gets a rank-r LoRA on the target layers, trained for `steps` steps (default 1,000, lr 1e-4, batch 4) with flow
matching (WAN) or epsilon prediction (SDXL). Every group starts from the same LoRA initialisation (`init_seed`),
so the collection varies with the task rather than with initialisation noise. `groups_per_batch` > 1 trains
several groups' LoRAs in one batch (each LoRA applied only to its own group's samples), which is exact and much
faster for small models. The output is a LoFA dataset folder (LoRAs in ComfyUI naming, cached conditions,
latents, metadata.jsonl). Re-running skips groups whose LoRA already exists.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from lofa_core.checkpoint import load_checkpoint
from lofa_core.conditioning import prepare_text_condition
from lofa_core.families import get_family
from lofa_core.fileio import save_safetensors
from lofa_core.lora_formats import LoRAFactors, PredictedLoRA, to_state_dict
from lofa_core.lora_keys import STYLE_COMFYUI
from lofa_core.predict import predict, truncate_rank
from lofa_core.targets import check_compatible

from .base_models import BaseModel, load_base_model, make_captions
from .baselines import shared_energy
from .config import BuildConfig
from .dataset import SPLITS, SampleStore, load_embedding, load_latents, read_samples
from .encoding import encode_prompts, load_text_encoder, write_metadata
from .injection import inject
from .trainer import lr_factor


def read_tasks(path: str | Path) -> list[dict]:
    path = Path(path)
    text = path.read_text()
    tasks = json.loads(text) if path.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]
    problems = []
    for i, t in enumerate(tasks, start=1):
        for key in ("group", "prompt", "latents"):
            if not t.get(key):
                problems.append(f"task {i}: '{key}' is missing")
        if t.get("latents") and not (path.parent / t["latents"]).exists():
            problems.append(f"task {i} ({t.get('group')}): latents file {t['latents']} is missing")
        if t.get("split", "train") not in SPLITS:
            problems.append(f"task {i}: split {t['split']!r} is not one of {SPLITS}")
    groups = [t.get("group") for t in tasks]
    problems += [f"group {g!r} appears more than once" for g in sorted({g for g in groups if groups.count(g) > 1})]
    if problems:
        raise SystemExit(f"{path}: " + "; ".join(problems))
    return tasks


def build_loras(cfg: BuildConfig) -> Path:
    tasks_path = Path(cfg.tasks)
    tasks = read_tasks(tasks_path)
    out = Path(cfg.out)
    (out / "loras").mkdir(parents=True, exist_ok=True)
    (out / "latents").mkdir(exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = load_base_model(cfg.base_model, cfg.target_groups).to(device)
    base.shift = cfg.flow_shift
    spec = get_family(base.family).text_condition
    encoder = load_text_encoder(cfg.text_encoder, base.family, device)
    cond_files = encode_prompts(encoder, [t["prompt"] for t in tasks], out / "conditions")
    del encoder
    for task in tasks:
        latent_file = out / "latents" / f"{task['group']}.safetensors"
        if not latent_file.exists():
            shutil.copyfile(tasks_path.parent / task["latents"], latent_file)
    pending = [t for t in tasks if not (out / "loras" / f"{t['group']}.safetensors").exists()]
    chunk = max(1, cfg.groups_per_batch)
    chunks = math.ceil(len(pending) / chunk)
    with tqdm(total=chunks * cfg.steps, desc=f"LoRAs ({len(pending)} groups, {chunk} at a time)", unit="step") as bar:
        for start in range(0, len(pending), chunk):
            part = pending[start:start + chunk]
            conditions = [prepare_text_condition(*load_embedding(cond_files[t["prompt"]]), spec) for t in part]
            latents = [load_latents(out / "latents" / f"{t['group']}.safetensors").float() for t in part]
            start = (lofa_initial_factors(cfg.init_from_lofa, base,
                                          [load_embedding(cond_files[t["prompt"]]) for t in part], cfg.rank,
                                          cfg.init_seed, device, cfg.init) if cfg.init_from_lofa else None)
            factors = train_loras(base, latents, conditions, cfg, seed=cfg.seed + tasks.index(part[0]), start=start,
                                  on_step=lambda step, factors: bar.update(1))
            for g, task in enumerate(part):
                lora = PredictedLoRA(base.family, {p: LoRAFactors(f[1][g].detach().cpu().clone(),
                                                                  f[0][g].detach().cpu().clone(), 1.0)
                                                   for p, f in factors.items()})
                save_safetensors(to_state_dict(lora, STYLE_COMFYUI), out / "loras" / f"{task['group']}.safetensors",
                                 {"lofa.group": task["group"], "lofa.prompt": task["prompt"],
                                  "lofa.steps": str(cfg.steps)})
    records = [{
        "id": t["group"], "lora": f"loras/{t['group']}.safetensors", "group": t["group"],
        "split": t.get("split", "train"), "latents": f"latents/{t['group']}.safetensors",
        "condition": {"kind": "text", "prompt": t["prompt"],
                      "embedding": str(cond_files[t["prompt"]].relative_to(out))},
    } for t in tasks]
    write_metadata(out, records)
    train = [s for s in read_samples(out) if s.split == "train"]
    if len(train) > 1:
        shared = shared_energy(SampleStore(out, train, base.catalog, spec), train)
        print(f"{out}: {len(records)} LoRAs; the part all training LoRAs share holds {shared:.0%} of their energy "
              f"(a dataset whose LoRAs mostly share one component teaches little about the tasks)")
    return out


def initial_factors(base: BaseModel, rank: int, groups: int, seed: int, device, init: str = "kaiming"
                    ) -> dict[str, list[torch.Tensor]]:
    """The LoRA start, identical for every group: B zero and A either Kaiming-uniform (peft's default) or
    "principal": W's top right-singular vectors at the same scale, so the LoRA's input directions are a
    function of the base weights (a data-free relative of PiSSA-style initialisations)."""
    gen = torch.Generator().manual_seed(seed)
    factors = {}
    for path, module in base.modules.items():
        out_f, in_f = module.weight.shape
        bound = 1 / math.sqrt(in_f)  # kaiming_uniform(a=sqrt(5)) on [rank, in], as peft and nn.Linear
        if init == "principal":
            vh = torch.linalg.svd(module.weight.detach().float().cpu(), full_matrices=False)[2][:rank]
            a = vh * bound * math.sqrt(in_f / 3)  # same RMS as the uniform init
        else:
            a = (torch.rand(rank, in_f, generator=gen) * 2 - 1) * bound
        factors[path] = [a.expand(groups, -1, -1).clone().to(device).requires_grad_(True),
                         torch.zeros(groups, out_f, rank, device=device, requires_grad=True)]
    return factors


Embedding = tuple[torch.Tensor, torch.Tensor | None]  # a cached text prompt: tokens, pooled


def lofa_initial_factors(checkpoint: str | Path, base: BaseModel, prompts: list[Embedding], rank: int, seed: int,
                         device, init: str = "kaiming") -> dict[str, list[torch.Tensor]]:
    """The LoFA prior as the start: each group's LoRA predicted from its text prompt, alpha folded into B.

    A predicted rank above `rank` is cut to its best rank-`rank` approximation; below it, the extra directions
    start as usual (A from `init`, B zero), so they can still learn.
    """
    ckpt = load_checkpoint(checkpoint)
    check_compatible(ckpt.catalog, base.catalog, Path(checkpoint).name)
    if ckpt.net.stage2 is None:
        raise SystemExit(f"{Path(checkpoint).name} has no Stage-II: --init-from-lofa needs a checkpoint that "
                         f"predicts LoRAs (lofa.safetensors of a Stage-II run)")
    if ckpt.condition.kind != "text":
        raise SystemExit(f"{Path(checkpoint).name} takes {ckpt.condition.kind} prompts; --init-from-lofa builds LoRAs "
                         f"from the tasks' text prompts, so it needs a text-prompt LoFA checkpoint")
    ckpt.net.to(device)
    factors = initial_factors(base, rank, len(prompts), seed, device, init)
    with torch.no_grad():
        for g, (tokens, pooled) in enumerate(prompts):
            condition = prepare_text_condition(tokens, pooled, ckpt.condition)
            lora = predict(ckpt, ckpt.catalog.targets, lambda t: base.weight(t.path), condition,
                           device=torch.device(device), dtype=torch.float32).lora
            for path, f in lora.factors.items():
                f = truncate_rank(f, rank)
                r = f.rank
                factors[path][0][g, :r] = f.down.to(device)
                factors[path][1][g, :, :r] = (f.scale * f.up).to(device)
    return factors


def train_loras(base: BaseModel, latents: list[torch.Tensor], conditions: list, cfg: BuildConfig,
                seed: int, start: dict[str, list[torch.Tensor]] | None = None,
                on_step: Callable[[int, dict[str, list[torch.Tensor]]], None] | None = None
                ) -> dict[str, list[torch.Tensor]]:
    """Train one LoRA per group at once: each group's LoRA sees only its own latents (the loss is a sum of
    per-group means, so every LoRA gets exactly the gradient of training it alone).

    `start`: initial [A, B] per target (default: `initial_factors`); `on_step(step, factors)` after each step.
    """
    groups, device = len(latents), base.device
    factors = start if start is not None else initial_factors(base, cfg.rank, groups, cfg.init_seed, device,
                                                              cfg.init)
    params = [t for pair in factors.values() for t in pair]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.warmup_steps, cfg.steps, cfg.schedule))
    gen = torch.Generator().manual_seed(seed)
    captions = make_captions([c.tokens for c in conditions],
                             [c.pooled for c in conditions] if conditions[0].pooled is not None else None,
                             repeat=cfg.batch_size).to(device)
    ones = torch.ones(groups, device=device)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16")
    for step in range(cfg.steps):
        batch = torch.cat([pool[torch.randint(len(pool), (cfg.batch_size,), generator=gen)] for pool in latents])
        with autocast, inject(base.modules, {p: (a, b, ones) for p, (a, b) in factors.items()}):
            loss = base.diffusion_loss(batch, captions, None, gen, reduce=False).view(groups, -1).mean(1).sum()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(step + 1, factors)
    return factors
