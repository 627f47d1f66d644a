"""S1 scoring and the side-by-side comparison: train the three matched models, score them.

Every model and every model-free baseline is scored on the same held-out
positions (:func:`heldout_crops`, fixed by the experiment alone), each model
predicting a target only from the past it is built to use (see
``training.s1_stage``, which also holds the experiment, data and worker loop).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from shared_models import mulaw
from shared_models.mulaw import MU_LAW_CLASSES
from shared_models.s1_configs import parameter_count
from shared_models.s1_metrics import topk_accuracy
from training.ray_stage import StageSpec, fit_stage
from training.s1_stage import (
    MODEL_NAMES,
    S1Experiment,
    build_model,
    crop_samples,
    past_samples,
    s1_loop,
    sample_crops,
    target_logits,
)

log = logging.getLogger(__name__)

EVAL_STREAM = 1_000_003
"""Mixed into the seed of the held-out positions, so they never coincide with a training stream."""

EVAL_BATCH = 16  # held-out crops per forward pass


def heldout_crops(test_clips: Sequence[np.ndarray], experiment: S1Experiment) -> torch.Tensor:
    """The held-out crops every model is scored on: (N, L) int64, last eval_targets are targets.

    Fixed by the experiment alone (seed, sizes, the three configs' pasts), so
    every model, and every baseline, sees exactly the same positions.
    """
    n_runs = math.ceil(experiment.eval_positions / experiment.eval_targets)
    length = crop_samples(list(experiment.configs().values()), experiment.eval_targets)
    rng = np.random.default_rng([experiment.seed, EVAL_STREAM])
    batch = sample_crops(test_clips, n_runs, length, rng, experiment.min_crop_rms)
    if batch.skipped:
        log.info(
            "held-out crops: skipped %d quieter than rms %g", batch.skipped, experiment.min_crop_rms
        )
    return batch.codes


# --- evaluation ---------------------------------------------------------------------------


@torch.no_grad()
def evaluate_s1(
    model: nn.Module, test_clips: Sequence[np.ndarray], experiment: S1Experiment
) -> dict[str, float | int]:
    """Top-1 / top-5 accuracy, mean NLL (nats) and the count of held-out positions scored.

    ``model`` is a WaveNet or SampleTransformer (its ``config`` says which);
    it runs on whatever device its parameters are on.
    """
    config = model.config
    crops = heldout_crops(test_clips, experiment)  # (N, L)
    n = experiment.eval_targets
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    top1 = top5 = nll = 0.0
    for batch in crops.split(EVAL_BATCH):
        batch = batch.to(device)
        logits = target_logits(model, config, batch, n)  # (b, n, V)
        targets = batch[:, -n:]  # (b, n)
        count = targets.numel()
        top1 += topk_accuracy(logits, targets, 1) * count
        top5 += topk_accuracy(logits, targets, 5) * count
        flat = logits.reshape(-1, logits.shape[-1]).float()
        nll += F.cross_entropy(flat, targets.reshape(-1), reduction="sum").item()
    model.train(was_training)
    total = crops.shape[0] * n
    return {"top1": top1 / total, "top5": top5 / total, "nll": nll / total, "positions": total}


def baseline_scores(
    train_clips: Sequence[np.ndarray], test_clips: Sequence[np.ndarray], experiment: S1Experiment
) -> dict[str, dict[str, float]]:
    """Model-free scores on the same held-out positions, to show what the models add.

    unigram: the training audio's most frequent classes, whatever the past;
    repeat_previous: top-1 guesses the previous sample's class, top-5 the 5
    classes centred on it (within +-2 classes).
    """
    crops = heldout_crops(test_clips, experiment)
    n = experiment.eval_targets
    targets, previous = crops[:, -n:], crops[:, -n - 1 : -1]  # (N, n) each
    counts = torch.zeros(MU_LAW_CLASSES, dtype=torch.float64)
    for clip in train_clips:
        counts += torch.bincount(mulaw.encode(torch.as_tensor(clip)), minlength=MU_LAW_CLASSES)
    log_p = torch.log((counts + 1) / (counts.sum() + MU_LAW_CLASSES)).float()  # add-one smoothed
    unigram = log_p.expand(*targets.shape, MU_LAW_CLASSES)  # (N, n, V), a view
    total = targets.numel()
    unigram_nll = -log_p[targets].double().mean().item()
    near = (targets - previous).abs()  # (N, n) class distance to the previous sample
    return {
        "unigram": {"top1": topk_accuracy(unigram, targets, 1), "nll": unigram_nll,
                    "top5": topk_accuracy(unigram, targets, 5), "positions": total},
        "repeat_previous": {"top1": (near == 0).double().mean().item(),
                            "top5": (near <= 2).double().mean().item(), "positions": total},
    }  # fmt: skip


# --- the comparison ------------------------------------------------------------------------


def run_s1_comparison(
    train_clips: Sequence[np.ndarray],
    test_clips: Sequence[np.ndarray],
    experiment: S1Experiment,
    run: dict[str, Any],
) -> dict[str, Any]:
    """Train and score the three matched models; one entry per model, plus "baselines".

    ``run`` holds ``fit_stage``'s keywords: workers, storage_path, use_gpu. A
    model's entry: params, past_samples, top1, top5, nll, positions,
    train_wall_s (all of fit_stage, Ray start-up included), last_epoch_s,
    final_train_loss, epochs, starts.
    """
    import ray

    configs = experiment.configs()
    length = crop_samples(list(configs.values()), experiment.context_samples)
    data_ref = ray.put([np.asarray(c, dtype=np.float32) for c in train_clips])
    # Score on the driver's GPU when it has one, unless the caller ruled GPUs out.
    device = "cuda" if torch.cuda.is_available() and run.get("use_gpu") is not False else "cpu"
    results: dict[str, Any] = {"experiment": asdict(experiment)}
    for name, model_config in configs.items():
        past, params = past_samples(model_config), parameter_count(model_config)
        log.info("S1 %s: %d parameters, predicts from %d past samples", name, params, past)
        spec = StageSpec(
            f"s1_{name}", experiment.epochs, experiment.lr, experiment.batch_size,
            experiment.seed, experiment.checkpoint_every,
        )  # fmt: skip
        loop_config = {"spec": spec, "experiment": experiment, "model_config": model_config}
        loop_config |= {"data_ref": data_ref, "crop_samples": length}
        started = time.monotonic()
        state = fit_stage(spec.name, s1_loop, loop_config, **run)
        wall_s = time.monotonic() - started
        model = build_model(model_config)
        model.load_state_dict(state["model"])
        scores = evaluate_s1(model.to(device), test_clips, experiment)
        results[name] = {"params": params, "past_samples": past, **scores, "train_wall_s": wall_s}
        results[name] |= {"last_epoch_s": state["epoch_s"], "final_train_loss": state["loss"]}
        results[name] |= {"epochs": state["epoch"], "starts": state["starts"]}
        log.info(
            "S1 %s: top1 %.3f top5 %.3f nll %.3f, trained in %.0f s",
            name, scores["top1"], scores["top5"], scores["nll"], wall_s,
        )  # fmt: skip
    results["baselines"] = baseline_scores(train_clips, test_clips, experiment)
    log.info("S1 comparison:\n%s", format_comparison(results))
    return results


def format_comparison(results: dict[str, Any]) -> str:
    """A plain-text table of a :func:`run_s1_comparison` result ("-": not applicable)."""
    columns = ("params", "past_samples", "top1", "top5", "nll", "train_wall_s")
    rows = [(name, results[name]) for name in MODEL_NAMES] + list(results["baselines"].items())
    lines = [f"{'model':<24}" + "".join(f"{c:>14}" for c in columns)]
    for name, row in rows:
        cells = [_cell(row.get(c)) for c in columns]
        lines.append(f"{name:<24}" + "".join(f"{c:>14}" for c in cells))
    positions = results["baselines"]["unigram"]["positions"]
    return "\n".join([*lines, f"({positions} held-out positions, the same for every row)"])


def _cell(value: float | int | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)
