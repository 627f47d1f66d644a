"""`soundfleet eval`: a bundle on a labelled dataset, through the path the system runs.

Audio -> the bundle's ONNX edge encoder (what devices run) -> codes -> code
LM and classifier (what the cloud runs) -> one decision per 1 s window at the
bundle's calibrated thresholds -> per-label precision / recall / F1,
macro-F1, mAP and a confusion table, as JSON. Then, per clip, the events the
live event logic raises (``training.eval_events``): recall over clips and
false events per 24 h on the negative pool, at the cloud's settings.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from cloud.events import label_policies
from edge.encoder import EdgeEncoder
from shared_models import bundle
from shared_models.detector import classify_windows, load_cloud_models
from soundfleet.config import CloudConfig
from training.dataset import load_framed
from training.eval_events import event_metrics
from training.evaluate import (
    average_precision,
    confusion_table,
    precision_recall_curves,
    window_metrics,
)
from training.pipeline import window_inputs
from training.sources import load_dataset

log = logging.getLogger(__name__)


class EvalError(ValueError):
    """The dataset cannot be evaluated with this bundle (e.g. labels it does not know)."""


def evaluate_bundle(bundle_dir: Path, data_dir: Path, cloud_config: CloudConfig | None = None) -> dict:
    manifest = bundle.verify_bundle(Path(bundle_dir))
    labels = tuple(manifest["labels"])
    dataset = load_dataset(Path(data_dir))
    unknown = sorted({e.label for clip in dataset.clips for e in clip.events} - set(labels))
    if unknown:
        raise EvalError(f"{data_dir} has labels the bundle {manifest['model_version']} was not trained on: "
                        f"{', '.join(unknown)} (bundle labels: {', '.join(labels)})")
    framed = load_framed(dataset.clips, labels)
    encoder = EdgeEncoder(bundle_dir)
    codes = [torch.tensor(encoder.encode(clip.patches).codes.astype(np.int64)) for clip in framed]
    _, code_lm, classifier, centroids = load_cloud_models(Path(bundle_dir))
    window = classifier.config.window_frames
    win = window_inputs(framed, codes, code_lm, window, window)
    probs = classify_windows(classifier, centroids, torch.tensor(win["states"]), torch.tensor(win["codes"])).numpy()
    thresholds = manifest.get("thresholds")
    metrics = window_metrics(probs, win["targets"], win["weights"], labels, thresholds)
    metrics["mAP"] = average_precision(probs, win["targets"], win["weights"], labels)
    metrics["confusion"] = confusion_table(probs, win["targets"], win["weights"], labels, thresholds)
    metrics["pr_curves"] = precision_recall_curves(probs, win["targets"], win["weights"], labels)
    policies = label_policies(cloud_config or CloudConfig(), manifest)
    events = event_metrics(dataset.clips, labels, policies, encoder, code_lm, classifier, centroids,
                           manifest["code_lm_config"]["context_frames"])
    log.info("%s on %s: macro-F1 %.3f, mAP %.3f over %d windows; %s false events per 24 h on %.2f h of negatives",
             manifest["model_version"], data_dir, metrics["macro_f1"], metrics["mAP"]["mean"], len(probs),
             events["negative_pool"]["false_events_per_24h"], events["negative_pool"]["hours"])
    return {
        "model_version": manifest["model_version"],
        "data": {"path": str(data_dir), "layout": dataset.layout, "sha256": dataset.data_sha256,
                 "clips": len(dataset.clips)},
        "metrics": metrics,
        "events": {**events, "policies": {label: vars(p) for label, p in policies.items()}},
    }
