"""The noise ceiling: how well another LoRA trained for the very same task predicts its ground-truth LoRA.

A task's LoRA is one draw: of the clips it was trained on and of a noisy training run. Another LoRA of the same
task, trained on newly drawn clips of it (other phase jitter, amplitudes and noise) by another run (other noise,
timesteps and batch order, `seed + 1`, `init_seed + 1`), scored with the held-out metrics of `evaluate.py`,
shows how much of each metric the task determines: a hypernetwork knows the task from its prompt but neither
the clips nor the run, so it can expect about the same (an average over many draws would score a little
higher). Goals above the ceiling ask for those clips and that run.
Retrained on the same clips instead, the second LoRA scores higher (text suite, test tasks: map cosine 0.845
instead of 0.823, mean-removed dW cosine 0.899 instead of 0.871): that part of a LoRA is its clips, which no
prompt tells.
"""

from __future__ import annotations

from pathlib import Path

from lofa_core.lora_formats import PredictedLoRA
from lofa_core.response import response_map

from .config import Stage2Config
from .dataset import SampleStore, read_samples
from .evaluate import score_splits

REPLICATE_DIR = "dataset_replicate"


def ceiling_scores(run: Stage2Config, replicates: Path, tau: float) -> dict[str, dict]:
    """{"val": metrics, "test": metrics} of each held-out task's replicate LoRA against its ground truth, with the
    same baselines, samples, latents and noise as the run's own final evaluation."""
    from .base_models import load_base_model
    from .runs import Data

    data = Data(run, need_latents=True)
    store = SampleStore(replicates, read_samples(replicates), data.catalog, data.spec)
    base = load_base_model(run.base_model, run.target_groups)
    base.shift = run.flow_shift

    def predictor(sample):
        factors = store.factors(store.by_id[sample.id])
        maps = {p: response_map(f.delta(), data.weights[p].float(), tau) for p, f in factors.items()}
        return maps, PredictedLoRA(data.catalog.family, factors)

    return score_splits(run, data, data.weights, base, predictor, tau, keep=lambda s: s.id in store.by_id)
