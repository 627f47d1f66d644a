"""S1 model sizes matched by parameter count.

Verma & Chafe (2021) compare the sample Transformer with WaveNet at equal
parameter counts, so a gain cannot come from sheer size. ``matched_configs``
keeps each family's shape fixed and searches its width (and, for the
Transformers, a depth near 4 layers) for the count closest to the target.
Models are built on the ``meta`` device while searching: no weights are
allocated, only shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from shared_models.param_count import count_parameters
from shared_models.sample_transformer import SampleTransformer, SampleTransformerConfig
from shared_models.wavenet import WaveNet, WaveNetConfig

MATCH_TOLERANCE = 0.10
"""Largest relative spread of the three parameter counts (relative to the smallest)."""

TRANSFORMER_DEPTHS = (3, 4, 5)
"""Depths tried for the Transformers: width alone moves the count in steps too coarse to match."""

WAVENET_SHAPE = WaveNetConfig(n_layers=10, n_stacks=2)
"""Receptive field 2047 samples (128 ms at 16 kHz); widths are scaled by the search."""


def _size(build: Callable[[], torch.nn.Module]) -> int:
    with torch.device("meta"):
        return count_parameters(build())


def _closest_width(count: Callable[[int], int], target: int) -> int:
    """Width w >= 1 whose (increasing) count(w) is closest to target, by bisection."""
    lo, hi = 1, 2
    while count(hi) < target:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # invariant: count(lo) < target <= count(hi), or lo == 1
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) < target else (lo, mid)
    return min((lo, hi), key=lambda w: abs(count(w) - target))


def _wavenet_config(target: int) -> WaveNetConfig:
    def config(w: int) -> WaveNetConfig:
        # Classic WaveNet proportions: skip and output layers twice the residual width.
        return replace(
            WAVENET_SHAPE,
            residual_channels=w,
            dilation_channels=w,
            skip_channels=2 * w,
            end_channels=2 * w,
        )

    w = _closest_width(lambda w: parameter_count(config(w)), target)
    return config(w)


def _transformer_config(base: SampleTransformerConfig, target: int) -> SampleTransformerConfig:
    candidates = []
    for depth in TRANSFORMER_DEPTHS:
        w = _closest_width(
            lambda w, depth=depth: parameter_count(_resized(base, w, depth)), target
        )
        candidates.append(_resized(base, w, depth))
    return min(candidates, key=lambda c: abs(parameter_count(c) - target))


def _resized(base: SampleTransformerConfig, width: int, depth: int) -> SampleTransformerConfig:
    """``base`` with ``width`` channels per head and ``depth`` blocks."""
    return replace(base, d_model=width * base.n_heads, n_layers=depth)


def matched_configs(
    target_params: int,
    context_samples: int = 512,
    cond_context: int = 4096,
) -> dict[str, WaveNetConfig | SampleTransformerConfig]:
    """Configs for "wavenet", "transformer" and "conditioned_transformer" near target_params.

    The Transformers attend over ``context_samples``; the conditioned one also
    summarises ``cond_context`` older samples with its CNN. Raises ValueError
    when the three counts cannot be brought within ``MATCH_TOLERANCE`` of each
    other (a target too small for these shapes).
    """
    plain = SampleTransformerConfig(context_samples=context_samples)
    configs: dict[str, WaveNetConfig | SampleTransformerConfig] = {
        "wavenet": _wavenet_config(target_params),
        "transformer": _transformer_config(plain, target_params),
        "conditioned_transformer": _transformer_config(
            replace(plain, cond_context=cond_context), target_params
        ),
    }
    counts = {name: parameter_count(c) for name, c in configs.items()}
    if max(counts.values()) > (1 + MATCH_TOLERANCE) * min(counts.values()):
        raise ValueError(f"cannot match parameter counts near {target_params}: {counts}")
    return configs


def parameter_count(config: WaveNetConfig | SampleTransformerConfig) -> int:
    """Parameter count of the model a config describes, without allocating it."""
    if isinstance(config, WaveNetConfig):
        return _size(lambda: WaveNet(config))
    return _size(lambda: SampleTransformer(config))
