"""The comparison baselines and the S2 probe: losses, sizes and window classes behave as specified."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared_models.cnn_baseline import CnnConfig, LogMelCnn, parameter_count, widen_to
from shared_models.patch_transformer import (
    ContrastiveEncoder,
    PatchTransformer,
    PatchTransformerConfig,
    SupervisedPatchClassifier,
    nt_xent,
)
from training.baseline_stages import augment, gather_windows
from training.dataset import FramedClip
from training.probe import SKIP, class_scores, linear_probe, window_classes, window_starts


def test_nt_xent_is_low_when_each_view_matches_its_partner_and_high_when_shuffled():
    torch.manual_seed(0)
    z = torch.randn(32, 16)
    matched = nt_xent(z, z + 0.01 * torch.randn_like(z), temperature=0.1)
    shuffled = nt_xent(z, z[torch.randperm(32)], temperature=0.1)
    assert matched < 0.1
    assert shuffled > 2.0


def test_nt_xent_never_lets_a_view_pick_itself():
    # identical rows everywhere: the only way to a finite loss is excluding the diagonal
    z = torch.ones(4, 8)
    loss = nt_xent(z, z, temperature=0.5)
    assert torch.isfinite(loss)
    assert loss == pytest.approx(np.log(2 * 4 - 1), rel=1e-5)  # uniform over 7 candidates


def test_patch_transformer_shapes_and_pooling():
    config = PatchTransformerConfig(feature_dim=12, window_frames=10, d_model=16, n_heads=2, n_layers=1)
    x = torch.randn(3, 10, 12)
    assert PatchTransformer(config)(x).shape == (3, 10, 16)
    assert SupervisedPatchClassifier(config, 5)(x).shape == (3, 5)
    encoder = ContrastiveEncoder(config, projection_dim=8)
    assert encoder(x).shape == (3, 8)
    assert encoder.encoder.pooled(x).shape == (3, 16)


def test_cnn_widened_to_a_parameter_target_is_the_narrowest_that_reaches_it():
    base = CnnConfig(n_mels=32, num_labels=9, n_blocks=3)
    target = 200_000
    wide = widen_to(base, target)
    assert parameter_count(wide) >= target
    assert parameter_count(CnnConfig(n_mels=32, num_labels=9, n_blocks=3, width=wide.width - 1)) < target
    assert LogMelCnn(wide)(torch.randn(2, 160, 32)).shape == (2, 9)
    with pytest.raises(ValueError, match="no width"):
        widen_to(base, 10**12, max_width=4)


def _clip(n_frames: int, spans: list[tuple[int, int, int]], n_labels: int = 3) -> FramedClip:
    labels = np.zeros((n_frames, n_labels), dtype=np.float32)
    for label, start, end in spans:
        labels[start:end, label] = 1.0
    return FramedClip(np.zeros((n_frames, 400), dtype=np.float32), labels)


def test_window_classes_pick_the_dominant_label_background_or_skip():
    # frames 0-39: label 1 fills the window; 40-79: nothing; 80-119: 5 of label 0's 25 frames
    # (ambiguous: neither clearly in nor out); 120-159: label 2 fills it and label 0 has 20
    # frames (both positive), label 2 has more
    clip = _clip(160, [(1, 0, 40), (0, 115, 140), (2, 120, 160)])
    classes = window_classes([clip], window=40, stride=40)
    assert classes.tolist() == [1, 3, SKIP, 2]
    assert window_starts([clip], 40, 40).tolist() == [[0, 0], [0, 40], [0, 80], [0, 120]]


def test_linear_probe_separates_separable_classes_and_not_random_labels():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 8)) * 5
    y = rng.integers(0, 4, 400)
    x = centres[y] + rng.normal(size=(400, 8))
    good = linear_probe(x[:300], y[:300], x[300:], y[300:], 4)
    assert good["accuracy"] > 0.95
    shuffled = linear_probe(x[:300], rng.permutation(y[:300]), x[300:], y[300:], 4)
    assert shuffled["accuracy"] < 0.5
    # skipped windows are left out of fitting and scoring
    y_skip = y.copy()
    y_skip[300:350] = SKIP
    assert linear_probe(x[:300], y[:300], x[300:], y_skip[300:], 4)["test_windows"] == 50


def test_class_scores_balanced_accuracy_is_not_flattered_by_the_majority_class():
    truth = np.array([0] * 90 + [1] * 10)
    pred = np.zeros(100, dtype=int)  # always the majority
    scores = class_scores(pred, truth)
    assert scores["accuracy"] == 0.9
    assert scores["balanced_accuracy"] == 0.5


def test_gathered_windows_and_contrastive_views_keep_shape_and_differ():
    feats = [np.arange(50 * 64, dtype=np.float32).reshape(50, 64), np.ones((45, 64), dtype=np.float32)]
    windows = gather_windows(feats, np.array([[0, 3], [1, 5]]), 40)
    assert windows.shape == (2, 40, 64)
    assert torch.equal(windows[0, 0], torch.tensor(feats[0][3]))
    gen = torch.Generator().manual_seed(0)
    a, b = augment(windows, 32, gen), augment(windows, 32, gen)
    assert a.shape == windows.shape
    assert not torch.allclose(a, b)
    # exactly one band of n_mels // 8 mel bins is zeroed in every sub-frame of every frame
    zero_bins = (a.reshape(2, 40, 2, 32) == 0).all(dim=(1, 2)).sum(dim=-1)
    assert zero_bins.tolist() == [4, 4]
