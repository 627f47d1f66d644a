"""Serve deployments for the two cloud models, each with dynamic batching.

Replicas hold only weights: the per-device context arrives with each request
(it lives in Redis), so any replica can serve any device and a restarted
replica loses nothing. A request carries many windows (the ingest sends every
window of one round in one request, ``POST /v1/classify`` those of a clip), and
``@serve.batch`` merges the requests that arrive together (other ingest workers
and replicas, the API) into one forward pass. The windows of each pass go to the
Redis histogram ``batch_size_<model>`` (one pipelined round trip per pass),
exported by ``/metrics``.

A request the model cannot take costs only itself: ``@serve.batch`` hands one exception
to every request of a failed pass, so a failed pass is run again request by request
(`per_request`) and only the requests that fail alone raise, to their own callers (the
ingest then dead-letters just that device's frames: `cloud.pipeline`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import redis
import torch
from ray import serve

from cloud.store import CloudStore
from shared_models.detector import classify_windows, lm_window_states, load_cloud_models

log = logging.getLogger(__name__)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class BatchSizes:
    """Records batch sizes in a Redis histogram. A Redis error is logged, never raised into
    inference, and pauses recording for ``PAUSE_S`` so a dead Redis costs one timeout a minute."""

    PAUSE_S = 60.0

    def __init__(self, name: str, redis_url: str, key_prefix: str):
        self.name = name
        self.store = CloudStore(redis_url, key_prefix) if redis_url else None
        self._paused_until = 0.0

    def record(self, size: int) -> None:
        if self.store is None or time.monotonic() < self._paused_until:
            return
        try:
            self.store.observe(self.name, [size])
        except redis.RedisError as exc:
            log.warning("cannot record %s in Redis (paused %.0f s): %s", self.name, self.PAUSE_S, exc)
            self._paused_until = time.monotonic() + self.PAUSE_S


@serve.deployment
class CodeLM:
    """S2 code Transformer: hidden states of the latest window of each device's context."""

    def __init__(self, bundle_dir: str, max_batch_size: int, batch_wait_timeout_s: float,
                 redis_url: str = "", key_prefix: str = "sf:"):
        torch.set_num_threads(1)
        self.batch_sizes = BatchSizes("batch_size_code_lm", redis_url, key_prefix)
        manifest, code_lm, _, _ = load_cloud_models(Path(bundle_dir))
        self.device = _device()
        self.code_lm = code_lm.to(self.device)
        self.window = manifest["classifier_config"]["window_frames"]
        self._states_batch.set_max_batch_size(max_batch_size)
        self._states_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        log.info("CodeLM ready on %s (model %s)", self.device, manifest["model_version"])

    async def states(self, contexts: list[np.ndarray]) -> np.ndarray:
        """A list of (T_i,) uint16 contexts -> (n, W, C) float32 states of their last windows."""
        return _raised(await self._states_batch(contexts))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _states_batch(self, requests: list[list[np.ndarray]]) -> list[np.ndarray | Exception]:
        return per_request(self._states, requests)

    def _states(self, requests: list[list[np.ndarray]]) -> list[np.ndarray]:
        contexts = [torch.as_tensor(c.astype(np.int64), device=self.device) for r in requests for c in r]
        self.batch_sizes.record(len(contexts))
        states = lm_window_states(self.code_lm, contexts, self.window).cpu().numpy()  # (N, W, C)
        return _split(states, [len(r) for r in requests])


@serve.deployment
class Classifier:
    """Scene/event classifier: one probability per label for each window."""

    def __init__(self, bundle_dir: str, max_batch_size: int, batch_wait_timeout_s: float,
                 redis_url: str = "", key_prefix: str = "sf:"):
        torch.set_num_threads(1)
        self.batch_sizes = BatchSizes("batch_size_classifier", redis_url, key_prefix)
        manifest, _, classifier, centroids = load_cloud_models(Path(bundle_dir))
        self.device = _device()
        self.classifier = classifier.to(self.device)
        self.centroids = centroids.to(self.device)
        self._probs_batch.set_max_batch_size(max_batch_size)
        self._probs_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        log.info("Classifier ready on %s (model %s)", self.device, manifest["model_version"])

    async def probs(self, states: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """(n, W, C) states and (n, W) codes of n windows -> (n, L) probabilities."""
        return _raised(await self._probs_batch(states, codes))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _probs_batch(self, states: list[np.ndarray], codes: list[np.ndarray]) -> list[np.ndarray | Exception]:
        return per_request(self._probs, states, codes)

    def _probs(self, states: list[np.ndarray], codes: list[np.ndarray]) -> list[np.ndarray]:
        s = torch.as_tensor(np.concatenate(states), device=self.device)  # (N, W, C)
        c = torch.as_tensor(np.concatenate(codes).astype(np.int64), device=self.device)  # (N, W)
        self.batch_sizes.record(len(s))
        probs = classify_windows(self.classifier, self.centroids, s, c).cpu().numpy()  # (N, L)
        return _split(probs, [len(x) for x in states])


def per_request(compute, *columns: list) -> list:
    """``compute`` over a whole batch (one list per argument, an item per request); if that
    raises, over each request alone, so that only the requests the model cannot take fail:
    their slots hold the exception, which ``_raised`` raises to that request's caller."""
    try:
        return compute(*columns)
    except Exception as exc:
        log.warning("a batch of %d requests failed (%s: %s); running them one by one",
                    len(columns[0]), type(exc).__name__, exc)
    results: list = []
    for request in zip(*columns, strict=True):
        try:
            results += compute(*([item] for item in request))
        except Exception as exc:
            results.append(exc)
    return results


def _raised(result: np.ndarray | Exception) -> np.ndarray:
    if isinstance(result, Exception):
        raise result
    return result


def _split(batch: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """One merged batch back into the requests it came from, in order."""
    return np.split(batch, np.cumsum(sizes)[:-1])
