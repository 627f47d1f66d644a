"""Backgrounds and scene mixing for the synthesiser (numpy only).

A scene is a background (noise, mains hum, rain or distant babble) at a
random level plus foreground events at a random signal-to-noise ratio, with a
simple room reverb on the foreground. The events' labels record where each
dry event starts and ends. Use it through :mod:`shared_models.synth`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from shared_models.constants import EVENT_LABELS, SAMPLE_RATE_HZ, label_index
from shared_models.synth_dsp import (
    fft_convolve,
    fft_len,
    filter_static,
    n_samples,
    rms,
    rms_normalise,
)
from shared_models.synth_events import generate_event
from shared_models.synth_speech import formant_speech

MAX_SCENE_PEAK = 0.99
"""A scene louder than this is scaled down as a whole (never clipped)."""

BACKGROUND_DBFS_RANGE = (-45.0, -20.0)
"""random_scene: background RMS level, dB relative to full scale."""

SNR_DB_RANGE = (0.0, 20.0)
"""random_scene: event level (RMS while sounding) over background RMS, dB."""


@dataclass(frozen=True)
class LabelledEvent:
    """One foreground event: its class and where it sounds, in seconds from the clip start."""

    label: str
    onset_s: float
    offset_s: float

    def __post_init__(self) -> None:
        label_index(self.label)  # KeyError naming the known labels
        if not 0 <= self.onset_s < self.offset_s:
            raise ValueError(
                f"event {self.label!r}: need 0 <= onset_s < offset_s, "
                f"got {self.onset_s!r} .. {self.offset_s!r}"
            )


@dataclass
class Scene:
    """A mixed clip: float32 mono audio (peak <= 1) and its labelled events."""

    audio: np.ndarray
    events: list[LabelledEvent] = field(default_factory=list)
    sample_rate_hz: int = SAMPLE_RATE_HZ

    @property
    def duration_s(self) -> float:
        return len(self.audio) / self.sample_rate_hz


# --- backgrounds -------------------------------------------------------------------
def _coloured_noise(n: int, rng: np.random.Generator, exponent: float) -> np.ndarray:
    """Noise with power spectrum ~ 1/f**exponent (1: pink, 2: brown) above 10 Hz."""
    nfft = fft_len(n)
    f = np.fft.rfftfreq(nfft, 1 / SAMPLE_RATE_HZ)
    gain = np.where(f >= 10.0, np.maximum(f, 20.0) ** (-exponent / 2), 0.0)
    return np.fft.irfft(np.fft.rfft(rng.standard_normal(nfft)) * gain, nfft)[:n]


def _pink(n: int, rng: np.random.Generator) -> np.ndarray:
    return _coloured_noise(n, rng, 1.0)


def _brown(n: int, rng: np.random.Generator) -> np.ndarray:
    return _coloured_noise(n, rng, 2.0)


def _hum(n: int, rng: np.random.Generator) -> np.ndarray:
    """Mains hum: 50 or 60 Hz and harmonics (odd ones strong: transformer buzz), light noise."""
    t = np.arange(n) / SAMPLE_RATE_HZ
    mains_hz = (50.0, 60.0)[rng.integers(2)] * rng.uniform(0.998, 1.002)
    k = np.arange(1, 11)
    amps = np.where(k % 2 == 1, 1.0, 0.3) / k**0.7 * rng.uniform(0.5, 1.5, len(k))
    # one cycle as a 1024-point wavetable, then read at the mains phase (10 sines cost 10x more)
    cycle = np.arange(1024) / 1024
    phases = rng.uniform(0, 2 * np.pi, len(k))
    table = np.sum(amps[:, None] * np.sin(2 * np.pi * k[:, None] * cycle + phases[:, None]), axis=0)
    x = np.interp(mains_hz * t, cycle, table, period=1.0)
    wobble = 1 + 0.05 * np.sin(2 * np.pi * rng.uniform(0.1, 0.5) * t)
    return rms_normalise(x) * wobble + 0.05 * rms_normalise(_pink(n, rng))


def _rain(n: int, rng: np.random.Generator) -> np.ndarray:
    """Rain: a broad hiss that swells slowly, plus droplets (short 1.5-5 kHz pings)."""
    t = np.arange(n) / SAMPLE_RATE_HZ
    hiss = filter_static(
        rng.standard_normal(n), lambda f: np.clip(f / 400.0, 0, 1) / (1 + f / 6000.0)
    )
    swell = 1 + 0.2 * np.sin(2 * np.pi * rng.uniform(0.05, 0.3) * t + rng.uniform(0, 2 * np.pi))
    # droplets: impulse trains convolved with a few kernels (one FFT each, not one per drop)
    n_drops = rng.poisson(rng.uniform(20, 200) * n / SAMPLE_RATE_HZ)
    positions = rng.integers(0, n, n_drops)
    kernel_of = rng.integers(0, 3, n_drops)
    heights = rng.lognormal(0.0, 0.7, n_drops)
    kt = np.arange(n_samples(0.03)) / SAMPLE_RATE_HZ
    drops = np.zeros(n)
    for k in range(3):
        impulses = np.zeros(n)
        np.add.at(impulses, positions[kernel_of == k], heights[kernel_of == k])
        tau_s = rng.uniform(0.002, 0.008)
        kernel = np.sin(2 * np.pi * rng.uniform(1500, 5000) * kt) * np.exp(-kt / tau_s)
        drops += fft_convolve(impulses, kernel)
    return rms_normalise(hiss) * swell + rng.uniform(0.3, 1.0) * rms_normalise(drops)


def _babble(n: int, rng: np.random.Generator) -> np.ndarray:
    """Distant babble: several formant-speech streams at random levels, dulled by distance."""
    x = np.zeros(n)
    for _ in range(rng.integers(3, 5)):
        x += rng.uniform(0.5, 1.0) * rms_normalise(formant_speech(rng, n))
    return filter_static(x, lambda f: 1 / (1 + (f / 2500.0) ** 2))


BACKGROUND_GENERATORS: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "pink": _pink,
    "brown": _brown,
    "hum": _hum,
    "rain": _rain,
    "babble": _babble,
}
BACKGROUNDS: tuple[str, ...] = tuple(BACKGROUND_GENERATORS)


def generate_background(kind: str, n_samples: int, rng: np.random.Generator) -> np.ndarray:
    """``n_samples`` of background ``kind`` (one of :data:`BACKGROUNDS`), float32, RMS 1."""
    try:
        make = BACKGROUND_GENERATORS[kind]
    except KeyError:
        known = ", ".join(BACKGROUNDS)
        raise KeyError(f"unknown background {kind!r}; known backgrounds: {known}") from None
    if n_samples <= 0:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    return rms_normalise(make(n_samples, rng))


# --- mixing ------------------------------------------------------------------------
def active_rms(x: np.ndarray) -> float:
    """RMS over the 25 ms blocks within 30 dB of the loudest: the level while it sounds.

    A smoke alarm is silent half the time and a knock is mostly decay, so the
    plain RMS would set their SNR far too high.
    """
    block = SAMPLE_RATE_HZ // 40
    n = max(1, -(-len(x) // block))  # blocks, the last one zero-padded
    energy = np.mean(np.square(np.pad(x, (0, n * block - len(x)))).reshape(n, block), axis=1)
    loud = energy[energy >= energy.max() * 1e-3]
    return float(np.sqrt(np.mean(loud))) if loud.size and loud.max() > 0 else 0.0


def add_reverb(x: np.ndarray, rng: np.random.Generator, rt60_s: float, wet: float) -> np.ndarray:
    """Room reverb: ``x`` mixed with itself convolved by exponentially decaying noise.

    The impulse response falls 60 dB in ``rt60_s``; ``wet`` in [0, 1] is the
    share of the reverberant signal, which is matched to the dry RMS first.
    """
    t = np.arange(n_samples(rt60_s)) / SAMPLE_RATE_HZ
    impulse_response = rng.standard_normal(len(t)) * np.exp(-6.91 * t / rt60_s)  # ln(1000) = 6.91
    reverberant = fft_convolve(x, impulse_response)
    level = rms(reverberant)
    if level > 0:
        reverberant *= rms(x) / level
    return (1 - wet) * x + wet * reverberant


def _mix_in(
    audio: np.ndarray, label: str, event: np.ndarray, start: int, level_rms: float
) -> LabelledEvent:
    """Add ``event`` to ``audio`` at sample ``start`` (cut at the end) with RMS ``level_rms``
    while it sounds; its label covers the dry event."""
    gain = level_rms / active_rms(event)
    event = event[: len(audio) - start]
    audio[start : start + len(event)] += gain * event
    return LabelledEvent(label, start / SAMPLE_RATE_HZ, (start + len(event)) / SAMPLE_RATE_HZ)


def _finish(audio: np.ndarray, events: list[LabelledEvent]) -> Scene:
    peak = float(np.max(np.abs(audio), initial=0.0))
    if peak > MAX_SCENE_PEAK:
        audio = audio * (MAX_SCENE_PEAK / peak)
    return Scene(audio.astype(np.float32), sorted(events, key=lambda e: (e.onset_s, e.label)))


def random_scene(
    rng: np.random.Generator,
    duration_s: float = 10.0,
    max_events: int = 3,
    labels: list[str] | None = None,
) -> Scene:
    """A random labelled scene: random background and level, events, SNRs and room.

    ``labels`` fixes which events occur (the corpus uses it to balance the
    classes); by default 0..``max_events`` events of random classes. Events may
    overlap; each lies wholly inside the clip unless it is longer than the clip.
    """
    n = n_samples(duration_s)
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    background_rms = 10 ** (rng.uniform(*BACKGROUND_DBFS_RANGE) / 20)
    background = generate_background(kind, n, rng) * background_rms
    if labels is None:
        n_events = rng.integers(0, max_events + 1)
        labels = [EVENT_LABELS[i] for i in rng.integers(0, len(EVENT_LABELS), n_events)]
    foreground = np.zeros(n)
    events = []
    for label in labels:
        event = generate_event(label, rng)[:n]
        start = int(rng.integers(0, n - len(event) + 1))
        snr_db = rng.uniform(*SNR_DB_RANGE)
        events.append(
            _mix_in(foreground, label, event, start, background_rms * 10 ** (snr_db / 20))
        )
    if events:  # one room for the whole scene: its reverb tails may run past an event's offset
        rt60_s, wet = rng.uniform(0.1, 0.8), rng.uniform(0.0, 0.5)
        foreground = add_reverb(foreground, rng, rt60_s=rt60_s, wet=wet)
    return _finish(background + foreground, events)


def scripted_scene(
    script: list[tuple[str, float]],
    duration_s: float,
    seed: int,
    background: str = "pink",
    snr_db: float = 12.0,
    background_dbfs: float = -35.0,
) -> Scene:
    """Events ``(label, onset_s)`` at known times over a background, for demos and tests.

    Each event has its class's default duration (cut at the clip end) and sounds
    ``snr_db`` above the background, whose RMS is ``background_dbfs``; no reverb.
    """
    rng = np.random.default_rng(seed)
    n = n_samples(duration_s)
    background_rms = 10 ** (background_dbfs / 20)
    audio = generate_background(background, n, rng).astype(np.float64) * background_rms
    events = []
    for label, onset_s in script:
        start = round(onset_s * SAMPLE_RATE_HZ)
        if not 0 <= start < n:
            raise ValueError(
                f"scripted event {label!r} at {onset_s} s is outside the {duration_s} s scene"
            )
        event = generate_event(label, rng)
        events.append(_mix_in(audio, label, event, start, background_rms * 10 ** (snr_db / 20)))
    return _finish(audio, events)
