"""The edge's streaming resampler (edge/resample.py) on real tones and noise."""

from __future__ import annotations

import numpy as np
import pytest

from edge.resample import StreamResampler, resample, to_mono
from shared_models.constants import SAMPLE_RATE_HZ
from shared_models.wavio import resample_linear

EDGE_S = 0.05
"""Seconds trimmed from each end before measuring: the filter's start-up and zero-padded tail."""


def tone(freq_hz: float, rate_hz: int, seconds: float = 2.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * rate_hz)) / rate_hz
    return (amplitude * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


def middle(audio: np.ndarray, rate_hz: int = SAMPLE_RATE_HZ) -> np.ndarray:
    edge = round(EDGE_S * rate_hz)
    return audio[edge:-edge]


def peak_hz(audio: np.ndarray, rate_hz: int = SAMPLE_RATE_HZ) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.fft.rfftfreq(len(audio), 1 / rate_hz)[spectrum.argmax()])


def rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))


@pytest.mark.parametrize(
    "rate_in_hz, up, down", [(48_000, 1, 3), (44_100, 160, 441), (8_000, 2, 1), (16_000, 1, 1)]
)
def test_ratio_is_reduced_by_the_gcd(rate_in_hz, up, down):
    resampler = StreamResampler(rate_in_hz)
    assert (resampler.up, resampler.down) == (up, down)


@pytest.mark.parametrize("rate_in_hz", [48_000, 44_100, 8_000])
def test_1khz_tone_keeps_its_frequency_amplitude_and_timing(rate_in_hz):
    out = resample(tone(1000, rate_in_hz), rate_in_hz)
    assert out.dtype == np.float32
    steady = middle(out)
    assert peak_hz(steady) == pytest.approx(1000, abs=SAMPLE_RATE_HZ / len(steady))
    assert np.sqrt(2) * rms(steady) == pytest.approx(0.5, rel=0.02)
    # Centred filter: sample k is the tone at k / 16 kHz, with no delay (measured ~1.4e-5).
    ideal = tone(1000, SAMPLE_RATE_HZ)
    assert np.abs(steady - middle(ideal)).max() < 1e-3


@pytest.mark.parametrize("rate_in_hz", [48_000, 44_100])
def test_passband_is_flat_to_6khz(rate_in_hz):
    out = middle(resample(tone(6000, rate_in_hz), rate_in_hz))
    assert np.sqrt(2) * rms(out) == pytest.approx(0.5, rel=0.01)  # measured: -0.0 dB


@pytest.mark.parametrize(
    "rate_in_hz, tone_hz",
    [(48_000, 8_500), (48_000, 9_500), (48_000, 15_000), (48_000, 23_000), (44_100, 9_000),
     (44_100, 20_000)],
)  # fmt: skip
def test_tones_above_8khz_are_removed_not_aliased(rate_in_hz, tone_hz):
    audio = tone(tone_hz, rate_in_hz, seconds=1.0)
    out = middle(resample(audio, rate_in_hz))
    attenuation_db = 20 * np.log10(rms(audio) / rms(out))
    assert attenuation_db >= 60  # measured: 85-139 dB here; >= 82 dB over 8-24 kHz
    # Linear interpolation folds the same tone into the band the model hears.
    folded = middle(resample_linear(audio, rate_in_hz))
    assert 20 * np.log10(rms(audio) / rms(folded)) < 20


def test_upsampling_8khz_leaves_no_image_above_4khz():
    out = middle(resample(tone(3000, 8_000, seconds=4.0), 8_000))
    spectrum = np.abs(np.fft.rfft(out * np.kaiser(len(out), 14)))
    freqs_hz = np.fft.rfftfreq(len(out), 1 / SAMPLE_RATE_HZ)
    image_db = 20 * np.log10(spectrum[freqs_hz > 4000].max() / spectrum.max())
    assert image_db < -60  # measured: about -100 dB; the 5 kHz image of a 3 kHz tone


def test_a_constant_stays_constant_through_every_phase():
    out = middle(resample(np.full(44_100, 0.25, dtype=np.float32), 44_100))
    assert np.abs(out - 0.25).max() < 1e-5


@pytest.mark.parametrize("rate_in_hz", [48_000, 44_100, 22_050, 8_000, 16_000])
def test_block_by_block_equals_one_shot(rate_in_hz):
    rng = np.random.default_rng(rate_in_hz)
    audio = (0.3 * rng.standard_normal(3 * rate_in_hz)).astype(np.float32)
    one_shot = resample(audio, rate_in_hz)
    resampler = StreamResampler(rate_in_hz)
    pieces, start = [], 0
    for size in [0, 1, 2, 3, 441, 1000, 4096, 0, 7, *rng.integers(0, 6000, 100)]:
        pieces.append(resampler.process(audio[start : start + size]))
        start += size
        if start >= len(audio):
            break
    pieces.append(resampler.process(audio[start:]))
    pieces.append(resampler.flush())
    streamed = np.concatenate(pieces)
    assert len(streamed) == len(one_shot)
    assert np.abs(streamed - one_shot).max() <= 1e-5


@pytest.mark.parametrize("rate_in_hz", [48_000, 44_100, 22_050, 8_000, 11_025, 96_000])
@pytest.mark.parametrize("n_in", [0, 1, 2, 3, 5, 441, 1_001, 44_100, 123_457])
def test_output_length_is_the_rounded_ratio(rate_in_hz, n_in):
    resampler = StreamResampler(rate_in_hz)
    head = resampler.process(np.zeros(n_in, dtype=np.float32))
    n_out = len(head) + len(resampler.flush())
    assert abs(n_out - round(n_in * SAMPLE_RATE_HZ / rate_in_hz)) <= 1
    assert len(resampler.process(np.ones(10, np.float32))) + len(resampler.flush()) > 0  # reset


def test_identity_passes_float32_through_without_a_copy():
    resampler = StreamResampler(16_000)
    audio = tone(440, 16_000, seconds=0.1)
    assert resampler.process(audio) is audio
    as_float64 = resampler.process(audio.astype(np.float64))
    assert as_float64.dtype == np.float32 and np.array_equal(as_float64, audio)
    assert len(resampler.flush()) == 0


def test_process_rejects_multichannel_blocks():
    with pytest.raises(ValueError, match="mono"):
        StreamResampler(48_000).process(np.zeros((10, 2), np.float32))


def test_to_mono_averages_channels():
    left, right = tone(1000, 16_000, 0.1, 0.5), tone(1000, 16_000, 0.1, 0.1)
    mixed = to_mono(np.stack([left, right], axis=1))  # (frames, 2) -> (frames,)
    assert mixed.dtype == np.float32 and mixed.shape == left.shape
    assert np.allclose(mixed, (left + right) / 2, atol=1e-7)
    assert to_mono(left) is left
    assert np.array_equal(to_mono(left[:, None]), left)
