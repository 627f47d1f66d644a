"""The learned-front-end filterbank analysis finds known frequencies and tells mel from linear."""

import numpy as np
import pytest

from training.filterbank import (
    DEFAULT_FFT_POINTS,
    dominant_frequencies_hz,
    filterbank_summary,
    hz_to_mel,
    linear_reference_hz,
    mel_reference_hz,
    patch_weights,
)

RATE_HZ = 16_000
TAPS = 400  # a 25 ms patch at 16 kHz
BIN_HZ = RATE_HZ / DEFAULT_FFT_POINTS


def _sinusoid_bank(freqs_hz, seed=0) -> np.ndarray:
    """(H, 401) fake fc1 weights: windowed sinusoids with random phase, plus a level column."""
    rng = np.random.default_rng(seed)
    t_s = np.arange(TAPS) / RATE_HZ
    rows = [
        np.hanning(TAPS) * np.sin(2 * np.pi * f * t_s + rng.uniform(0, 2 * np.pi)) + 0.05
        for f in freqs_hz
    ]
    level = rng.standard_normal((len(freqs_hz), 1))  # must be ignored
    return np.hstack([np.array(rows), level])


def test_sinusoid_rows_give_their_frequency_within_one_fft_bin():
    freqs_hz = np.array([250.0, 440.0, 1000.0, 1777.0, 3000.0, 5500.0, 7000.0])
    found_hz = dominant_frequencies_hz(patch_weights(_sinusoid_bank(freqs_hz)), RATE_HZ)
    assert found_hz.shape == freqs_hz.shape
    np.testing.assert_allclose(found_hz, freqs_hz, atol=BIN_HZ)


def test_a_constant_offset_is_not_reported_as_a_low_frequency():
    weights = np.full((1, TAPS), 3.0) + 0.1 * np.sin(2 * np.pi * 2000.0 * np.arange(TAPS) / RATE_HZ)
    assert abs(dominant_frequencies_hz(weights, RATE_HZ)[0] - 2000.0) <= BIN_HZ


def test_patch_weights_rejects_a_matrix_without_the_level_column():
    with pytest.raises(ValueError, match="401"):
        patch_weights(np.zeros((8, TAPS)))


def test_mel_reference_is_monotonic_from_zero_to_nyquist_and_denser_at_low_frequencies():
    n = 64
    mel_hz = mel_reference_hz(n, RATE_HZ)
    linear_hz = linear_reference_hz(n, RATE_HZ)
    for ref in (mel_hz, linear_hz):
        assert len(ref) == n and ref[0] == 0.0 and ref[-1] == RATE_HZ / 2
        assert np.all(np.diff(ref) > 0)
    # denser at low frequencies: more of the mel points lie below 1 kHz, and its steps grow
    assert np.sum(mel_hz < 1000) > np.sum(linear_hz < 1000)
    assert np.all(mel_hz[1:-1] < linear_hz[1:-1])
    assert np.all(np.diff(mel_hz, 2) > 0)
    # and the points really are evenly spaced in mel
    np.testing.assert_allclose(np.diff(hz_to_mel(mel_hz)), np.diff(hz_to_mel(mel_hz))[0], rtol=1e-9)


def test_summary_names_the_reference_a_bank_was_built_on():
    rng = np.random.default_rng(1)
    n = 128
    jitter_hz = rng.normal(0, 15, n)
    mel_bank = np.clip(mel_reference_hz(n, RATE_HZ) + jitter_hz, 0, RATE_HZ / 2)
    linear_bank = np.clip(linear_reference_hz(n, RATE_HZ) + jitter_hz, 0, RATE_HZ / 2)
    mel_summary = filterbank_summary(rng.permutation(mel_bank), RATE_HZ)
    linear_summary = filterbank_summary(rng.permutation(linear_bank), RATE_HZ)
    assert mel_summary["closer_reference"] == "mel"
    assert linear_summary["closer_reference"] == "linear"
    assert mel_summary["fraction_below_1khz"] > linear_summary["fraction_below_1khz"]
    assert mel_summary["neurons"] == n and 0 < mel_summary["median_hz"] < RATE_HZ / 2
    assert mel_summary["rms_mel_distance_to_mel"] < mel_summary["rms_mel_distance_to_linear"]
