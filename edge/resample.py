"""Streaming sample-rate conversion to 16 kHz in numpy: a rational polyphase low-pass.

Microphones, files and pipes arrive at 8, 44.1 or 48 kHz; the edge model wants
16 kHz. Linear interpolation (``wavio.resample_linear``) folds everything above
8 kHz back into the band the model listens to, so the edge uses a windowed-sinc
filter instead, with no scipy: the ratio is reduced to L/M (upsample by L,
low-pass, keep every M-th sample) and only the output samples are computed, each
as a dot product of ``taps_per_phase`` input samples with one of L sub-filters
(the polyphase components).

Design (``rate_in_hz`` -> ``rate_out_hz``, ``nyquist_hz = min(rate_in_hz, rate_out_hz) / 2``):

- cut-off (-6 dB) at ``CUTOFF_FRACTION * nyquist_hz`` and a transition band
  that ends exactly at ``nyquist_hz``, so everything the output cannot
  represent is in the stopband (48 kHz -> 16 kHz: pass to 6.4 kHz, stop from 8 kHz);
- Kaiser window for ``STOPBAND_DB`` of attenuation; its length follows from the
  transition width (Kaiser's formula), 153 taps at 48 kHz, 141 at 44.1 kHz;
- every sub-filter is normalised to a DC gain of exactly 1, so a constant stays
  constant whatever the ratio.

The filter is centred: output sample k is the band-limited input at time
``k / rate_out_hz``, with no delay to compensate. ``process`` keeps the input
history the next outputs need, so any split of a stream into blocks gives the
same samples as one call; ``flush`` pads the end with zeros and returns the tail.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from shared_models.constants import SAMPLE_RATE_HZ

log = logging.getLogger(__name__)

STOPBAND_DB = 80.0
"""Kaiser design target; measured: at least 81 dB from the lower Nyquist frequency up."""

CUTOFF_FRACTION = 0.9
"""Cut-off (-6 dB) as a fraction of the lower Nyquist frequency; the stopband starts at 1.0."""

MAX_PHASES = 4096
"""Largest upsampling factor L accepted: the filter bank holds L * taps_per_phase floats."""

_MAX_WORK_ELEMENTS = 1 << 18
"""Outputs are computed in chunks whose gathered input windows hold at most this many floats."""


def to_mono(block: np.ndarray) -> np.ndarray:
    """Average the channels of a ``(frames, channels)`` block; 1-D input is already mono.

    Returns float32. A mean, not a sum, so a full-scale stereo signal stays in [-1, 1].
    """
    block = np.asarray(block)
    if block.ndim == 1:
        return block.astype(np.float32, copy=False)
    if block.ndim != 2:
        raise ValueError(
            f"to_mono expects (frames,) or (frames, channels), got shape {block.shape}"
        )
    if block.shape[1] == 1:
        return block[:, 0].astype(np.float32, copy=False)
    return block.mean(axis=1, dtype=np.float32)  # (frames,)


class StreamResampler:
    """Resample a mono float32 stream from ``rate_in_hz`` to ``rate_out_hz`` block by block.

    ``process(block)`` returns the output samples that ``block`` completes;
    ``flush()`` ends the stream and returns the rest, so that a stream of
    ``n_in`` samples gives ``round(n_in * rate_out_hz / rate_in_hz)`` samples.
    After ``flush`` the resampler is ready for a new stream.
    """

    def __init__(self, rate_in_hz: int, rate_out_hz: int = SAMPLE_RATE_HZ):
        if int(rate_in_hz) != rate_in_hz or int(rate_out_hz) != rate_out_hz:
            raise ValueError(f"sample rates must be whole Hz, got {rate_in_hz} -> {rate_out_hz}")
        if rate_in_hz <= 0 or rate_out_hz <= 0:
            raise ValueError(f"sample rates must be positive, got {rate_in_hz} -> {rate_out_hz}")
        self.rate_in_hz = int(rate_in_hz)
        self.rate_out_hz = int(rate_out_hz)
        common = math.gcd(self.rate_in_hz, self.rate_out_hz)
        self.up = self.rate_out_hz // common  # L
        self.down = self.rate_in_hz // common  # M
        self.is_identity = self.up == self.down
        if self.up > MAX_PHASES:
            raise ValueError(
                f"cannot resample {rate_in_hz} Hz -> {rate_out_hz} Hz: "
                f"the ratio {self.up}/{self.down} "
                f"needs more than {MAX_PHASES} filter phases"
            )
        self._taps, self.delay_up = _design_polyphase(self.rate_in_hz, self.rate_out_hz, self.up)
        self.taps_per_phase = self._taps.shape[1]
        log.debug(
            "resampler %d -> %d Hz: L/M = %d/%d, %d taps per phase",
            *(self.rate_in_hz, self.rate_out_hz, self.up, self.down, self.taps_per_phase),
        )
        self._reset()

    def _reset(self) -> None:
        # The buffer starts with taps_per_phase - 1 zeros before sample 0: the filter's left half.
        self._buffer = np.zeros(self.taps_per_phase - 1, dtype=np.float32)
        self._buffer_start = -(self.taps_per_phase - 1)  # stream index of _buffer[0]
        self._next_out = 0  # stream index of the next output sample
        self._n_in = 0

    def process(self, block: np.ndarray) -> np.ndarray:
        """The new output samples (float32) that the input so far determines."""
        block = np.asarray(block, dtype=np.float32)
        if block.ndim != 1:
            raise ValueError(f"StreamResampler takes mono 1-D blocks, got shape {block.shape}")
        self._n_in += len(block)
        if self.is_identity:
            return block
        buffer = np.concatenate([self._buffer, block])
        n_avail = self._buffer_start + len(buffer)  # one past the last stream index we hold
        # Output k needs input up to (k*M + delay) // L: the last k with that index < n_avail.
        end = (n_avail * self.up - 1 - self.delay_up) // self.down + 1
        out = self._compute(buffer, self._next_out, max(end, self._next_out))
        self._next_out = max(end, self._next_out)
        keep_from = min(self._newest_needed(self._next_out) - self.taps_per_phase + 1, n_avail)
        # A copy: keeping a view would pin the whole concatenated block in memory.
        self._buffer = buffer[keep_from - self._buffer_start :].copy()
        self._buffer_start = keep_from
        return out

    def flush(self) -> np.ndarray:
        """The last output samples (the input padded with zeros); resets for a new stream."""
        if self.is_identity:
            self._reset()
            return np.zeros(0, dtype=np.float32)
        n_total = max((2 * self._n_in * self.up + self.down) // (2 * self.down), self._next_out)
        if n_total == self._next_out:
            self._reset()
            return np.zeros(0, dtype=np.float32)
        n_avail = self._buffer_start + len(self._buffer)
        pad = max(0, self._newest_needed(n_total - 1) + 1 - n_avail)
        buffer = np.concatenate([self._buffer, np.zeros(pad, dtype=np.float32)])
        out = self._compute(buffer, self._next_out, n_total)
        self._reset()
        return out

    def _newest_needed(self, k: int) -> int:
        """Stream index of the newest input sample that output ``k`` depends on."""
        return (k * self.down + self.delay_up) // self.up

    def _compute(self, buffer: np.ndarray, k_start: int, k_end: int) -> np.ndarray:
        """Outputs ``k_start .. k_end - 1`` from ``buffer`` (which starts at ``_buffer_start``)."""
        out = np.empty(k_end - k_start, dtype=np.float32)
        if k_end <= k_start:
            return out
        n_taps = self.taps_per_phase
        windows = sliding_window_view(buffer, n_taps)  # (len - n_taps + 1, n_taps), a view
        step = max(1, _MAX_WORK_ELEMENTS // n_taps)
        for chunk_start in range(k_start, k_end, step):  # a loop over chunks, not samples
            k = np.arange(chunk_start, min(chunk_start + step, k_end), dtype=np.int64)  # (K,)
            newest, phase = np.divmod(k * self.down + self.delay_up, self.up)  # (K,), (K,)
            rows = windows[newest - self._buffer_start - n_taps + 1]  # (K, n_taps), oldest first
            if self.up == 1:  # one phase: a matrix-vector product
                values = rows @ self._taps[0]
            else:
                values = np.einsum("kt,kt->k", rows, self._taps[phase])
            out[chunk_start - k_start : chunk_start - k_start + len(k)] = values
        return out


def resample(audio: np.ndarray, rate_in_hz: int, rate_out_hz: int = SAMPLE_RATE_HZ) -> np.ndarray:
    """One-shot resampling of a whole mono signal (the stream of one block)."""
    resampler = StreamResampler(rate_in_hz, rate_out_hz)
    head = resampler.process(audio)
    return np.concatenate([head, resampler.flush()])


def _design_polyphase(rate_in_hz: int, rate_out_hz: int, up: int) -> tuple[np.ndarray, int]:
    """The Kaiser-windowed sinc split into ``up`` sub-filters: (taps, delay in upsampled samples).

    ``taps[p]`` holds sub-filter ``p`` oldest-input-first, so an output is
    ``window_of_inputs @ taps[p]``.
    """
    rate_up_hz = up * rate_in_hz  # the filter runs (conceptually) at the upsampled rate
    nyquist_hz = min(rate_in_hz, rate_out_hz) / 2
    cutoff_hz = CUTOFF_FRACTION * nyquist_hz
    transition_hz = 2 * (nyquist_hz - cutoff_hz)  # centred on the cut-off, ends at Nyquist
    # Kaiser: length = (A - 7.95) / (2.285 * 2 pi * transition / rate); made odd and centred.
    length_up = (STOPBAND_DB - 7.95) * rate_up_hz / (14.36 * transition_hz)
    half_in = math.ceil(length_up / (2 * up))  # half-length in input samples
    n = 2 * half_in * up + 1
    delay_up = half_in * up  # the centre tap
    beta = 0.1102 * (STOPBAND_DB - 8.7)
    t = np.arange(n) - delay_up  # (n,) upsampled samples from the centre
    h = np.sinc(2 * cutoff_hz / rate_up_hz * t) * np.kaiser(n, beta)  # (n,) float64
    taps_per_phase = math.ceil(n / up)
    h = np.concatenate([h, np.zeros(taps_per_phase * up - n)])  # (taps_per_phase * up,)
    # Sub-filter p, newest input first, is h[p], h[p + up], ...: row p of the (taps, up) reshape.
    phases = h.reshape(taps_per_phase, up).T  # (up, taps_per_phase), newest first
    phases = phases / phases.sum(axis=1, keepdims=True)  # each sub-filter passes DC with gain 1
    return np.ascontiguousarray(phases[:, ::-1], dtype=np.float32), delay_up  # oldest first
