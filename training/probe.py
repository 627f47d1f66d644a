"""Linear probes and single-label window classes for the S2 comparison.

S2 judges a representation by how well a *linear* classifier reads the
window's class from it. The probe here is multinomial logistic regression on
standardised features, fitted full batch with L-BFGS: no shuffling, no
learning-rate schedule, so the same features always give the same accuracy,
and two representations differ only by what they encode. It is an evaluation
protocol fitted in seconds on the driver, not a model that ships; every
representation it reads was trained through Ray Train.

Window classes: the built-in corpus is multi-label, S2's task is single-label
(acoustic scene). A window's class is its most present positive event label
(``window_targets`` decides what is positive), "background" when no label is
positive and none is ambiguous; windows with only ambiguous labels are left out.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from training.dataset import FramedClip, window_targets

BACKGROUND = "background"
SKIP = -1
"""Class of a window that is left out: a label only partly inside it, none clearly present."""


def window_classes(clips: list[FramedClip], window: int, stride: int) -> np.ndarray:
    """One class index per window, in ``pipeline.window_inputs`` order (clip, then end frame).

    Index L (the label count) is background; SKIP marks left-out windows.
    """
    classes = []
    for clip in clips:
        n_labels = clip.labels.shape[1]
        for end in range(window, len(clip.labels) + 1, stride):
            target, weight = window_targets(clip.labels, end - window, window)
            if target.any():
                present = clip.labels[end - window : end].sum(axis=0) * target  # (L,)
                classes.append(int(present.argmax()))
            elif weight.all():
                classes.append(n_labels)
            else:
                classes.append(SKIP)
    return np.array(classes, dtype=np.int64)


def window_starts(clips: list[FramedClip], window: int, stride: int) -> np.ndarray:
    """(M, 2) (clip index, start frame) of every window, in ``window_classes`` order."""
    return np.array(
        [(c, end - window) for c, clip in enumerate(clips) for end in range(window, len(clip.labels) + 1, stride)],
        dtype=np.int64,
    )


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    num_classes: int,
    l2: float = 1e-3,
    iterations: int = 200,
) -> dict[str, float]:
    """Fit logistic regression on (train_x, train_y), score on the test set.

    Returns accuracy and balanced accuracy (mean per-class recall, which is
    not flattered by the many background windows).
    """
    keep_train, keep_test = train_y != SKIP, test_y != SKIP
    x, y = torch.tensor(train_x[keep_train], dtype=torch.float64), torch.tensor(train_y[keep_train])
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        tx = (torch.tensor(test_x[keep_test], dtype=torch.float64) - mean) / std
        pred = (tx @ weight + bias).argmax(-1).numpy()
    return {**class_scores(pred, test_y[keep_test]), "train_windows": int(keep_train.sum())}


def class_scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Accuracy and balanced accuracy (mean recall over the classes present in ``truth``)."""
    recalls = [float((pred[truth == c] == c).mean()) for c in np.unique(truth)]
    return {
        "accuracy": round(float((pred == truth).mean()), 4),
        "balanced_accuracy": round(float(np.mean(recalls)), 4),
        "test_windows": len(truth),
    }
