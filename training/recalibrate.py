"""Calibrate a trained bundle's event thresholds again, without training anything.

``soundfleet calibrate --models BUNDLE --out DIR`` rebuilds the bundle's validation split
from the data its manifest names (sha256 checked first), scores it through the bundle's own
edge model (ONNX) and cloud models, and runs the same false-alarm calibration as training
(``training.eval_events.calibrate_event_thresholds``) with a new budget or a new range of
minimum windows. The copy in ``DIR`` has the same models byte for byte (no rollout: the
edge model and codebook are unchanged) and a manifest with the new ``thresholds``,
``min_windows`` and ``training.calibration``, and a ``recalibrated`` record of what was
done. Its ``model_version`` gets a suffix, so events say which settings raised them."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from cloud.events import label_policies
from edge.encoder import EdgeEncoder
from shared_models import bundle
from shared_models.constants import FRAMES_PER_SECOND
from shared_models.detector import load_cloud_models
from soundfleet.config import CloudConfig
from training.eval_events import ScoredClip, calibrate_event_thresholds, window_probabilities
from training.real_compare import CompareError, bundle_data

log = logging.getLogger(__name__)


class CalibrateError(RuntimeError):
    """The bundle cannot be calibrated again here (no training record, other data, a bad output)."""


def recalibrate(bundle_dir: Path, out_dir: Path, *, budget_per_24h: float | None = None,
                max_min_windows: int | None = None, command: str = "soundfleet calibrate") -> dict[str, Any]:
    """Write ``bundle_dir`` calibrated again to ``out_dir``; returns the new manifest."""
    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    if out_dir.resolve() == bundle_dir.resolve():
        raise CalibrateError("--out must be a new directory, not the bundle itself")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CalibrateError(f"{out_dir} exists and is not empty")
    started = time.monotonic()
    try:
        data, cfg, manifest = bundle_data(bundle_dir)  # the same split as the training run
    except CompareError as exc:
        raise CalibrateError(str(exc)) from None
    bundle.verify_bundle(bundle_dir)
    budget = cfg.false_events_per_24h if budget_per_24h is None else budget_per_24h
    top = cfg.calibration_max_min_windows if max_min_windows is None else max_min_windows
    if not budget >= 0 or not 1 <= top <= 10:
        raise CalibrateError(f"need a budget >= 0 and max min windows in [1, 10], got {budget}, {top}")
    labels = tuple(manifest["labels"])

    encoder = EdgeEncoder(bundle_dir)
    _, code_lm, classifier, centroids = load_cloud_models(bundle_dir)
    window, context = classifier.config.window_frames, code_lm.config.context_frames
    scored = []
    for n, i in enumerate(data.val_idx, 1):
        clip = data.framed[i]
        windows, probs = window_probabilities(encoder.encode(clip.patches).codes, code_lm, classifier, centroids,
                                              window, context)
        scored.append(ScoredClip(windows, probs, clip.carried(labels),
                                 (len(clip.patches) - clip.padded_frames) / FRAMES_PER_SECOND))
        if n % 200 == 0 or n == len(data.val_idx):
            log.info("scored %d of %d validation clips", n, len(data.val_idx))
    thresholds, min_windows, calibration = calibrate_event_thresholds(
        scored, labels, label_policies(CloudConfig(), {"labels": list(labels)}), window, budget,
        min_windows=tuple(range(1, top + 1)))
    log.info("new thresholds (min windows): %s", {k: f"{thresholds[k]} ({min_windows[k]})" for k in labels})

    out_dir.mkdir(parents=True, exist_ok=True)
    for name in manifest["sha256"]:  # every model file, byte for byte
        shutil.copyfile(bundle_dir / name, out_dir / name)
    settings = json.dumps({"thresholds": thresholds, "min_windows": min_windows}, sort_keys=True)
    new = {
        **manifest,
        "model_version": f"{manifest['model_version']}-cal{hashlib.sha256(settings.encode()).hexdigest()[:6]}",
        "thresholds": thresholds,
        "min_windows": min_windows,
        "training": {**manifest["training"], "calibration": calibration},
        "recalibrated": {"from": manifest["model_version"], "command": command, "budget_per_24h": budget,
                         "max_min_windows": top, "previous_thresholds": manifest.get("thresholds"),
                         "previous_min_windows": manifest.get("min_windows"),
                         "wall_time_s": round(time.monotonic() - started, 1)},
    }
    (out_dir / bundle.MANIFEST).write_text(json.dumps(new, indent=2, sort_keys=True) + "\n")
    bundle.verify_bundle(out_dir)
    log.info("calibrated %s again as %s in %.0f s", manifest["model_version"], new["model_version"],
             time.monotonic() - started)
    return new

