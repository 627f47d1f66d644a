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

import dataclasses
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

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


@dataclass
class ScoredClip:
    """One clip through the product's path: its windows, their (N, L) probabilities, the labels
    it carries and how long it was heard (padding excluded)."""

    windows: list
    probs: np.ndarray
    carried: frozenset[str]
    heard_s: float

    @property
    def in_pool(self) -> bool:
        """Part of the negative pool: it carries nothing but quiet labels (speech)."""
        return self.carried <= QUIET_LABELS


def window_probabilities(codes: np.ndarray, code_lm, classifier, centroids: torch.Tensor,
                         window_frames: int, context_frames: int) -> tuple[list, np.ndarray]:
    """(the ingest's windows, their (N, L) probabilities) for one clip's codes."""
    windows = clip_windows(codes, window_frames, context_frames)
    if not windows:
        return [], np.zeros((0, classifier.config.num_labels), np.float32)
    states = lm_window_states(code_lm, [torch.tensor(w.context.astype(np.int64)) for w in windows], window_frames)
    window_codes = torch.tensor(np.stack([w.codes for w in windows]).astype(np.int64))  # (N, W)
    return windows, classify_windows(classifier, centroids, states, window_codes).numpy()


def clip_probabilities(encoder: EdgeEncoder, code_lm, classifier, centroids: torch.Tensor, audio: np.ndarray,
                       window_frames: int, context_frames: int) -> tuple[list, np.ndarray]:
    """(the ingest's windows, their (N, L) probabilities) for one 16 kHz clip."""
    n_frames = len(audio) // PATCH_SAMPLES  # an incomplete last patch is dropped, as on the edge
    patches = audio[: n_frames * PATCH_SAMPLES].reshape(n_frames, PATCH_SAMPLES)  # (N, PATCH_SAMPLES)
    codes = encoder.encode(patches).codes
    return window_probabilities(codes, code_lm, classifier, centroids, window_frames, context_frames)


def score_clips(clips: Iterable[Clip], encoder: EdgeEncoder, code_lm, classifier, centroids: torch.Tensor,
                context_frames: int) -> tuple[list[ScoredClip], int]:
    """Every clip through the edge ONNX encoder and the cloud models; (scored clips, how many padded)."""
    window = classifier.config.window_frames
    scored, padded = [], 0
    for clip in clips:
        audio, rate = read_wav(clip.wav_path)
        if rate != SAMPLE_RATE_HZ:
            audio = resample(audio, rate, SAMPLE_RATE_HZ)
        heard_s = len(audio) / SAMPLE_RATE_HZ  # padding is not listening time
        if len(audio) < window * PATCH_SAMPLES:
            audio = np.concatenate([audio, np.zeros(window * PATCH_SAMPLES - len(audio), np.float32)])
            padded += 1
        windows, probs = clip_probabilities(encoder, code_lm, classifier, centroids, audio, window, context_frames)
        scored.append(ScoredClip(windows, probs, frozenset(e.label for e in clip.events), heard_s))
    return scored, padded


def event_metrics(clips: Iterable[Clip], labels: tuple[str, ...], policies: dict[str, EventPolicy],
                  encoder: EdgeEncoder, code_lm, classifier, centroids: torch.Tensor, context_frames: int) -> dict:
    scored, padded = score_clips(clips, encoder, code_lm, classifier, centroids, context_frames)
    return {**scored_event_metrics(scored, labels, policies, classifier.config.window_frames), "clips_padded": padded}


def scored_event_metrics(scored: list[ScoredClip], labels: tuple[str, ...], policies: dict[str, EventPolicy],
                         window_frames: int) -> dict:
    """Recall over clips, false events, and the negative pool's false events per 24 h."""
    clips_with = Counter()
    detected = Counter()
    false_by_label = Counter()
    pool_false = Counter()
    pool_s = 0.0
    for clip in scored:
        raised = [label for label, _ in clip_events(clip.windows, list(clip.probs), list(labels), policies, window_frames)]
        for label in clip.carried:
            clips_with[label] += 1
            detected[label] += label in raised
        false = [label for label in raised if label not in clip.carried]
        false_by_label.update(false)
        if clip.in_pool:
            pool_s += clip.heard_s
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
    }


# ---- calibration: the lowest on-threshold per label that keeps the false-alarm budget ----

CALIBRATION_GRID = (*(round(0.30 + 0.01 * i, 2) for i in range(70)), 0.995, 0.999)
"""On-thresholds tried, lowest first: 0.30 .. 0.99 by 0.01, then 0.995 and 0.999 (real negatives
often score above 0.99 on some label; a step of 0.01 would end the search there)."""


def label_event_count(clip: ScoredClip, j: int, policy: EventPolicy, window_frames: int) -> int:
    """How many events label ``j`` raises in one scored clip under ``policy``."""
    if not len(clip.probs) or clip.probs[:, j].max() < policy.on_threshold:
        return 0  # never reaches the threshold: no event (the common case, checked in numpy)
    return len(clip_events(clip.windows, list(clip.probs[:, j : j + 1]), ["x"], {"x": policy}, window_frames))


def at_threshold(policy: EventPolicy, on_threshold: float, min_windows: int | None = None) -> EventPolicy:
    """``policy`` with its on-threshold moved (the off-threshold never above it), and its
    minimum windows when given."""
    return dataclasses.replace(policy, on_threshold=on_threshold, off_threshold=min(policy.off_threshold, on_threshold),
                               min_windows=policy.min_windows if min_windows is None else min_windows)


def calibrate_event_thresholds(scored: list[ScoredClip], labels: tuple[str, ...], policies: dict[str, EventPolicy],
                               window_frames: int, budget_per_24h: float,
                               grid: tuple[float, ...] = CALIBRATION_GRID,
                               min_windows: tuple[int, ...] = (1,)) -> tuple[dict[str, float], dict[str, int], dict]:
    """Per label, the lowest on-threshold of ``grid`` whose false events on the negative pool
    of ``scored`` stay within the label's share of ``budget_per_24h`` (the budget is for all
    labels together, so each gets ``1 / len(labels)`` of it); the grid's top when none does.

    With several ``min_windows`` (consecutive windows above the threshold before an event
    starts), that search runs for each, and the label keeps the one whose threshold gives the
    best recall over the clips that carry it (the smallest on a tie: events start soonest). A
    long sound (a siren, speech) can then demand 3 s above a lower threshold, where a short
    one (a dog's bark) keeps 1 window. Returns (thresholds, min windows, report).

    A short pool cannot resolve a small budget: 1 event per 24 h over 40 minutes allows
    0 events, so the threshold lands just above the pool's loudest false event. The
    report says how many events the pool allowed, and per label and per minimum the
    threshold, the pool's false events and the recall there.
    """
    pool = [c for c in scored if c.in_pool]
    pool_days = sum(c.heard_s for c in pool) / SECONDS_PER_DAY
    allowed = int(np.floor(budget_per_24h * pool_days / max(1, len(labels)) + 1e-9))
    thresholds, minimums = {}, {}
    report = {"budget_per_24h": budget_per_24h, "pool_hours": round(pool_days * 24, 3),
              "false_events_allowed_per_label": allowed, "labels": {}}
    for j, label in enumerate(labels):
        negatives = [c for c in pool if label not in c.carried]
        positives = [c for c in scored if label in c.carried]
        options = []  # per minimum: (threshold, false events there, recall there)
        for m in min_windows:
            chosen, false = grid[-1], None
            for t in grid:
                false = sum(label_event_count(c, j, at_threshold(policies[label], t, m), window_frames) for c in negatives)
                if false <= allowed:
                    chosen = t
                    break
            policy = at_threshold(policies[label], chosen, m)
            hits = sum(label_event_count(c, j, policy, window_frames) > 0 for c in positives)
            options.append({"min_windows": m, "on_threshold": chosen, "pool_false_events": false,
                            "recall": round(hits / len(positives), 4) if positives else None})
        best = max(options, key=lambda o: (o["recall"] or 0.0, -o["min_windows"]))
        thresholds[label], minimums[label] = best["on_threshold"], best["min_windows"]
        report["labels"][label] = {**best, "positive_clips": len(positives),
                                   **({"tried": options} if len(options) > 1 else {})}
    return thresholds, minimums, report
