"""The trainer's moving average of the weights: what it evaluates and exports, and that a resume continues it."""

from __future__ import annotations

import torch
from torch import nn

from training.config import OptimConfig, RunConfig
from training.trainer import Trainer


def _trainer(tmp_path, steps: int, ema_decay: float) -> tuple[Trainer, nn.Linear]:
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    cfg = RunConfig(out=str(tmp_path), steps=steps, ema_decay=ema_decay, save_every=1, keep_checkpoints=10,
                    eval_every=1, log_every=1, optim=OptimConfig(lr=0.1, warmup_steps=0))
    return Trainer(cfg, net, net, "ema-test"), net


def _objective(net: nn.Linear):
    def objective(step: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        x = torch.randn(8, 3, generator=gen)
        return {"loss": (net(x) - x[:, :2].flip(1)).pow(2).mean()}
    return objective


def _ema_of(history: list[torch.Tensor], decay: float) -> torch.Tensor:
    average = history[0].clone()
    for w in history[1:]:
        average = decay * average + (1 - decay) * w
    return average


def test_ema_run_evaluates_and_exports_the_moving_average_of_its_raw_weights(tmp_path):
    steps, decay = 5, 0.6
    trainer, net = _trainer(tmp_path, steps, decay)
    raw_after_step, evaluated = [], []

    def evaluate(final: bool) -> dict[str, float]:
        evaluated.append(net.weight.detach().clone())
        return {}

    objective = _objective(net)
    original_step = trainer.optimizer.step

    def step_and_record(*args, **kwargs):
        result = original_step(*args, **kwargs)
        raw_after_step.append(net.weight.detach().clone())
        return result

    trainer.optimizer.step = step_and_record
    trainer.fit(objective, evaluate)
    assert len(raw_after_step) == steps and len(evaluated) == steps
    for k in range(steps):
        torch.testing.assert_close(evaluated[k], _ema_of(raw_after_step[: k + 1], decay))
    torch.testing.assert_close(net.weight.detach(), _ema_of(raw_after_step, decay))  # what the run exports
    assert not torch.allclose(net.weight.detach(), raw_after_step[-1])


def test_resumed_ema_run_ends_with_the_same_average_as_an_uninterrupted_one(tmp_path):
    whole, whole_net = _trainer(tmp_path / "whole", 6, 0.7)
    whole.fit(_objective(whole_net))
    first, first_net = _trainer(tmp_path / "split", 3, 0.7)
    first.fit(_objective(first_net))
    second, second_net = _trainer(tmp_path / "split", 6, 0.7)
    second.resume(str(tmp_path / "split" / "checkpoints" / "step_00000003"))
    second.fit(_objective(second_net))
    torch.testing.assert_close(second_net.weight.detach(), whole_net.weight.detach())
