"""Worker loops of the comparison baselines (each runs under Ray Train, like ``stages``).

- ``supervised_loop``: S2's fully supervised model, a ``SupervisedPatchClassifier``
  trained end to end on the window class (cross-entropy).
- ``contrastive_loop``: S2's SimCLR baseline, a ``ContrastiveEncoder`` trained
  with NT-Xent on two augmented views of each window; no labels.
- ``cnn_loop``: S3's convolutional baseline, a ``LogMelCnn`` trained on the
  same multi-label window targets as the scene classifier (masked BCE).

Windows are not materialised: the data holds each clip's per-frame features
once, plus (clip, start frame) pairs, and a batch is gathered on the fly. That
keeps a 2 h corpus at ~150 MB in Ray's object store instead of gigabytes of
overlapping windows.
"""

from __future__ import annotations

import numpy as np
import ray
import torch
import torch.nn.functional as F
from ray.train.torch import prepare_model

from shared_models.cnn_baseline import LogMelCnn
from shared_models.patch_transformer import ContrastiveEncoder, SupervisedPatchClassifier, nt_xent
from training.ray_stage import StageSpec, run_epochs, worker_setup

MAX_VIEW_SHIFT_FRAMES = 8
"""Contrastive views of one item start up to this many frames (200 ms) apart."""


def gather_windows(
    clip_features: list[np.ndarray], windows: np.ndarray, window_frames: int
) -> torch.Tensor:
    """(clip, start) pairs (B, 2) -> (B, window_frames, F) slices of the clips' features."""
    return torch.tensor(
        np.stack([clip_features[c][s : s + window_frames] for c, s in windows])
    )  # (B, W, F)


def supervised_loop(config: dict) -> None:
    rank, world = worker_setup(config)
    spec: StageSpec = config["spec"]
    data = ray.get(config["data_ref"])  # clip_features, windows (M, 2), classes (M,)
    W = config["model_config"].window_frames
    model = prepare_model(SupervisedPatchClassifier(config["model_config"], config["num_classes"]))
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=1e-2)

    def batch_loss(idx: np.ndarray) -> torch.Tensor:
        x = gather_windows(data["clip_features"], data["windows"][idx], W)
        return F.cross_entropy(model(x), torch.tensor(data["classes"][idx]))

    run_epochs(spec, model, opt, len(data["windows"]), batch_loss, rank, world)


def augment(x: torch.Tensor, n_mels: int, gen: torch.Generator) -> torch.Tensor:
    """One random view of standardised log-mel windows (B, W, F), F = sub-frames x n_mels.

    Level change (a shift of every log-mel value), additive noise and one
    masked band of mel bins: what a different microphone, distance and room
    would change, and what the window's label does not depend on.
    """
    B, W, F_ = x.shape
    level = torch.empty(B, 1, 1).uniform_(-0.5, 0.5, generator=gen)  # (B, 1, 1)
    x = x + level + 0.1 * torch.randn(x.shape, generator=gen)
    bands = x.reshape(B, W, F_ // n_mels, n_mels).clone()  # (B, W, S, n_mels)
    width = n_mels // 8
    for b, start in enumerate(torch.randint(0, n_mels - width, (B,), generator=gen).tolist()):
        bands[b, :, :, start : start + width] = 0.0  # 0 = the mean after standardisation
    return bands.reshape(B, W, F_)


def contrastive_loop(config: dict) -> None:
    rank, world = worker_setup(config)
    spec: StageSpec = config["spec"]
    data = ray.get(config["data_ref"])  # clip_features, windows (M, 2)
    W = config["model_config"].window_frames
    model = prepare_model(ContrastiveEncoder(config["model_config"]))
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(spec.seed + rank)
    lengths = np.array([len(f) for f in data["clip_features"]])

    def batch_loss(idx: np.ndarray) -> torch.Tensor:
        first = data["windows"][idx]  # (B, 2)
        # the second view: the same clip, shifted by up to MAX_VIEW_SHIFT_FRAMES, kept inside it
        shift = torch.randint(-MAX_VIEW_SHIFT_FRAMES, MAX_VIEW_SHIFT_FRAMES + 1, (len(idx),), generator=gen)
        second = first.copy()
        second[:, 1] = np.clip(first[:, 1] + shift.numpy(), 0, lengths[first[:, 0]] - W)
        views = [
            augment(gather_windows(data["clip_features"], w, W), config["n_mels"], gen) for w in (first, second)
        ]
        return nt_xent(model(views[0]), model(views[1]), config["temperature"])

    run_epochs(spec, model, opt, len(data["windows"]), batch_loss, rank, world)


def cnn_loop(config: dict) -> None:
    rank, world = worker_setup(config)
    spec: StageSpec = config["spec"]
    data = ray.get(config["data_ref"])  # clip_features, windows (M, 2), targets, weights (M, L)
    W, n_mels = config["window_frames"], config["model_config"].n_mels
    model = prepare_model(LogMelCnn(config["model_config"]))
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=1e-3)

    def batch_loss(idx: np.ndarray) -> torch.Tensor:
        x = gather_windows(data["clip_features"], data["windows"][idx], W)  # (B, W, S * n_mels)
        image = x.reshape(len(idx), -1, n_mels)  # (B, W * S, n_mels): time x mel
        return F.binary_cross_entropy_with_logits(
            model(image), torch.tensor(data["targets"][idx]), weight=torch.tensor(data["weights"][idx])
        )

    run_epochs(spec, model, opt, len(data["windows"]), batch_loss, rank, world)
