"""The log-mel CNN baseline, trained through Ray Train on the scene classifier's own windows.

Two comparisons use it: S3's (``training.s3_experiment``, on the built-in corpus) and the
real-audio one (``training.real_compare``, on real recordings). Either way the CNN reads
the same 1 s windows, with the same targets and loss weights, as the product's classifier,
only as log-mel images (``shared_models.cnn_baseline``) instead of code-LM states. Its
width is the narrowest one with at least as many parameters as the model it is compared
with, so a win of the product's path cannot come from a smaller baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from shared_models.autoencoder import AutoencoderConfig, LogMelPatches
from shared_models.cnn_baseline import CnnConfig, LogMelCnn, widen_to
from training import baseline_stages
from training.dataset import FramedClip
from training.ray_stage import StageSpec, fit_stage


@dataclass
class TrainedCnn:
    """A fitted CNN and the log-mel standardisation it was trained with."""

    model: LogMelCnn
    mean: torch.Tensor  # (S * n_mels,) over the training clips' frames
    std: torch.Tensor

    def features(self, clip: FramedClip) -> np.ndarray:
        """(N, S * n_mels) standardised log-mel of one clip's frames."""
        with torch.no_grad():
            return ((LOG_MEL(torch.tensor(clip.patches)) - self.mean) / self.std).numpy()

    def window_probabilities(self, clips: list[FramedClip], spans: list[tuple[int, int]], window: int) -> np.ndarray:
        """(M, L) probabilities of the windows ``spans`` ((clip index, end frame)) name."""
        features = [self.features(c) for c in clips]
        n_mels = self.model.config.n_mels
        out = []
        with torch.no_grad():
            for i in range(0, len(spans), 256):
                starts = np.array([(k, end - window) for k, end in spans[i : i + 256]], np.int64).reshape(-1, 2)
                x = baseline_stages.gather_windows(features, starts, window)  # (B, W, S * n_mels)
                out.append(torch.sigmoid(self.model(x.reshape(len(x), -1, n_mels))))  # image: (B, W * S, n_mels)
        return torch.cat(out).numpy() if out else np.zeros((0, self.model.config.num_labels), np.float32)


LOG_MEL = LogMelPatches(AutoencoderConfig())
"""The log-mel front of every CNN baseline: parameter-free (a fixed STFT and mel matrix)."""


def fit_cnn(
    clips: list[FramedClip],
    spans: list[tuple[int, int]],
    targets: np.ndarray,
    weights: np.ndarray,
    window: int,
    min_parameters: int,
    spec: StageSpec,
    run: dict[str, Any],
    n_blocks: int = 4,
) -> TrainedCnn:
    """Train a ``LogMelCnn`` on the windows ``spans`` of ``clips`` with multi-label
    ``targets`` and ``weights`` (M, L) (masked BCE, ``baseline_stages.cnn_loop``)."""
    with torch.no_grad():
        raw = [LOG_MEL(torch.tensor(c.patches)) for c in clips]  # (N_i, S * n_mels) each
        frames = torch.cat(raw)
        mean, std = frames.mean(0), frames.std(0).clamp_min(1e-6)
        features = [((r - mean) / std).numpy() for r in raw]
    del raw, frames
    config = widen_to(CnnConfig(n_mels=LOG_MEL.config.n_mels, num_labels=targets.shape[1], n_blocks=n_blocks),
                      min_parameters)
    state = fit_stage(
        spec.name,
        baseline_stages.cnn_loop,
        {
            "spec": spec,
            "model_config": config,
            "window_frames": window,
            "data_ref": ray.put({
                "clip_features": features,
                "windows": np.array([(k, end - window) for k, end in spans], np.int64).reshape(-1, 2),
                "targets": targets,
                "weights": weights,
            }),
        },
        **run,
    )
    model = LogMelCnn(config)
    model.load_state_dict(state["model"])
    return TrainedCnn(model.eval(), mean, std)
