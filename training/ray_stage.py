"""Run one trainable stage through Ray Train's TorchTrainer.

Every stage has the same shape: a train loop (runs on each worker, DDP when
there is more than one), an epoch loop with a checkpoint every
``checkpoint_every`` epochs, resume from the latest checkpoint, and the final
model state returned to the driver. This module holds that shared shape so
each stage only writes its model and its loss.

Fault tolerance comes from Ray Train: a killed worker makes Ray Train restart
the worker group (``FailureConfig.max_failures``) and ``get_checkpoint()``
hands the new workers the latest checkpoint. A whole run resumes the same
way: Ray Train v2 reloads a run's checkpoints when the run name and storage
path are reused, so ``soundfleet train --resume`` simply reuses the latest
run directory. Each state records ``starts``, the epochs at which the stage
(re)started, so a resume is visible in the bundle's manifest.
"""

from __future__ import annotations

import datetime
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
RUN_PREFIX = "run-"


def run_directory(storage_root: Path, resume: bool) -> Path:
    """Where a training run keeps its stages' checkpoints: a new directory per run,
    or, with ``resume``, the latest earlier one (so every stage continues from it)."""
    storage_root = Path(storage_root).resolve()
    if resume:
        runs = sorted(p for p in storage_root.glob(RUN_PREFIX + "*") if p.is_dir())
        if not runs:
            raise FileNotFoundError(f"nothing to resume: no earlier training run in {storage_root}")
        return runs[-1]
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S%fZ")  # sorts by time
    return storage_root / f"{RUN_PREFIX}{stamp}"


@dataclass
class StageSpec:
    """What a stage's worker loop needs besides its data."""

    name: str
    epochs: int
    lr: float
    batch_size: int
    seed: int
    checkpoint_every: int = 1


def fit_stage(
    name: str,
    loop: Callable[[dict], None],
    loop_config: dict[str, Any],
    *,
    workers: int,
    storage_path: Path,
    use_gpu: bool | None = None,
    max_failures: int = 2,
) -> dict[str, Any]:
    """Train with ``workers`` Ray Train workers; returns the final saved state dict
    (model, optimizer, epoch, starts) plus ``final_metrics``, the last epoch's report.

    Checkpoints go to ``storage_path/name``; if that run already has
    checkpoints, training continues from the latest one.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if use_gpu is None:
        use_gpu = bool(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    loop_config = {**loop_config, "torch_threads": max(1, cpus // max(1, workers))}
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        run_config=RunConfig(
            name=name,
            storage_path=str(Path(storage_path).resolve()),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    started = time.monotonic()
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"stage {name!r} finished without a checkpoint")
    with result.checkpoint.as_directory() as ckpt_dir:
        state = torch.load(Path(ckpt_dir) / STATE_FILE, weights_only=False)
    state["final_metrics"] = dict(result.metrics)  # the last epoch's reported metrics (loss, ...)
    log.info("stage %s done in %.1f s: %s", name, time.monotonic() - started, result.metrics)
    return state


# --- helpers used inside worker loops ---------------------------------------


def worker_setup(config: dict) -> tuple[int, int]:
    """Seed, thread count and logging for one worker; returns (rank, world_size)."""
    import ray.train

    # progress lines from this package only; Ray's own INFO chatter stays quiet
    logging.basicConfig(level=logging.WARNING, format="%(message)s", force=True)
    logging.getLogger("training").setLevel(logging.INFO)
    torch.set_num_threads(config["torch_threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config["spec"].seed + rank)
    return rank, world


def restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, list[int]]:
    """Load the latest checkpoint if Ray Train has one.

    Returns the epoch to start at and the list of earlier start epochs.
    """
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0, []
    with ckpt.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, weights_only=False)
    _unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    logging.getLogger(__name__).info("resumed from epoch %d", state["epoch"])
    return state["epoch"], list(state.get("starts", [0]))


def report_epoch(
    spec: StageSpec,
    epoch: int,
    metrics: dict[str, float],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rank: int,
    extra_state: dict | None = None,
) -> None:
    """Report metrics every epoch and a checkpoint every ``checkpoint_every`` epochs (and the last)."""
    import ray.train

    done = epoch + 1
    if rank == 0:
        logging.getLogger(__name__).info(
            "[%s] epoch %d/%d %s",
            spec.name,
            done,
            spec.epochs,
            " ".join(f"{k}={v:.4f}" for k, v in metrics.items()),
        )
    save = done % spec.checkpoint_every == 0 or done == spec.epochs
    if not (save and rank == 0):
        ray.train.report({**metrics, "epoch": done})
        return
    with tempfile.TemporaryDirectory() as tmp:
        state = {
            "model": _unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": done,
            **(extra_state or {}),
        }
        torch.save(state, os.path.join(tmp, STATE_FILE))
        ray.train.report({**metrics, "epoch": done}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def run_epochs(
    spec: StageSpec,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    n_items: int,
    batch_loss: Callable[[np.ndarray], torch.Tensor],
    rank: int,
    world: int,
    rng: np.random.Generator | None = None,
) -> None:
    """The epoch loop every stage shares: resume, shard, step, report, checkpoint.

    ``batch_loss`` maps a batch of item indices (this worker's shard of
    range(n_items)) to a scalar loss. ``rng`` shuffles the items (default:
    seeded from the stage seed and the worker's rank).
    """
    rng = rng or np.random.default_rng(spec.seed + rank)
    start, starts = restore(model, optimizer)
    starts = [*starts, start]
    for epoch in range(start, spec.epochs):
        started, losses = time.monotonic(), []
        for idx in shard_batches(n_items, spec.batch_size, rank, world, rng):
            loss = batch_loss(idx)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        metrics = {"loss": float(np.mean(losses)), "epoch_s": time.monotonic() - started}
        report_epoch(spec, epoch, metrics, model, optimizer, rank, {"starts": starts})


def shard_batches(n: int, batch_size: int, rank: int, world: int, rng: np.random.Generator):
    """Yield index batches of this worker's shard of a shuffled range(n).

    Every worker yields the same number of batches (DDP needs equal steps).
    """
    order = rng.permutation(n)
    per_worker = n // world
    mine = order[rank * per_worker : (rank + 1) * per_worker]
    for i in range(0, max(per_worker - batch_size + 1, 1), batch_size):
        yield mine[i : i + batch_size]


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model
