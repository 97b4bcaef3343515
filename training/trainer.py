"""The training loop both stages share: accelerate, AdamW with warm-up, clipping, checkpoints, exact resume.

* Scale-out is accelerate's (`accelerate launch --multi_gpu ... -m training stage1 ...`); on a CPU the same
  code runs as one process, or several with gloo.
* Mixed precision is autocast only: parameters and AdamW states stay float32 (fp32 master weights).
* Every random choice of a step (which LoRAs, which layers, noise, timesteps) comes from a generator seeded by
  (seed, step, rank), and checkpoints hold model, optimiser, scheduler and RNG state, so a resumed run
  continues exactly as an uninterrupted one would. Ctrl-C writes a checkpoint of the last finished step.
* `ema_decay` > 0 keeps an exponential moving average of the weights (torch's `AveragedModel`): evaluations and
  the exported network use it, checkpoints hold it next to the raw weights, so a resume continues it too.
* Checkpoints are written atomically (a temporary folder renamed into place); `.pt` state is read back with
  `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from .config import RunConfig, to_dict
from .plots import plot_metrics

CHECKPOINTS = "checkpoints"
EMA_FILE = "ema.safetensors"


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The step's own random stream: identical whether the run was interrupted or not."""
    digest = hashlib.sha256(f"{seed}:{step}:{rank}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class StopRequest:
    """Ctrl-C during training asks to stop at the next step boundary, so the checkpoint written then holds a
    consistent state (never half an optimiser step). A second Ctrl-C interrupts immediately."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (Ctrl-C again to abort without a checkpoint)", flush=True)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def lr_factor(warmup: int, steps: int, schedule: str) -> Callable[[int], float]:
    """Linear warm-up, then constant or cosine decay; a plain function of the step, so resume is exact."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', not {schedule!r}")
    warmup = max(1, warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    return factor


class Trainer:
    """Runs `objective(step, generator) -> {"loss": tensor, ...}` for cfg.steps optimiser steps."""

    def __init__(self, cfg: RunConfig, model: nn.Module, trainable: nn.Module, name: str) -> None:
        from accelerate import Accelerator, DistributedDataParallelKwargs

        self.cfg = cfg
        self.name = name
        self.run = Path(cfg.out)
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision,
                                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])
        self.trainable = trainable  # the network whose weights are saved (inside `model`)
        params = [p for p in model.parameters() if p.requires_grad]
        optim = cfg.optim
        optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(optim.warmup_steps, cfg.steps,
                                                                                optim.schedule))
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        if not 0.0 <= cfg.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0 turns the moving average off), not {cfg.ema_decay}")
        self.ema = (AveragedModel(trainable, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
                    if cfg.ema_decay else None)
        self.step = 0
        if self.is_main:
            self.run.mkdir(parents=True, exist_ok=True)
            (self.run / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    # -- checkpoints -------------------------------------------------------------------------------------
    def checkpoint_dirs(self) -> list[Path]:
        folder = self.run / CHECKPOINTS
        return sorted(folder.glob("step_*"), key=lambda p: int(p.name.split("_")[1])) if folder.exists() else []

    def save(self) -> Path | None:
        target = self.run / CHECKPOINTS / f"step_{self.step:08d}"
        if self.is_main and not target.exists():
            tmp = target.with_name(target.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            state = {k: v.detach().contiguous().cpu() for k, v in self.trainable.state_dict().items()}
            save_file(state, tmp / "model.safetensors")
            if self.ema is not None:
                save_file({k: v.detach().contiguous().cpu() for k, v in self.ema.state_dict().items()}, tmp / EMA_FILE)
            torch.save({"step": self.step, "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                       tmp / "trainer_state.pt")
            os.replace(tmp, target)
            for old in self.checkpoint_dirs()[: -max(1, self.cfg.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return target

    def resume(self, where: str | bool) -> None:
        """Continue from `where` (a checkpoint folder) or, if True, from this run's latest checkpoint."""
        if not where:
            return
        folder = Path(where) if isinstance(where, str) else (self.checkpoint_dirs() or [None])[-1]
        if folder is None:
            if self.is_main:
                print(f"no checkpoint in {self.run / CHECKPOINTS}: starting from step 0")
            return
        self.trainable.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
        if self.ema is not None:
            if not (folder / EMA_FILE).exists():
                raise SystemExit(f"{folder} has no {EMA_FILE}: it was saved by a run without ema_decay; resume it "
                                 "with --set ema_decay=0, or start the moving average from scratch in a new run")
            self.ema.load_state_dict(load_file(str(folder / EMA_FILE)), strict=True)
        state = torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if torch.cuda.is_available() and state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step = int(state["step"])
        if self.is_main:
            print(f"resumed {self.name} from {folder} at step {self.step}")

    # -- the loop ----------------------------------------------------------------------------------------
    def fit(self, objective: Callable[[int, torch.Generator], dict[str, torch.Tensor]],
            evaluate: Callable[[bool], dict[str, float]] | None = None) -> None:
        """`evaluate(final)` runs every eval_every steps and after the last step (final=True)."""
        cfg, acc = self.cfg, self.accelerator
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.name, disable=not self.is_main, unit="step")
        started = time.time()
        with StopRequest() as stop:
            while self.step < cfg.steps:
                if self._agreed(stop.requested):
                    bar.close()
                    path = self.save()
                    raise SystemExit(f"\ninterrupted: {self.name} saved at step {self.step} in {path}; continue "
                                     f"with --resume")
                self.model.train()
                gen = step_generator(cfg.seed, self.step, acc.process_index)
                with acc.autocast():
                    losses = objective(self.step, gen)
                acc.backward(losses["loss"])
                grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
                self.optimizer.step()
                if self.ema is not None:
                    self.ema.update_parameters(self.trainable)
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    record = {k: acc.reduce(v.detach().float(), reduction="mean").item() for k, v in losses.items()}
                    record |= {"step": self.step, "lr": self.scheduler.get_last_lr()[0],
                               "grad_norm": float(grad_norm), "seconds": round(time.time() - started, 2)}
                    bar.set_postfix(loss=f"{record['loss']:.4g}")
                    self.log(record)
                if evaluate is not None and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                    if self.is_main:
                        with self.averaged():
                            scores = evaluate(self.step == cfg.steps)
                        self.log({"step": self.step, **{f"eval/{k}": v for k, v in scores.items()}})
                    acc.wait_for_everyone()
                if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    self.save()
        bar.close()
        if self.ema is not None:  # what the run exports: the averaged weights
            self.trainable.load_state_dict(self.ema.module.state_dict())
        self.write_digest()
        if self.is_main:
            plot_metrics(self.run / "metrics.jsonl", self.run / "loss.png", title=self.name)

    @contextmanager
    def averaged(self) -> Iterator[None]:
        """The trainable network holds the moving average inside the block (no-op without ema_decay)."""
        if self.ema is None:
            yield
            return
        raw = {k: v.detach().clone() for k, v in self.trainable.state_dict().items()}
        self.trainable.load_state_dict(self.ema.module.state_dict())
        try:
            yield
        finally:
            self.trainable.load_state_dict(raw)

    def _agreed(self, flag: bool) -> bool:
        """A stop request seen by any process stops them all at the same step."""
        if self.accelerator.num_processes == 1:
            return flag
        votes = self.accelerator.reduce(torch.tensor([float(flag)], device=self.device), reduction="sum")
        return bool(votes.item() > 0)

    def log(self, record: dict) -> None:
        if self.is_main:
            with open(self.run / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def write_digest(self) -> None:
        """Per-rank hash of the final weights: data-parallel ranks must end identical."""
        digest = hashlib.sha256()
        for key, value in sorted(self.trainable.state_dict().items()):
            digest.update(key.encode())
            digest.update(value.detach().float().cpu().numpy().tobytes())
        self.run.mkdir(parents=True, exist_ok=True)
        (self.run / f"weights_rank{self.accelerator.process_index}.sha256").write_text(digest.hexdigest() + "\n")
