"""Parameter counting, the yardstick S1 compares its models by (torch)."""

from __future__ import annotations

import torch.nn as nn


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters in ``model``; a shared (tied) tensor counts once.

    Works on models built on the ``meta`` device too, so sizes can be searched
    without allocating any weights.
    """
    return sum(p.numel() for p in model.parameters())
