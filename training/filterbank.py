"""What frequencies did the S3 learned front end learn to listen to?

Verma & Berger (2021) report that the first dense layer over raw 25 ms patches
learns a bank of band-pass filters whose centre frequencies are packed more
densely at low frequencies, like a mel filterbank. This module measures that
on a trained ``LearnedFrontEnd``: each neuron of ``fc1`` is treated as an FIR
filter over the patch, its dominant frequency is the peak of its magnitude
spectrum, and the sorted curve of those peaks is compared with a linearly
spaced and a mel-spaced bank of the same size.

numpy only, so the report scripts can run it on weights pulled out of a
checkpoint without building the model.
"""

from __future__ import annotations

import logging

import numpy as np

from shared_models.constants import PATCH_SAMPLES, SAMPLE_RATE_HZ

log = logging.getLogger(__name__)

# Zero-padding the 400-tap weight vector to 2048 points interpolates the
# spectrum to 16000 / 2048 = 7.8 Hz steps, so peaks are located well inside
# the 40 Hz resolution that a 25 ms patch really has.
DEFAULT_FFT_POINTS = 2048


def hz_to_mel(freq_hz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale: 2595 * log10(1 + f / 700)."""
    return 2595.0 * np.log10(1.0 + np.asarray(freq_hz, dtype=np.float64) / 700.0)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    """Inverse of :func:`hz_to_mel`."""
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


def patch_weights(fc1_weight: np.ndarray, patch_samples: int = PATCH_SAMPLES) -> np.ndarray:
    """The waveform part of ``LearnedFrontEnd.fc1.weight``: (H, patch_samples + 1) -> (H, patch_samples).

    The last input of fc1 is the patch's log10 RMS level, not a waveform
    sample, so it has no place in a spectrum.
    """
    fc1_weight = np.asarray(fc1_weight, dtype=np.float64)
    if fc1_weight.ndim != 2 or fc1_weight.shape[1] != patch_samples + 1:
        raise ValueError(
            f"expected fc1 weights of shape (H, {patch_samples + 1}) "
            f"({patch_samples} waveform samples + 1 level input), got {fc1_weight.shape}"
        )
    return fc1_weight[:, :patch_samples]


def dominant_frequencies_hz(
    weights: np.ndarray,
    sample_rate_hz: int,
    fft_points: int = DEFAULT_FFT_POINTS,
) -> np.ndarray:
    """Each neuron's dominant frequency in Hz: weights (H, taps) -> (H,).

    The weight vector is Hann-windowed (so the patch edges do not smear every
    peak) and zero-padded to ``fft_points``; the dominant frequency is the
    argmax of the magnitude spectrum, DC excluded. "DC" here is everything
    below one cycle per patch (sample_rate_hz / taps, 40 Hz for 400 taps at
    16 kHz): below that a 25 ms filter cannot tell a frequency from an
    offset, and a weight vector with a non-zero mean would otherwise report a
    spurious peak in the Hann main lobe around 0 Hz.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 2:
        raise ValueError(f"expected weights of shape (H, taps), got {weights.shape}")
    taps = weights.shape[1]
    if fft_points < taps:
        raise ValueError(f"fft_points ({fft_points}) must be at least the number of taps ({taps})")
    window = np.hanning(taps)  # (taps,)
    # Remove each row's window-weighted mean so the windowed vector sums to 0:
    # an offset then contributes nothing at DC instead of leaking into low bins.
    offset = (weights @ window) / window.sum()  # (H,)
    windowed = (weights - offset[:, None]) * window  # (H, taps)
    magnitude = np.abs(np.fft.rfft(windowed, n=fft_points, axis=1))  # (H, fft_points // 2 + 1)
    bin_freqs_hz = np.fft.rfftfreq(fft_points, d=1.0 / sample_rate_hz)  # (fft_points // 2 + 1,)
    lowest_hz = sample_rate_hz / taps
    magnitude[:, bin_freqs_hz < lowest_hz] = 0.0
    return bin_freqs_hz[np.argmax(magnitude, axis=1)]


def linear_reference_hz(n: int, sample_rate_hz: int) -> np.ndarray:
    """n frequencies evenly spaced in Hz, both endpoints included: 0 Hz first, Nyquist last.

    Endpoints convention (shared with :func:`mel_reference_hz`): the points are
    ``np.linspace(0, nyquist, n)``, so they line up with the sorted curve of n
    neurons plotted against rank 0 .. n-1.
    """
    return np.linspace(0.0, sample_rate_hz / 2.0, n)


def mel_reference_hz(n: int, sample_rate_hz: int) -> np.ndarray:
    """n frequencies evenly spaced on the HTK mel scale, from 0 Hz to Nyquist inclusive.

    Same endpoints as :func:`linear_reference_hz`; in between the points are
    denser at low frequencies.
    """
    mels = np.linspace(0.0, float(hz_to_mel(sample_rate_hz / 2.0)), n)
    freqs_hz = mel_to_hz(mels)
    freqs_hz[-1] = sample_rate_hz / 2.0  # exact Nyquist, not Nyquist +- rounding
    return freqs_hz


def _rms_mel_distance(freqs_hz: np.ndarray, reference_hz: np.ndarray) -> float:
    return float(np.sqrt(np.mean((hz_to_mel(freqs_hz) - hz_to_mel(reference_hz)) ** 2)))


def filterbank_summary(freqs_hz: np.ndarray, sample_rate_hz: int = SAMPLE_RATE_HZ) -> dict:
    """Numbers for the report about a bank of dominant frequencies (one per neuron).

    The RMS distances compare the sorted frequencies with a linear and a mel
    reference bank of the same size, measured in mel so that an error of
    100 Hz counts more at 200 Hz than at 7 kHz (as it does to the ear and to
    the mel hypothesis being tested). ``closer_reference`` is "mel" or
    "linear", whichever distance is smaller.
    """
    freqs_hz = np.sort(np.asarray(freqs_hz, dtype=np.float64))
    n = len(freqs_hz)
    if n == 0:
        raise ValueError("filterbank_summary needs at least one frequency")
    nyquist_hz = sample_rate_hz / 2.0
    to_linear_mel = _rms_mel_distance(freqs_hz, linear_reference_hz(n, sample_rate_hz))
    to_mel_mel = _rms_mel_distance(freqs_hz, mel_reference_hz(n, sample_rate_hz))
    return {
        "neurons": n,
        "sample_rate_hz": int(sample_rate_hz),
        "median_hz": round(float(np.median(freqs_hz)), 1),
        "fraction_below_1khz": round(float(np.mean(freqs_hz < 1000.0)), 4),
        "fraction_below_4khz": round(float(np.mean(freqs_hz < 4000.0)), 4),
        # what each reference bank would give, for scale
        "reference_fraction_below_1khz": {
            "linear": round(1000.0 / nyquist_hz, 4),
            "mel": round(float(hz_to_mel(1000.0) / hz_to_mel(nyquist_hz)), 4),
        },
        "rms_mel_distance_to_linear": round(to_linear_mel, 1),
        "rms_mel_distance_to_mel": round(to_mel_mel, 1),
        "closer_reference": "mel" if to_mel_mel < to_linear_mel else "linear",
    }
