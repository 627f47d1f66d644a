"""The ingest's calls to the two model deployments: chunked, chained, retried, and a
device whose windows the models refuse set apart instead of stalling the round.

A model that is away (a dead replica Serve restarts, an overloaded router) is waited for: the
round's items wait at their heads in the device log. A model whose code raises on the input
(``RayTaskError``) gets ``MODEL_ATTEMPTS`` calls; then each device's windows go alone (the model
replicas run a failed batch request by request too: `cloud.models.per_request`), and the
devices the models still refuse alone are returned to the round, which dead-letters their items.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

import numpy as np
from ray.exceptions import RayTaskError

log = logging.getLogger(__name__)

WINDOWS_PER_REQUEST = 256  # windows per model request; a round's requests go out together
MODEL_RETRY_S = 0.5  # wait before retrying a failed model call (Serve is restarting a replica)
MODEL_ATTEMPTS = 3  # calls a round's windows get when the model code raises on them, before device by device


class ModelCalls:
    """The CodeLM and Classifier deployment handles, as one call over a round's windows."""

    def __init__(self, code_lm: Any, classifier: Any, window_frames: int, n_labels: int):
        self.code_lm, self.classifier = code_lm, classifier
        self.window, self.n_labels = window_frames, n_labels

    def classify(self, windows: list[np.ndarray], spans: list[tuple[int, int]],
                 counts: Counter[str]) -> tuple[np.ndarray, dict[int, str]]:
        """(N, L) label probabilities of each context's last window, and the devices (indices
        into ``spans``) whose windows the models refused, with the reason.

        A model that is away (a dead replica Serve restarts, an overloaded router) is waited
        for: the items wait at their heads. A model whose code raises on the input
        (``RayTaskError``) gets ``MODEL_ATTEMPTS`` calls; then each device's windows go alone,
        and a device the models still refuse is returned, so the round goes on without it."""
        if not windows:
            return np.zeros((0, self.n_labels), dtype=np.float32), {}
        refusals = 0
        while True:
            try:
                return self._call_models(windows), {}
            except RayTaskError as exc:
                refusals += 1
                if refusals >= MODEL_ATTEMPTS:
                    log.warning("the models refused a round of %d windows %d times (%s); trying device by device",
                                len(windows), refusals, _cause(exc))
                    return self._classify_each(windows, spans, counts)
                self._retry(exc, len(windows), counts)
            except Exception as exc:  # RayActorError, a replica being replaced, ...
                self._retry(exc, len(windows), counts)

    def _classify_each(self, windows: list[np.ndarray], spans: list[tuple[int, int]],
                       counts: Counter[str]) -> tuple[np.ndarray, dict[int, str]]:
        probs = np.zeros((len(windows), self.n_labels), dtype=np.float32)  # (N, L)
        refused: dict[int, str] = {}
        for k, (start, end) in enumerate(spans):
            refusals = 0
            while start < end:
                try:
                    probs[start:end] = self._call_models(windows[start:end])
                    break
                except RayTaskError as exc:  # alone, again and again: its own input is the cause
                    refusals += 1
                    if refusals >= MODEL_ATTEMPTS:
                        refused[k] = _cause(exc)
                        break
                    self._retry(exc, end - start, counts)
                except Exception as exc:
                    self._retry(exc, end - start, counts)
        return probs, refused

    def _call_models(self, windows: list[np.ndarray]) -> np.ndarray:
        responses = []
        for i in range(0, len(windows), WINDOWS_PER_REQUEST):
            chunk = windows[i : i + WINDOWS_PER_REQUEST]
            states = self.code_lm.states.remote(chunk)  # chained: never comes back here
            codes = np.stack([c[-self.window :] for c in chunk])  # (n, W)
            responses.append(self.classifier.probs.remote(states, codes))
        return np.concatenate([r.result() for r in responses])  # (N, L)

    @staticmethod
    def _retry(exc: Exception, n_windows: int, counts: Counter[str]) -> None:
        counts["model_retries"] += 1
        log.warning("model call for %d windows failed (%s); retrying in %.1f s", n_windows, _cause(exc),
                    MODEL_RETRY_S)
        time.sleep(MODEL_RETRY_S)


def _cause(exc: Exception) -> str:
    """``Type: message`` of what went wrong (for a ``RayTaskError``, of the exception the
    deployment raised), at most 300 characters."""
    cause = getattr(exc, "cause", None) or exc
    return f"{type(cause).__name__}: {cause}"[:300]
