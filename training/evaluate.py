"""Window-level multi-label metrics: per-class precision, recall, F1 and macro-F1."""

from __future__ import annotations

import numpy as np


def window_metrics(
    probs: np.ndarray,
    targets: np.ndarray,
    weights: np.ndarray,
    labels: tuple[str, ...],
    thresholds: dict[str, float] | None = None,
) -> dict:
    """probs, targets, weights: (M, L). Windows with weight 0 for a label are ambiguous and skipped.

    ``thresholds`` maps label -> decision threshold (default 0.5 for every label).
    """
    cut = np.array([(thresholds or {}).get(name, 0.5) for name in labels])
    pred = probs >= cut
    truth = targets >= 0.5
    mask = weights > 0
    per_class = {}
    for j, name in enumerate(labels):
        m = mask[:, j]
        tp = int((pred[m, j] & truth[m, j]).sum())
        fp = int((pred[m, j] & ~truth[m, j]).sum())
        fn = int((~pred[m, j] & truth[m, j]).sum())
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {
            "precision": round(precision, 4),
            "recall": round(recall, 4),
            "f1": round(f1, 4),
            "support": tp + fn,
        }
    scored = [c["f1"] for c in per_class.values() if c["support"] > 0]
    return {
        "macro_f1": round(float(np.mean(scored)) if scored else 0.0, 4),
        "thresholds": {name: float(t) for name, t in zip(labels, cut, strict=True)},
        "windows": int(len(probs)),
        "per_class": per_class,
    }


def _scored_labels(probs: np.ndarray, targets: np.ndarray, weights: np.ndarray, labels: tuple[str, ...]):
    """Per label with at least one positive: (name, scores, truth) over its unambiguous windows."""
    for j, name in enumerate(labels):
        m = weights[:, j] > 0
        truth = targets[m, j] >= 0.5
        if truth.any():
            yield name, probs[m, j], truth


def average_precision(
    probs: np.ndarray, targets: np.ndarray, weights: np.ndarray, labels: tuple[str, ...]
) -> dict:
    """Per-label average precision (area under the precision-recall steps) and their mean (mAP)."""
    per_label = {}
    for name, scores, truth in _scored_labels(probs, targets, weights, labels):
        order = np.argsort(-scores, kind="stable")
        hits = truth[order]
        precision_at_hit = np.cumsum(hits)[hits] / (np.flatnonzero(hits) + 1)
        per_label[name] = round(float(precision_at_hit.mean()), 4)
    mean = round(float(np.mean(list(per_label.values()))), 4) if per_label else 0.0
    return {"mean": mean, "per_label": per_label}


PR_CURVE_THRESHOLDS = tuple(round(0.025 * i, 3) for i in range(41))  # 0.0 .. 1.0


def precision_recall_curves(
    probs: np.ndarray, targets: np.ndarray, weights: np.ndarray, labels: tuple[str, ...],
    thresholds: tuple[float, ...] = PR_CURVE_THRESHOLDS,
) -> dict[str, dict[str, list[float]]]:
    """Per label with positives: precision and recall of its windows at each threshold.

    Precision is 1.0 where nothing is predicted (the convention that keeps the curve's
    left end at the top).
    """
    curves = {}
    for name, scores, truth in _scored_labels(probs, targets, weights, labels):
        precision, recall = [], []
        for t in thresholds:
            pred = scores >= t
            tp = int((pred & truth).sum())
            precision.append(round(tp / int(pred.sum()), 4) if pred.any() else 1.0)
            recall.append(round(tp / int(truth.sum()), 4))
        curves[name] = {"threshold": list(thresholds), "precision": precision, "recall": recall}
    return curves


def confusion_table(
    probs: np.ndarray,
    targets: np.ndarray,
    weights: np.ndarray,
    labels: tuple[str, ...],
    thresholds: dict[str, float] | None = None,
) -> dict[str, dict[str, int]]:
    """For windows whose true label is X: how often each label (or nothing) was predicted.

    Multi-label, so a window can count towards several cells; row X, column X are the hits.
    """
    cut = np.array([(thresholds or {}).get(name, 0.5) for name in labels])
    pred = probs >= cut
    table = {}
    for j, name in enumerate(labels):
        rows = (targets[:, j] >= 0.5) & (weights[:, j] > 0)
        if not rows.any():
            continue
        counts = {labels[k]: int(pred[rows, k].sum()) for k in range(len(labels)) if pred[rows, k].any()}
        counts["(none)"] = int((~pred[rows].any(axis=1)).sum())
        table[name] = counts
    return table
