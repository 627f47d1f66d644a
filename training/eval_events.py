"""Events on whole clips through the product's path: what a household would be told.

Each clip: audio at 16 kHz -> the bundle's ONNX edge encoder (what a device runs) ->
codes -> the windows the ingest forms, one per second with its code LM context
(``cloud.classify.clip_windows``) -> code LM states and classifier probabilities
(``shared_models.detector``) -> the live event logic with the cloud's policies
(``cloud.events``) -> events, exactly what ``POST /v1/classify`` returns for that clip.

- A clip that carries label X is *detected* when an event of X is raised in it:
  recall per label is over clips.
- Any event of a label a clip does not carry is a *false event*.
- A clip shorter than one classifier window (a 0.4 s bark) is padded with digital silence
  to one window, as if the device had heard nothing around it, and counted as padded.
- The *negative pool* is what must stay quiet: clips with no label, and speech clips
  for every label but speech. ``false_events_per_24h`` is the pool's false events
  per 24 h of its audio: the product's first metric.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np
import torch

from cloud.classify import clip_events, clip_windows
from cloud.events import EventPolicy
from edge.encoder import EdgeEncoder
from edge.resample import resample
from shared_models.constants import PATCH_SAMPLES, SAMPLE_RATE_HZ
from shared_models.detector import classify_windows, lm_window_states
from shared_models.wavio import read_wav
from training.sources import Clip

SECONDS_PER_DAY = 24 * 3600
QUIET_LABELS = frozenset({"speech"})  # a clip of only these is in the negative pool for the other labels


def clip_probabilities(encoder: EdgeEncoder, code_lm, classifier, centroids: torch.Tensor, audio: np.ndarray,
                       window_frames: int, context_frames: int) -> tuple[list, np.ndarray]:
    """(the ingest's windows, their (N, L) probabilities) for one 16 kHz clip."""
    n_frames = len(audio) // PATCH_SAMPLES  # an incomplete last patch is dropped, as on the edge
    patches = audio[: n_frames * PATCH_SAMPLES].reshape(n_frames, PATCH_SAMPLES)  # (N, PATCH_SAMPLES)
    codes = encoder.encode(patches).codes
    windows = clip_windows(codes, window_frames, context_frames)
    if not windows:
        return [], np.zeros((0, classifier.config.num_labels), np.float32)
    states = lm_window_states(code_lm, [torch.tensor(w.context.astype(np.int64)) for w in windows], window_frames)
    window_codes = torch.tensor(np.stack([w.codes for w in windows]).astype(np.int64))  # (N, W)
    return windows, classify_windows(classifier, centroids, states, window_codes).numpy()


def event_metrics(clips: Iterable[Clip], labels: tuple[str, ...], policies: dict[str, EventPolicy],
                  encoder: EdgeEncoder, code_lm, classifier, centroids: torch.Tensor, context_frames: int) -> dict:
    window = classifier.config.window_frames
    clips_with = Counter()
    detected = Counter()
    false_by_label = Counter()
    pool_false = Counter()
    pool_s = 0.0
    padded = 0
    for clip in clips:
        audio, rate = read_wav(clip.wav_path)
        if rate != SAMPLE_RATE_HZ:
            audio = resample(audio, rate, SAMPLE_RATE_HZ)
        heard_s = len(audio) / SAMPLE_RATE_HZ  # padding is not listening time
        if len(audio) < window * PATCH_SAMPLES:
            audio = np.concatenate([audio, np.zeros(window * PATCH_SAMPLES - len(audio), np.float32)])
            padded += 1
        windows, probs = clip_probabilities(encoder, code_lm, classifier, centroids, audio, window, context_frames)
        carried = {e.label for e in clip.events}
        raised = [label for label, _ in clip_events(windows, list(probs), list(labels), policies, window)]
        for label in carried:
            clips_with[label] += 1
            detected[label] += label in raised
        false = [label for label in raised if label not in carried]
        false_by_label.update(false)
        if carried <= QUIET_LABELS:
            pool_s += heard_s
            pool_false.update(false)
    pool_days = pool_s / SECONDS_PER_DAY
    return {
        "recall": {label: {"clips": clips_with[label], "detected": detected[label],
                           "recall": round(detected[label] / clips_with[label], 4)}
                   for label in labels if clips_with[label]},
        "false_events": dict(sorted(false_by_label.items())),
        "negative_pool": {"hours": round(pool_s / 3600, 3), "false_events": sum(pool_false.values()),
                          "false_events_by_label": dict(sorted(pool_false.items())),
                          "false_events_per_24h": round(sum(pool_false.values()) / pool_days, 2) if pool_days else None},
        "clips_padded": padded,
    }
