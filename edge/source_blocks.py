"""What every edge audio source shares: its error, and the way to 16 kHz mono blocks.

A source reads ``(frames, channels)`` chunks at whatever rate it has;
:func:`to_blocks` averages the channels (:func:`edge.resample.to_mono`), converts
the rate with a windowed-sinc :class:`edge.resample.StreamResampler` and re-cuts
the result into blocks of exactly ``block_samples`` (the last may be shorter).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import numpy as np

from edge.resample import StreamResampler, to_mono
from shared_models.constants import SAMPLE_RATE_HZ


class SourceError(RuntimeError):
    """The audio source cannot be opened or read; the message names the file or device."""


def input_frames(block_samples: int, rate_hz: int) -> int:
    """Input frames at ``rate_hz`` that make about one output block (the read size)."""
    return max(1, math.ceil(block_samples * rate_hz / SAMPLE_RATE_HZ))


def to_blocks(
    chunks: Iterable[np.ndarray], rate_hz: int, block_samples: int
) -> Iterator[np.ndarray]:
    """Mix ``(frames, channels)`` chunks at ``rate_hz`` to mono, resample, re-cut into blocks."""
    resampler = StreamResampler(rate_hz, SAMPLE_RATE_HZ)
    buffer = np.zeros(0, dtype=np.float32)  # resampled audio not yet yielded, < one block
    for chunk in chunks:
        buffer = np.concatenate([buffer, resampler.process(to_mono(chunk))])
        while len(buffer) >= block_samples:
            yield buffer[:block_samples]
            buffer = buffer[block_samples:]
    buffer = np.concatenate([buffer, resampler.flush()])
    for start in range(0, len(buffer), block_samples):
        yield buffer[start : start + block_samples]
