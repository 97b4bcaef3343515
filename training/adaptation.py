"""The LoFA prior for fast adaptation (the paper's title): fine-tune a task's LoRA from LoFA's prediction.

For each task, a LoRA is trained with the dataset builder's own recipe twice, from the usual initialisation and
from the LoFA prediction for its prompt, and its diffusion loss on the task's held-out clips is measured every
few steps (the same latents, noise and timesteps each time). The result is how many steps each start needs to
reach the held-out loss of the task's ground-truth LoRA (trained with the full recipe), as a table and a plot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lofa_core.conditioning import Condition

from .base_models import BaseModel, make_captions
from .config import BuildConfig
from .injection import inject
from .lora_builder import Embedding, initial_factors, lofa_initial_factors, train_loras


@dataclass
class Task:
    name: str
    prompt: Embedding  # the cached text embedding (tokens, pooled) LoFA reads
    caption: Condition  # what the base model reads
    train: torch.Tensor  # clips the LoRA trains on
    heldout: torch.Tensor  # clips it is evaluated on
    truth: dict[str, tuple[torch.Tensor, torch.Tensor]]  # the ground-truth LoRA: path -> (A, B) with alpha in B


@dataclass
class Curves:
    steps: list[int]
    usual: torch.Tensor  # [evaluations, tasks] held-out loss from the usual start
    prior: torch.Tensor  # [evaluations, tasks] from the LoFA prior
    target: torch.Tensor  # [tasks] held-out loss of the ground-truth LoRA
    none: torch.Tensor  # [tasks] held-out loss without a LoRA
    names: list[str]

    def steps_to_target(self, which: str) -> list[float]:
        """First evaluated step at or below the target, per task (inf if never within the run)."""
        losses = getattr(self, which)
        out = []
        for t in range(losses.shape[1]):
            hit = (losses[:, t] <= self.target[t]).nonzero()
            out.append(float(self.steps[int(hit[0])]) if hit.numel() else math.inf)
        return out

    def summary(self) -> dict:
        """Steps to the target from each start and their ratio per task, the median ratio over all tasks.

        A start that never gets there within the run counts as the run's length (so a ratio is a lower bound
        when the usual start never arrives, and 1 or less when the prior never does)."""
        usual, prior = self.steps_to_target("usual"), self.steps_to_target("prior")
        run = float(self.steps[-1])
        ratios = [(u if math.isfinite(u) else run) / max(p if math.isfinite(p) else run, 1.0)
                  for u, p in zip(usual, prior)]
        ordered = sorted(ratios)
        median = (ordered[(len(ordered) - 1) // 2] + ordered[len(ordered) // 2]) / 2 if ordered else None
        return {"tasks": self.names, "steps_usual": usual, "steps_prior": prior, "speedup": ratios,
                "median_speedup": median,
                "prior_reached": sum(math.isfinite(p) for p in prior), "usual_reached":
                    sum(math.isfinite(u) for u in usual),
                "gap_closed_at_start": float(((self.none - self.prior[0]) / (self.none - self.target)).mean())}


@torch.no_grad()
def heldout_losses(base: BaseModel, tasks: list[Task], factors: dict, seed: int, draws: int = 4) -> torch.Tensor:
    """[tasks] diffusion loss of each task's LoRA (`factors`: path -> [A [G, r, in], B [G, out, r]]) on its held-out
    clips, with fixed noise and timesteps."""
    clips = [t.heldout.repeat(draws, *[1] * (t.heldout.dim() - 1)) for t in tasks]
    per_task = len(clips[0])
    batch = torch.cat(clips).to(base.device)
    caption = make_captions([t.caption.tokens for t in tasks],
                            [t.caption.pooled for t in tasks] if tasks[0].caption.pooled is not None else None,
                            repeat=per_task).to(base.device)
    ones = torch.ones(len(tasks), device=base.device)
    gen = torch.Generator().manual_seed(seed)
    with inject(base.modules, {p: (a.detach(), b.detach(), ones) for p, (a, b) in factors.items()}):
        return base.diffusion_loss(batch, caption, None, gen, reduce=False).view(len(tasks), -1).mean(1).cpu()


def adaptation_curves(base: BaseModel, tasks: list[Task], cfg: BuildConfig, lofa: str | Path, eval_every: int,
                      seed: int = 0) -> Curves:
    """Fine-tune every task's LoRA from both starts with `cfg`'s recipe, evaluating every `eval_every` steps."""
    device = base.device
    steps = list(range(0, cfg.steps + 1, eval_every))
    truth = {p: [torch.stack([t.truth[p][0] for t in tasks]).to(device),
                 torch.stack([t.truth[p][1] for t in tasks]).to(device)] for p in base.modules}
    target = heldout_losses(base, tasks, truth, seed)
    none = heldout_losses(base, tasks, {}, seed)
    curves = {}
    for name in ("usual", "prior"):
        start = (lofa_initial_factors(lofa, base, [t.prompt for t in tasks], cfg.rank, cfg.init_seed, device,
                                      cfg.init) if name == "prior" else
                 initial_factors(base, cfg.rank, len(tasks), cfg.init_seed, device, cfg.init))
        losses = [heldout_losses(base, tasks, start, seed)]

        def record(step: int, factors: dict, losses=losses) -> None:
            if step % eval_every == 0:
                losses.append(heldout_losses(base, tasks, factors, seed))

        train_loras(base, [t.train for t in tasks], [t.caption for t in tasks], cfg, seed=cfg.seed, start=start,
                    on_step=record)
        curves[name] = torch.stack(losses)
    return Curves(steps, curves["usual"], curves["prior"], target, none, [t.name for t in tasks])


def plot_curves(curves: Curves, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gain = (curves.none - curves.target).clamp_min(1e-12)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, losses, style in (("usual initialisation", curves.usual, "-"), ("LoFA prior", curves.prior, "-")):
        closed = ((curves.none - losses) / gain).mean(1)
        ax.plot(curves.steps[: len(closed)], closed.tolist(), style, marker=".", label=name)
    ax.axhline(1.0, color="grey", linestyle="--", label="ground-truth LoRA (full recipe)")
    ax.set_xlabel("fine-tuning steps")
    ax.set_ylabel("held-out gap closed (mean over test tasks)")
    ax.set_title("Fine-tuning a LoRA from the LoFA prior vs the usual start")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
