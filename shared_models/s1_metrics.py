"""S1 metric: top-k next-sample accuracy (torch).

Verma & Chafe (2021) judge next-sample models by top-5 accuracy: neighbouring
mu-law classes are near-identical sounds, so exact (top-1) hits undersell a
model that puts its mass in the right neighbourhood.
"""

from __future__ import annotations

import torch


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """Fraction of positions whose target class is among the k highest logits.

    logits (..., V) and targets (...) int64 with the same leading shape, e.g.
    (B, T, 256) and (B, T). Ties at the k-th logit are broken by ``torch.topk``.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}"
        )
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"k = {k} must be in [1, {logits.shape[-1]}]")
    top = logits.topk(k, dim=-1).indices  # (..., k)
    hits = (top == targets.unsqueeze(-1)).any(dim=-1)  # (...)
    return hits.float().mean().item()
