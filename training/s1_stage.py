"""S1 through Ray Train: WaveNet vs the sample Transformer vs its CNN-conditioned variant.

Verma & Chafe (2021) compare next-sample predictors of 8-bit mu-law audio at
matched parameter counts by top-5 accuracy. This module holds the experiment
settings, the data and the Ray Train worker loop for the three models of
``s1_configs.matched_configs``; ``training.s1_comparison`` trains them with the
shared stage machinery (``training.ray_stage``) and scores them on the same
held-out samples. Fair by
construction: the same crops in the same order (generators seeded by seed,
epoch and worker rank; one crop length, the longest any model needs), the same
target samples, the same steps; and each model predicts a target only from the
past it is built to use, cut from the crop by :func:`target_logits`: WaveNet
its receptive field (2047 samples), the Transformer its attention window
(``context_samples``), the conditioned one that window plus ``cond_context``
older samples summarised by its CNN.

Held-out crops are scored in runs of ``eval_targets`` consecutive targets (one
forward pass each), so inside a run the Transformers see between
``context_samples - eval_targets + 1`` and ``context_samples`` window samples.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from shared_models import mulaw
from shared_models.s1_configs import matched_configs
from shared_models.sample_transformer import SampleTransformer, SampleTransformerConfig
from shared_models.wavenet import WaveNet, WaveNetConfig
from training.ray_stage import StageSpec, report_epoch, restore, worker_setup

log = logging.getLogger(__name__)

MODEL_NAMES = ("wavenet", "transformer", "conditioned_transformer")  # matched_configs' keys

S1Config = WaveNetConfig | SampleTransformerConfig

S1_MODELS: dict[type, type[nn.Module]] = {
    WaveNetConfig: WaveNet,
    SampleTransformerConfig: SampleTransformer,
}
"""Which model class a config builds; keyed by the config's type."""

MAX_SKIPS_PER_CROP = 100  # near-silent rejections tolerated per accepted crop
GRAD_CLIP = 1.0


@dataclass
class S1Experiment:
    """One S1 comparison: model size, context lengths, training schedule and evaluation.

    The defaults run on 2 CPU cores (2 Ray workers x 1 thread) in about 2
    minutes per model; :data:`GPU_EXPERIMENT` is the larger setting for a GPU.
    """

    target_params: int = 100_000  # each model is matched to this count (within 10 %)
    context_samples: int = 512  # Transformer attention window; also training targets per crop
    cond_context: int = 4096  # older samples the conditioned Transformer's CNN summarises
    steps_per_epoch: int = 80
    epochs: int = 5  # a checkpoint every checkpoint_every epochs
    batch_size: int = 8  # crops per optimizer step, all workers together
    lr: float = 8e-3  # peak AdamW learning rate, the same for all three models
    warmup_steps: int = 30  # linear warm-up, then cosine decay to lr / 10
    seed: int = 0
    eval_positions: int = 20_000  # held-out targets scored (rounded up to whole runs)
    eval_targets: int = 128  # consecutive targets per held-out crop (one forward pass)
    min_crop_rms: float = 0.0  # reject crops quieter than this (counted and logged); 0 = keep all
    transformer_dropout: float = 0.0  # far less than one pass over the data: no need to regularise
    threads_per_worker: int = 0  # torch threads per Ray worker; 0 = ray_stage's CPUs / workers
    checkpoint_every: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.eval_targets <= self.context_samples:
            raise ValueError(
                f"eval_targets {self.eval_targets} must be in [1, context_samples "
                f"{self.context_samples}]: a Transformer run must fit in its window"
            )
        if self.eval_positions < 1 or self.steps_per_epoch < 1 or self.epochs < 1:
            raise ValueError("eval_positions, steps_per_epoch and epochs must be positive")

    def configs(self) -> dict[str, S1Config]:
        """The three matched configs, keyed "wavenet", "transformer", "conditioned_transformer"."""
        configs = _matched(self.target_params, self.context_samples, self.cond_context)
        return {
            name: replace(c, dropout=self.transformer_dropout)
            if isinstance(c, SampleTransformerConfig)
            else replace(c)
            for name, c in configs.items()
        }

    def lr_at(self, step: int) -> float:
        """Learning rate at optimizer step ``step`` (0-based); a pure function, so resume needs no state."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        total = self.epochs * self.steps_per_epoch
        progress = min(1.0, (step - self.warmup_steps) / max(1, total - self.warmup_steps))
        return self.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


GPU_EXPERIMENT = S1Experiment(
    target_params=3_000_000,
    context_samples=2048,  # 128 ms window at 16 kHz
    cond_context=16_384,  # plus ~1 s of older audio through the CNN
    steps_per_epoch=1000,
    epochs=20,
    batch_size=32,
    lr=5e-4,
    warmup_steps=1000,
    eval_positions=200_000,
    eval_targets=512,
)
"""A larger comparison for one GPU worker (``run=dict(workers=1, use_gpu=True, ...)``):
3 M parameters per model, 20 k steps of 32 crops, scored on 200 k held-out samples."""


@functools.cache
def _matched(target_params: int, context_samples: int, cond_context: int) -> dict[str, S1Config]:
    # The search builds many models on the meta device (~1 s): do it once per setting.
    return matched_configs(target_params, context_samples, cond_context)


# --- models: build, allowed past, logits ---------------------------------------------


def build_model(config: S1Config) -> nn.Module:
    """The model a config describes (WaveNet or SampleTransformer)."""
    model_class = S1_MODELS.get(type(config))
    if model_class is None:
        known = ", ".join(t.__name__ for t in S1_MODELS)
        raise TypeError(f"no S1 model for a {type(config).__name__}; known configs: {known}")
    return model_class(config)


def past_samples(config: S1Config) -> int:
    """The most samples before a target that one prediction of this model may use."""
    if isinstance(config, WaveNetConfig):
        with torch.device("meta"):  # shapes only: the formula lives in the model
            return WaveNet(config).receptive_field
    return config.context_samples + config.cond_context


def crop_samples(configs: Sequence[S1Config], n_targets: int) -> int:
    """Crop length that gives every model its full past for each of ``n_targets`` targets."""
    return max(past_samples(c) for c in configs) + n_targets


def target_logits(
    model: nn.Module, config: S1Config, codes: torch.Tensor, n_targets: int
) -> torch.Tensor:
    """Logits (B, n_targets, V) for the last ``n_targets`` samples of ``codes`` (B, L).

    Each target is predicted from the samples before it that the model may
    use, and nothing else: the model is handed only that slice of the crop.
    ``model`` may be DDP-wrapped; ``config`` says which kind it is.
    """
    if codes.shape[1] < past_samples(config) + n_targets:
        raise ValueError(
            f"crop of {codes.shape[1]} samples is shorter than {past_samples(config)} past "
            f"+ {n_targets} targets"
        )
    if isinstance(config, WaveNetConfig):
        rf = past_samples(config)
        inputs = codes[:, -(rf + n_targets) : -1]  # (B, rf + n - 1): first target sees rf samples
        return model(inputs)[:, -n_targets:]  # (B, n, V)
    C, P = config.context_samples, config.cond_context
    if n_targets > C:
        raise ValueError(f"{n_targets} targets do not fit in a {C}-sample attention window")
    window = codes[:, -(C + 1) : -1]  # (B, C): ends just before the last target
    if P:
        past = codes[:, -(C + 1 + P) : -(C + 1)]  # (B, P): immediately before the window
        return model(window, past)[:, -n_targets:]  # (B, n, V)
    return model(window)[:, -n_targets:]  # (B, n, V)


def next_sample_loss(
    model: nn.Module, config: S1Config, codes: torch.Tensor, n_targets: int
) -> torch.Tensor:
    """Mean cross-entropy of the last ``n_targets`` samples of ``codes`` (B, L)."""
    logits = target_logits(model, config, codes, n_targets)  # (B, n, V)
    targets = codes[:, -n_targets:]  # (B, n)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


# --- data ------------------------------------------------------------------------------


class CropBatch(NamedTuple):
    codes: torch.Tensor  # (n, length) int64 mu-law classes
    skipped: int  # crops drawn and rejected as quieter than min_rms


def sample_crops(
    clips: Sequence[np.ndarray], n: int, length: int, rng: np.random.Generator, min_rms: float = 0.0
) -> CropBatch:
    """``n`` random crops of ``length`` samples from float clips in [-1, 1], as mu-law classes.

    Every valid crop position of every long-enough clip is equally likely. With
    ``min_rms`` > 0, quieter crops are redrawn and counted in ``skipped``, so a
    caller can report how much audio the filter removed.
    """
    starts = np.array([max(len(c) - length + 1, 0) for c in clips], dtype=np.int64)
    if starts.sum() == 0:
        longest = max((len(c) for c in clips), default=0)
        raise ValueError(f"no clip holds a {length}-sample crop (longest: {longest} samples)")
    p = starts / starts.sum()
    crops, skipped = [], 0
    while len(crops) < n:
        i = rng.choice(len(clips), p=p)
        s = int(rng.integers(starts[i]))
        crop = np.asarray(clips[i][s : s + length], dtype=np.float32)
        if min_rms > 0 and float(np.sqrt(np.mean(crop**2))) < min_rms:
            skipped += 1
            if skipped > MAX_SKIPS_PER_CROP * n:
                raise ValueError(f"almost no crop reaches min_rms {min_rms}: lower it")
            continue
        crops.append(crop)
    audio = torch.from_numpy(np.stack(crops))  # (n, length)
    return CropBatch(mulaw.encode(audio), skipped)


# --- the Ray Train worker loop ------------------------------------------------------------


def s1_loop(config: dict) -> None:
    """Train one S1 model on random crops (runs on each Ray Train worker, DDP when > 1).

    ``config``: spec (StageSpec), experiment (S1Experiment), model_config
    (WaveNetConfig or SampleTransformerConfig), data_ref (ray ref to a list of
    float32 clips), crop_samples (the same for all three models).
    """
    import ray
    import ray.train.torch

    rank, world = worker_setup(config)
    spec: StageSpec = config["spec"]
    experiment: S1Experiment = config["experiment"]
    model_config: S1Config = config["model_config"]
    if experiment.threads_per_worker:
        torch.set_num_threads(experiment.threads_per_worker)
    if experiment.batch_size % world:
        raise ValueError(f"batch_size {experiment.batch_size} does not split over {world} workers")
    per_worker = experiment.batch_size // world
    clips: list[np.ndarray] = ray.get(config["data_ref"])
    device = ray.train.torch.get_device()
    # WaveNet's last residual 1x1 conv feeds only the (unused) next residual stream, so
    # it gets no gradient; DDP must be told, or it waits for that gradient forever.
    unused = isinstance(model_config, WaveNetConfig)
    model = ray.train.torch.prepare_model(
        build_model(model_config), parallel_strategy_kwargs={"find_unused_parameters": unused}
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=1e-2)

    start, starts = restore(model, optimizer)
    starts = [*starts, start]
    for epoch in range(start, spec.epochs):
        # Seeded per epoch, not once: a resumed epoch draws the crops it would have drawn.
        rng = np.random.default_rng([spec.seed, epoch, rank])
        model.train()
        started, losses, skipped = time.monotonic(), [], 0
        for step in range(experiment.steps_per_epoch):
            for group in optimizer.param_groups:
                group["lr"] = experiment.lr_at(epoch * experiment.steps_per_epoch + step)
            batch = sample_crops(
                clips, per_worker, config["crop_samples"], rng, experiment.min_crop_rms
            )
            skipped += batch.skipped
            codes = batch.codes.to(device)  # (B, L)
            loss = next_sample_loss(model, model_config, codes, experiment.context_samples)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer.step()
            losses.append(loss.item())
        # skipped_crops: near-silent crops redrawn on this worker (0 when min_crop_rms = 0)
        metrics = dict(loss=float(np.mean(losses)), epoch_s=time.monotonic() - started)
        metrics["skipped_crops"] = float(skipped)
        extra = {"starts": starts, "loss": metrics["loss"], "epoch_s": metrics["epoch_s"]}
        report_epoch(spec, epoch, metrics, model, optimizer, rank, extra)
