"""Window-level multi-label metrics: per-class precision, recall, F1 and macro-F1."""

from __future__ import annotations

import numpy as np


def window_metrics(
    probs: np.ndarray,
    targets: np.ndarray,
    weights: np.ndarray,
    labels: tuple[str, ...],
    threshold: float = 0.5,
) -> dict:
    """probs, targets, weights: (M, L). Windows with weight 0 for a label are ambiguous and skipped."""
    pred = probs >= threshold
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
        "threshold": threshold,
        "windows": int(len(probs)),
        "per_class": per_class,
    }
