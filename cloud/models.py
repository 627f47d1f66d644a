"""Serve deployments for the two cloud models, each with dynamic batching.

Replicas hold only weights: the per-device context arrives with each request
(it lives in Redis), so any replica can serve any device and a restarted
replica loses nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from ray import serve

from shared_models.detector import classify_windows, lm_window_states, load_cloud_models

log = logging.getLogger(__name__)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@serve.deployment
class CodeLM:
    """S2 code Transformer: hidden states of the latest window of each device's context."""

    def __init__(self, bundle_dir: str, max_batch_size: int, batch_wait_timeout_s: float):
        torch.set_num_threads(1)
        manifest, code_lm, _, _ = load_cloud_models(Path(bundle_dir))
        self.device = _device()
        self.code_lm = code_lm.to(self.device)
        self.window = manifest["classifier_config"]["window_frames"]
        self.states.set_max_batch_size(max_batch_size)
        self.states.set_batch_wait_timeout_s(batch_wait_timeout_s)
        log.info("CodeLM ready on %s (model %s)", self.device, manifest["model_version"])

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def states(self, contexts: list[np.ndarray]) -> list[np.ndarray]:
        """contexts: (T_i,) uint16 codes -> (W, C) float32 states each."""
        tensors = [torch.as_tensor(c.astype(np.int64), device=self.device) for c in contexts]
        return list(lm_window_states(self.code_lm, tensors, self.window).cpu().numpy())


@serve.deployment
class Classifier:
    """Scene/event classifier: one probability per label for each window."""

    def __init__(self, bundle_dir: str, max_batch_size: int, batch_wait_timeout_s: float):
        torch.set_num_threads(1)
        manifest, _, classifier, centroids = load_cloud_models(Path(bundle_dir))
        self.device = _device()
        self.classifier = classifier.to(self.device)
        self.centroids = centroids.to(self.device)
        self.probs.set_max_batch_size(max_batch_size)
        self.probs.set_batch_wait_timeout_s(batch_wait_timeout_s)
        log.info("Classifier ready on %s (model %s)", self.device, manifest["model_version"])

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def probs(self, states: list[np.ndarray], codes: list[np.ndarray]) -> list[np.ndarray]:
        """(W, C) states and (W,) codes per window -> (L,) probabilities."""
        s = torch.as_tensor(np.stack(states), device=self.device)  # (B, W, C)
        c = torch.as_tensor(np.stack(codes).astype(np.int64), device=self.device)  # (B, W)
        return list(classify_windows(self.classifier, self.centroids, s, c).cpu().numpy())
