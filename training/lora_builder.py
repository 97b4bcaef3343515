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
from pathlib import Path

import torch
from tqdm import tqdm

from lofa_core.conditioning import DEFAULT_FOR_FAMILY, prepare_condition
from lofa_core.fileio import save_safetensors
from lofa_core.lora_formats import STYLE_COMFYUI, LoRAFactors, PredictedLoRA, to_state_dict

from .base_models import BaseModel, load_base_model
from .conditions import encode_prompts, load_text_encoder, write_metadata
from .config import BuildConfig
from .dataset import SPLITS, load_embedding, load_latents
from .injection import inject


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
    spec = DEFAULT_FOR_FAMILY[base.family]
    encoder = load_text_encoder(cfg.text_encoder, base.family, device)
    cond_files = encode_prompts(encoder, [t["prompt"] for t in tasks], out / "conditions")
    del encoder
    for task in tasks:
        latent_file = out / "latents" / f"{task['group']}.safetensors"
        if not latent_file.exists():
            shutil.copyfile(tasks_path.parent / task["latents"], latent_file)
    pending = [t for t in tasks if not (out / "loras" / f"{t['group']}.safetensors").exists()]
    chunk = max(1, cfg.groups_per_batch)
    with tqdm(total=len(pending), desc="LoRAs", unit="group") as bar:
        for start in range(0, len(pending), chunk):
            part = pending[start:start + chunk]
            conditions = [prepare_condition(*load_embedding(cond_files[t["prompt"]]), spec) for t in part]
            latents = [load_latents(out / "latents" / f"{t['group']}.safetensors").float() for t in part]
            factors = train_loras(base, latents, conditions, cfg, seed=cfg.seed + tasks.index(part[0]))
            for g, task in enumerate(part):
                lora = PredictedLoRA(base.family, {p: LoRAFactors(f[1][g].detach().cpu().clone(),
                                                                  f[0][g].detach().cpu().clone(), 1.0)
                                                   for p, f in factors.items()})
                save_safetensors(to_state_dict(lora, STYLE_COMFYUI), out / "loras" / f"{task['group']}.safetensors",
                                 {"lofa.group": task["group"], "lofa.prompt": task["prompt"],
                                  "lofa.steps": str(cfg.steps)})
            bar.update(len(part))
    records = [{
        "id": t["group"], "lora": f"loras/{t['group']}.safetensors", "group": t["group"],
        "split": t.get("split", "train"), "latents": f"latents/{t['group']}.safetensors",
        "condition": {"kind": "text", "prompt": t["prompt"],
                      "embedding": str(cond_files[t["prompt"]].relative_to(out))},
    } for t in tasks]
    write_metadata(out, records)
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


def train_loras(base: BaseModel, latents: list[torch.Tensor], conditions: list, cfg: BuildConfig,
                seed: int) -> dict[str, list[torch.Tensor]]:
    """Train one LoRA per group at once: each group's LoRA sees only its own latents (the loss is a sum of
    per-group means, so every LoRA gets exactly the gradient of training it alone)."""
    groups, device = len(latents), base.device
    factors = initial_factors(base, cfg.rank, groups, cfg.init_seed, device, cfg.init)
    params = [t for pair in factors.values() for t in pair]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.cat([c.tokens.unsqueeze(0).expand(cfg.batch_size, -1, -1) for c in conditions]).to(device)
    pooled = (torch.cat([c.pooled.unsqueeze(0).expand(cfg.batch_size, -1) for c in conditions]).to(device)
              if conditions[0].pooled is not None else None)
    ones = torch.ones(groups, device=device)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16")
    for _ in range(cfg.steps):
        batch = torch.cat([pool[torch.randint(len(pool), (cfg.batch_size,), generator=gen)] for pool in latents])
        with autocast, inject(base.modules, {p: (a, b, ones) for p, (a, b) in factors.items()}):
            loss = base.diffusion_loss(batch, tokens, pooled, gen, reduce=False).view(groups, -1).mean(1).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return factors
