"""Small numpy DSP helpers for the sound synthesiser (no scipy).

Filters are applied in the frequency domain: a static filter multiplies one
FFT of the whole (zero-padded) signal by a gain curve; a time-varying filter
(moving formants) does the same per 32 ms frame and overlap-adds the frames.
Gains are real (zero-phase), which is all a synthesiser needs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from shared_models.constants import SAMPLE_RATE_HZ

NYQUIST_HZ = SAMPLE_RATE_HZ / 2

_FRAME = 512  # 32 ms analysis frames ...
_HOP = _FRAME // 2  # ... at 50 % overlap: a periodic Hann window then sums to exactly 1
_NFFT = 2 * _FRAME  # room for the filter's ringing on both sides of each frame
_WINDOW = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(_FRAME) / _FRAME)


def n_samples(duration_s: float) -> int:
    """Number of samples in ``duration_s`` seconds (at least one)."""
    return max(1, round(duration_s * SAMPLE_RATE_HZ))


def fft_len(n: int) -> int:
    """The smallest 2**a * 3**b * 5**c >= n: a length numpy's FFT handles fast."""
    best = 1 << max(0, int(n - 1).bit_length())  # the next power of two always qualifies
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            p2 = 1 << max(0, (-(-n // p35) - 1).bit_length())  # smallest 2**a with p35 * 2**a >= n
            best = min(best, p35 * p2)
            p35 *= 3
        p5 *= 5
    return best


def phase_of(freq_hz: np.ndarray) -> np.ndarray:
    """Running phase in radians of an oscillator with instantaneous frequency ``freq_hz``."""
    return 2 * np.pi * np.cumsum(freq_hz) / SAMPLE_RATE_HZ


def harmonic_tone(phase: np.ndarray, freq_hz: np.ndarray, amps) -> np.ndarray:
    """Sum of harmonics ``amps[k-1] * sin(k * phase)``, faded out before they alias."""
    out = np.zeros(len(phase))
    for k, amp in enumerate(amps, start=1):
        # fade a harmonic over the top 10 % below Nyquist instead of cutting it (no clicks)
        audible = np.clip((0.95 * NYQUIST_HZ - k * freq_hz) / (0.1 * NYQUIST_HZ), 0.0, 1.0)
        if np.any(audible):
            out += amp * audible * np.sin(k * phase)
    return out


def ar_envelope(n: int, attack_s: float, release_s: float) -> np.ndarray:
    """Linear attack and release ramps around a flat top, ``n`` samples long."""
    env = np.ones(n)
    attack = min(n, int(attack_s * SAMPLE_RATE_HZ))
    release = min(n - attack, int(release_s * SAMPLE_RATE_HZ))
    if attack:
        env[:attack] = np.arange(attack) / attack
    if release:
        env[n - release :] *= np.arange(release, 0, -1) / release
    return env


def smooth(x: np.ndarray, n_taps: int) -> np.ndarray:
    """Centred moving average over ``n_taps`` samples (same length as ``x``)."""
    if n_taps <= 1:
        return x.astype(np.float64)
    padded = np.pad(x.astype(np.float64), (n_taps // 2, n_taps - 1 - n_taps // 2), mode="edge")
    c = np.concatenate([[0.0], np.cumsum(padded)])
    return (c[n_taps:] - c[:-n_taps]) / n_taps


def resonance_gain(freqs_hz: np.ndarray, centre_hz, bandwidth_hz: float) -> np.ndarray:
    """Magnitude response of a resonance (a formant, a body mode) at ``centre_hz``."""
    half_bandwidth_hz = float(bandwidth_hz) / 2  # a Python float keeps float32 input float32
    return 1.0 / np.sqrt(1.0 + np.square((freqs_hz - centre_hz) / half_bandwidth_hz))


def filter_static(x: np.ndarray, gain: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Filter ``x`` by the gain curve ``gain(freqs_hz)``, one FFT over the whole signal."""
    n = len(x)
    nfft = fft_len(n + _NFFT)  # zero padding keeps the ringing from wrapping around
    freqs_hz = np.fft.rfftfreq(nfft, 1 / SAMPLE_RATE_HZ)
    return np.fft.irfft(np.fft.rfft(x, nfft) * gain(freqs_hz), nfft)[:n]


def filter_framewise(
    x: np.ndarray, gains: Callable[[np.ndarray, np.ndarray], np.ndarray]
) -> np.ndarray:
    """Time-varying filter: ``gains(frame_times_s (F,), freqs_hz (B,)) -> (F, B)``.

    Hann-windowed frames (50 % overlap) are filtered in the frequency domain
    and overlap-added; each frame sits in the middle of a buffer twice its
    length so the ringing of a resonance has room on both sides.
    """
    n = len(x)
    n_frames = n // _HOP + 2
    padded = np.zeros((n_frames + 1) * _HOP)
    padded[_HOP : _HOP + n] = x  # every sample of x is covered by exactly two frames
    frames = np.lib.stride_tricks.sliding_window_view(padded, _FRAME)[::_HOP]  # (F, FRAME)
    buf = np.zeros((n_frames, _NFFT))
    buf[:, _HOP : _HOP + _FRAME] = frames * _WINDOW
    frame_times_s = (np.arange(n_frames) * _HOP) / SAMPLE_RATE_HZ  # frame centre, in x's time
    freqs_hz = np.fft.rfftfreq(_NFFT, 1 / SAMPLE_RATE_HZ).astype(np.float32)  # gains in float32
    out_frames = np.fft.irfft(np.fft.rfft(buf, axis=1) * gains(frame_times_s, freqs_hz), axis=1)
    # frame j's buffer starts at padded index (j - 1) * HOP, i.e. at out index j * HOP
    blocks = out_frames.reshape(n_frames, _NFFT // _HOP, _HOP)  # (F, 4, HOP)
    out = np.zeros((n_frames + _NFFT // _HOP) * _HOP)
    for j in range(_NFFT // _HOP):
        out[j * _HOP : (j + n_frames) * _HOP] += blocks[:, j, :].reshape(-1)
    return out[2 * _HOP : 2 * _HOP + n]  # padded index HOP (x[0]) is out index 2 * HOP


def fft_convolve(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Linear convolution of ``x`` and ``kernel``, truncated to ``len(x)``."""
    nfft = fft_len(len(x) + len(kernel))
    return np.fft.irfft(np.fft.rfft(x, nfft) * np.fft.rfft(kernel, nfft), nfft)[: len(x)]


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0


def peak_normalise(x: np.ndarray, peak: float) -> np.ndarray:
    """``x`` scaled so its largest magnitude is ``peak``, as float32 (silence stays silent)."""
    top = float(np.max(np.abs(x), initial=0.0))
    return (x * (peak / top) if top > 0 else x).astype(np.float32)


def rms_normalise(x: np.ndarray) -> np.ndarray:
    """``x`` scaled to unit RMS, as float32 (silence stays silent)."""
    level = rms(x)
    return (x / level if level > 0 else x).astype(np.float32)
