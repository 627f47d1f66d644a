"""The VQ codebook: k-means (full and mini-batch) finds clusters, keeps codes alive, is deterministic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared_models.codebook import codebook_id, kmeans, nearest_code


def _blobs(centres: int, per_centre: int, dim: int = 16, spread: float = 0.05, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    truth = torch.randn(centres, dim, generator=gen) * 3.0  # (C, D), far apart relative to spread
    points = truth.repeat_interleave(per_centre, 0) + spread * torch.randn(centres * per_centre, dim, generator=gen)
    return truth, points


def _inertia(x: torch.Tensor, centroids: torch.Tensor) -> float:
    return float((x - centroids[nearest_code(x, centroids)]).pow(2).sum(-1).mean())


@pytest.mark.parametrize("minibatch", [None, 512])
def test_kmeans_recovers_well_separated_clusters(minibatch):
    truth, x = _blobs(centres=32, per_centre=100)
    centroids = kmeans(x, 32, seed=0, minibatch=minibatch)
    # every true centre has a centroid on it, and every centroid sits on a true centre
    dist = torch.cdist(truth, centroids)  # (C, K)
    assert dist.min(dim=1).values.max() < 0.1
    assert dist.min(dim=0).values.max() < 0.1


def test_minibatch_inertia_is_close_to_full_batch():
    x = torch.randn(8000, 32, generator=torch.Generator().manual_seed(1))
    full = _inertia(x, kmeans(x, 64, seed=0))
    mini = _inertia(x, kmeans(x, 64, seed=0, minibatch=1024))
    assert mini <= 1.1 * full


def test_large_codebook_with_minibatches_keeps_codes_alive_and_is_deterministic():
    x = torch.randn(12000, 64, generator=torch.Generator().manual_seed(2))
    a = kmeans(x, 1024, seed=3, minibatch=2048, iters=60)
    b = kmeans(x, 1024, seed=3, minibatch=2048, iters=60)
    assert torch.equal(a, b)
    used = len(torch.unique(nearest_code(x, a)))
    assert used >= 0.9 * 1024, f"only {used} of 1024 codes used: dead centroids were not re-seeded"


def test_nearest_code_is_the_brute_force_argmin_and_id_tracks_content():
    gen = torch.Generator().manual_seed(4)
    x, c = torch.randn(500, 8, generator=gen), torch.randn(40, 8, generator=gen)
    assert torch.equal(nearest_code(x, c), torch.cdist(x, c).argmin(dim=1))
    centroids = c.numpy()
    assert codebook_id(centroids) == codebook_id(centroids.copy())
    bumped = centroids.copy()
    bumped[0, 0] = np.nextafter(bumped[0, 0], np.float32(np.inf))
    assert codebook_id(bumped) != codebook_id(centroids)


def test_too_few_points_is_a_clear_error():
    with pytest.raises(ValueError, match="at least k=16"):
        kmeans(torch.randn(10, 4), 16)
