"""Vector quantization codebook (S2): k-means over front-end embeddings.

A code is the index of the nearest centroid in squared Euclidean distance.
The same distance + argmin runs inside the edge's ONNX graph
(:class:`EdgeEncoder`) and, for reference, in numpy (:func:`nearest_code_np`).
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import torch
import torch.nn as nn

log = logging.getLogger(__name__)


def codebook_id(centroids: np.ndarray) -> int:
    """Wire codebook id: the first 4 bytes (little-endian u32) of sha256 of the float32 centroids."""
    digest = hashlib.sha256(np.ascontiguousarray(centroids, dtype=np.float32).tobytes()).digest()
    return int.from_bytes(digest[:4], "little")


def nearest_code(embeddings: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(N, D), (K, D) -> (N,) int64 index of the nearest centroid."""
    # ||e - c||^2 = ||e||^2 - 2 e.c + ||c||^2; ||e||^2 is constant per row so it is dropped.
    scores = centroids.pow(2).sum(dim=-1) - 2.0 * embeddings @ centroids.T  # (N, K)
    return scores.argmin(dim=-1)


def kmeans(
    x: torch.Tensor,
    k: int,
    iters: int | None = None,
    seed: int = 0,
    batch: int = 65536,
    minibatch: int | None = None,
) -> torch.Tensor:
    """k-means with k-means++ initialisation and dead-centroid re-seeding.

    x: (N, D) float32 -> centroids (k, D). Deterministic for a given seed.
    Full-batch Lloyd's by default (``iters`` passes over all points, 25 unless
    given); with ``minibatch``, Sculley's mini-batch k-means (``iters`` steps of
    that many random points, 200 unless given), which keeps K in the thousands
    affordable on a CPU.
    """
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least k={k} points, got {n}")
    gen = torch.Generator().manual_seed(seed)
    centroids = _kmeans_plus_plus(x, k, gen)
    if minibatch:
        return _minibatch_kmeans(x, centroids, iters or 200, minibatch, gen)
    for it in range(iters or 25):
        assign = torch.cat([nearest_code(x[i : i + batch], centroids) for i in range(0, n, batch)])
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        alive = counts > 0
        centroids[alive] = sums[alive] / counts[alive, None]
        dead = (~alive).nonzero().flatten()
        if len(dead):  # re-seed empty clusters on random points
            centroids[dead] = x[torch.randint(n, (len(dead),), generator=gen)]
        log.debug("k-means iter %d: %d dead centroids re-seeded", it, len(dead))
    return centroids


def _kmeans_plus_plus(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding on a subsample of 20 k points, which keeps it O(sample * k)."""
    n = x.shape[0]
    sample = x[torch.randperm(n, generator=gen)[: min(n, 20 * k)]]
    centroids = torch.empty(k, x.shape[1], dtype=x.dtype)
    centroids[0] = sample[torch.randint(len(sample), (1,), generator=gen)][0]
    d2 = (sample - centroids[0]).pow(2).sum(-1)
    for i in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / len(d2))
        centroids[i] = sample[torch.multinomial(probs, 1, generator=gen)][0]
        d2 = torch.minimum(d2, (sample - centroids[i]).pow(2).sum(-1))
    return centroids


def _minibatch_kmeans(
    x: torch.Tensor, centroids: torch.Tensor, steps: int, size: int, gen: torch.Generator
) -> torch.Tensor:
    """Mini-batch k-means (Sculley 2010): each centroid moves to the running mean of the
    points assigned to it so far, so its step size shrinks as 1 / (points seen)."""
    n, k = x.shape[0], centroids.shape[0]
    seen = torch.zeros(k)
    idle = torch.zeros(k, dtype=torch.long)  # steps since a centroid last won a point
    for step in range(steps):
        xb = x[torch.randint(n, (min(size, n),), generator=gen)]  # (b, D)
        assign = nearest_code(xb, centroids)
        got = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, xb)
        seen += got
        hit = got > 0
        centroids[hit] += (sums[hit] - got[hit, None] * centroids[hit]) / seen[hit, None]
        idle = torch.where(hit, 0, idle + 1)
        dead = (idle >= 10).nonzero().flatten()  # re-seed centroids nothing has chosen for 10 steps
        if len(dead):
            centroids[dead] = xb[torch.randint(len(xb), (len(dead),), generator=gen)]
            seen[dead], idle[dead] = 0, 0
        log.debug("mini-batch k-means step %d: %d centroids re-seeded", step, len(dead))
    return centroids


class EdgeEncoder(nn.Module):
    """What the edge runs: front end + nearest-centroid lookup, exported as one ONNX graph."""

    def __init__(self, front_end: nn.Module, centroids: torch.Tensor):
        super().__init__()
        self.front_end = front_end
        self.register_buffer("centroids", centroids.clone())

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # patches: (N, P) -> embeddings (N, D), codes (N,) int64
        embeddings = self.front_end(patches)
        return embeddings, nearest_code(embeddings, self.centroids)
