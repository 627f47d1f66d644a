"""Window-level metrics of training.evaluate: average precision and precision-recall curves."""

from __future__ import annotations

import numpy as np

from training.evaluate import average_precision, precision_recall_curves


def test_precision_recall_curves_follow_the_ranking_and_skip_ambiguous_windows():
    probs = np.array([[0.9], [0.8], [0.6], [0.4], [0.2], [0.95]], np.float32)
    targets = np.array([[1], [0], [1], [1], [0], [0]], np.float32)
    weights = np.array([[1], [1], [1], [1], [1], [0]], np.float32)  # the 0.95 window is ambiguous
    curve = precision_recall_curves(probs, targets, weights, ("siren",), thresholds=(0.0, 0.5, 0.7, 0.85, 1.0))["siren"]
    assert curve["recall"] == [1.0, round(2 / 3, 4), round(1 / 3, 4), round(1 / 3, 4), 0.0]
    assert curve["precision"] == [0.6, round(2 / 3, 4), 0.5, 1.0, 1.0]  # nothing predicted at 1.0: precision 1
    # AP over the same ranking: hits at ranks 1, 3, 4 -> (1 + 2/3 + 3/4) / 3
    assert average_precision(probs, targets, weights, ("siren",))["per_label"]["siren"] == round((1 + 2 / 3 + 3 / 4) / 3, 4)
    assert precision_recall_curves(probs, np.zeros_like(targets), weights, ("siren",)) == {}
