"""Procedural sound events for the built-in corpus (numpy only).

Each event class gets the structure a listener (and a classifier that sees
25 ms raw-waveform patches) would recognise it by: the sweep of a siren, the
T3 beeps of a smoke alarm, the two decaying pitches of a doorbell, and so on.
Every random choice is drawn from the ``np.random.Generator`` passed in, so a
seed fixes the waveform. Use it through :mod:`shared_models.synth`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from shared_models.constants import SAMPLE_RATE_HZ
from shared_models.synth_dsp import (
    ar_envelope,
    filter_static,
    harmonic_tone,
    n_samples,
    peak_normalise,
    phase_of,
    resonance_gain,
    smooth,
)
from shared_models.synth_speech import speech

EVENT_PEAK = 0.9
"""Every event comes out peak-normalised to this level; scenes set the real level."""

EventFn = Callable[[np.random.Generator, "float | None"], np.ndarray]


# --- tonal alarms --------------------------------------------------------------
def siren(rng: np.random.Generator, duration_s: float | None) -> np.ndarray:
    """Emergency siren: wail, yelp or hi-lo pattern, odd-heavy harmonics; 3-5 s."""
    n = n_samples(rng.uniform(3.0, 5.0) if duration_s is None else duration_s)
    t = np.arange(n) / SAMPLE_RATE_HZ
    scale = rng.uniform(0.95, 1.05)  # sirens differ a little from unit to unit
    pattern = ("wail", "yelp", "hilo")[rng.integers(3)]
    if pattern == "hilo":
        half_s = rng.uniform(0.5, 0.6)
        high = (np.floor(t / half_s + rng.integers(2)) % 2) == 0
        freq_hz = np.where(high, 950.0, 725.0) * scale
    else:
        period_s = rng.uniform(3.0, 5.0) if pattern == "wail" else rng.uniform(0.25, 0.35)
        low_hz, high_hz = (600.0, 1500.0) if pattern == "wail" else (650.0, 1550.0)
        sweep = 0.5 - 0.5 * np.cos(2 * np.pi * (t / period_s + rng.uniform()))
        freq_hz = (low_hz + (high_hz - low_hz) * sweep) * scale
    x = harmonic_tone(phase_of(freq_hz), freq_hz, (1.0, 0.15, 0.35, 0.08, 0.18, 0.04, 0.1))
    return x * ar_envelope(n, 0.03, 0.08)


T3_BEEP_S = 0.5
T3_GAP_S = 0.5
T3_PAUSE_S = 1.5
T3_CYCLE_S = 3 * T3_BEEP_S + 2 * T3_GAP_S + T3_PAUSE_S  # 4.0 s
"""NFPA 72 temporal-three evacuation pattern: three 0.5 s beeps 0.5 s apart, then 1.5 s off."""


def t3_gate(t_s: np.ndarray) -> np.ndarray:
    """1.0 where the T3 pattern (starting at t = 0) is sounding, else 0.0."""
    pos = t_s % T3_CYCLE_S
    on = (pos < 3 * T3_BEEP_S + 2 * T3_GAP_S) & ((pos % (T3_BEEP_S + T3_GAP_S)) < T3_BEEP_S)
    return on.astype(np.float64)


def smoke_alarm(rng: np.random.Generator, duration_s: float | None) -> np.ndarray:
    """Piezo smoke alarm at ~3.1 kHz in the T3 pattern; one or two cycles (2.5 or 6.5 s).

    A piezo's square-ish drive has its third harmonic at ~9.3 kHz, above the
    8 kHz Nyquist limit, so at 16 kHz only the fundamental and a weak second
    harmonic survive; the trailing 1.5 s pause of the last cycle is not part
    of the event.
    """
    if duration_s is None:
        duration_s = rng.integers(1, 3) * T3_CYCLE_S - T3_PAUSE_S
    n = n_samples(duration_s)
    t = np.arange(n) / SAMPLE_RATE_HZ
    freq_hz = rng.uniform(3000.0, 3300.0) * (1 + 0.002 * np.sin(2 * np.pi * rng.uniform(3, 8) * t))
    tone = harmonic_tone(phase_of(freq_hz), freq_hz, (1.0, 0.2))
    gate = smooth(t3_gate(t), n_samples(0.004))  # 4 ms ramps: no clicks at the beep edges
    return tone * gate


T4_BEEP_S = 0.1
T4_GAP_S = 0.1
T4_PAUSE_S = 5.0
T4_CYCLE_S = 4 * T4_BEEP_S + 3 * T4_GAP_S + T4_PAUSE_S  # 5.7 s
"""UL 2034 / NFPA 720 temporal-four carbon-monoxide pattern: four 0.1 s beeps 0.1 s apart,
then 5 s off."""


def t4_gate(t_s: np.ndarray) -> np.ndarray:
    """1.0 where the T4 pattern (starting at t = 0) is sounding, else 0.0."""
    pos = t_s % T4_CYCLE_S
    on = (pos < 4 * T4_BEEP_S + 3 * T4_GAP_S) & ((pos % (T4_BEEP_S + T4_GAP_S)) < T4_BEEP_S)
    return on.astype(np.float64)


def co_alarm(rng: np.random.Generator, duration_s: float | None) -> np.ndarray:
    """Piezo carbon-monoxide alarm at ~3.0-3.4 kHz in the T4 pattern; one or two bursts of four
    beeps (0.7 s, or 6.4 s with the pause between). Not one of the built-in labels: the sound a
    user adds as their own class (``soundfleet train --base``), and the tests' held-out class."""
    if duration_s is None:
        duration_s = rng.integers(1, 3) * T4_CYCLE_S - T4_PAUSE_S
    n = n_samples(duration_s)
    t = np.arange(n) / SAMPLE_RATE_HZ
    freq_hz = rng.uniform(3000.0, 3400.0) * (1 + 0.002 * np.sin(2 * np.pi * rng.uniform(3, 8) * t))
    tone = harmonic_tone(phase_of(freq_hz), freq_hz, (1.0, 0.2))
    return tone * smooth(t4_gate(t), n_samples(0.004))


def kettle(rng: np.random.Generator, duration_s: float | None) -> np.ndarray:
    """A whistling kettle: a breathy whistle near 1.8-2.6 kHz that rises as the steam builds
    and then holds, wobbling; 3-6 s. Not one of the built-in labels (see :data:`EXTRA_GENERATORS`)."""
    n = n_samples(rng.uniform(3.0, 6.0) if duration_s is None else duration_s)
    t = np.arange(n) / SAMPLE_RATE_HZ
    rise_s = rng.uniform(0.8, 2.0)
    f0 = rng.uniform(1800.0, 2300.0) * (1 + rng.uniform(0.1, 0.25) * np.minimum(t / rise_s, 1.0))
    freq_hz = f0 * (1 + 0.01 * np.sin(2 * np.pi * rng.uniform(4, 9) * t))
    tone = harmonic_tone(phase_of(freq_hz), freq_hz, (1.0, 0.05))
    breath = filter_static(rng.standard_normal(n), lambda f: resonance_gain(f, float(np.mean(f0)), 400.0))
    level = np.minimum(t / rise_s, 1.0) ** 1.5  # the whistle swells as it starts
    return (tone + 0.3 * breath / max(np.std(breath), 1e-9)) * level * ar_envelope(n, 0.0, 0.15)


def doorbell(rng: np.random.Generator, duration_s: float | None) -> np.ndarray:
    """Two-tone "ding-dong" chime: struck bars a major third apart, decaying partials."""
    n = n_samples(rng.uniform(1.5, 2.0) if duration_s is None else duration_s)
    ding_hz = 659.25 * 2 ** (rng.uniform(-3, 3) / 12)  # E5, transposed up to 3 semitones
    dong_hz = ding_hz * 523.25 / 659.25  # C5: a major third below
    dong_at = n_samples(rng.uniform(0.5, 0.7))
    ratios = np.array([1.0, 2.0, 3.0, 4.0]) * (1 + rng.uniform(0, 0.004, 4))  # slightly stretched
    amps = np.array([1.0, 0.45, 0.25, 0.12])
    taus_s = np.array([0.8, 0.45, 0.25, 0.15]) * rng.uniform(0.8, 1.2)
    out = np.zeros(n)
    for start, f0 in ((0, ding_hz), (dong_at, dong_hz)):
        if start >= n:
            break
        t = np.arange(n - start)[:, None] / SAMPLE_RATE_HZ  # (T, 1)
        partials = amps * np.exp(-t / taus_s) * np.sin(2 * np.pi * f0 * ratios * t)  # (T, 4)
        click = 0.3 * rng.standard_normal(len(t)) * np.exp(-t[:, 0] / 0.002)  # the striker
        out[start:] += partials.sum(axis=1) + click
    return out


def car_horn(rng: np.random.Generator, duration_s: float | None) -> np.ndarray:
    """Dual-tone horn: two close buzzy fundamentals (~400-500 Hz), slightly overdriven."""
    n = n_samples(rng.uniform(0.4, 1.5) if duration_s is None else duration_s)
    amps = 1.0 / np.arange(1, 17)  # sawtooth-like: a diaphragm driven hard is rich in harmonics
    x = np.zeros(n)
    for f0, level in ((rng.uniform(400, 430), 1.0), (rng.uniform(470, 500), 0.8)):
        freq_hz = np.full(n, f0)
        x += level * harmonic_tone(phase_of(freq_hz) + rng.uniform(0, 2 * np.pi), freq_hz, amps)
    x = np.tanh(1.8 * x / np.max(np.abs(x)))  # the slight distortion of a horn at full blast
    return x * ar_envelope(n, 0.015, 0.03)


# --- impulsive events ------------------------------------------------------------
def _sequence(
    rng: np.random.Generator,
    duration_s: float | None,
    count: tuple[int, int],
    unit: Callable[[], np.ndarray],
    gap_s: tuple[float, float],
) -> np.ndarray:
    """Units (barks, knocks, cries) one after another with random gaps.

    With no duration, ``count`` (inclusive range) units are laid out and the
    event ends with the last one; with a duration, units are laid out until it
    is filled and the last one is cut.
    """
    units, gaps = [], []
    total = 0
    target = None if duration_s is None else n_samples(duration_s)
    n_units = rng.integers(count[0], count[1] + 1)
    while (target is None and len(units) < n_units) or (target is not None and total < target):
        units.append(unit())
        gaps.append(n_samples(rng.uniform(*gap_s)))
        total += len(units[-1]) + gaps[-1]
    n = total - gaps[-1] if target is None else target
    out = np.zeros(n)
    pos = 0
    for u, gap in zip(units, gaps, strict=True):
        m = min(len(u), n - pos)
        if m <= 0:
            break
        out[pos : pos + m] += u[:m]
        pos += len(u) + gap
    return out


def dog_bark(rng: np.random.Generator, duration_s: float | None) -> np.ndarray:
    """1-3 barks of 0.15-0.35 s: noisy harmonic bursts (300-700 Hz) through dog formants."""
    pitch_hz = rng.uniform(300, 700)

    def bark() -> np.ndarray:
        n = n_samples(rng.uniform(0.15, 0.35))
        u = np.linspace(0.0, 1.0, n)
        freq_hz = pitch_hz * rng.uniform(0.9, 1.1) * (0.8 + 0.35 * np.sin(np.pi * u**0.7))
        voiced = harmonic_tone(phase_of(freq_hz), freq_hz, 1.0 / np.arange(1, 13))
        x = voiced + 0.35 * rng.standard_normal(n)  # barks are rough, partly noise
        return x * ar_envelope(n, 0.008, 0.0) * np.exp(-u * rng.uniform(2.5, 4.0))

    x = _sequence(rng, duration_s, (1, 3), bark, (0.1, 0.35))
    formants_hz = (rng.uniform(600, 1000), rng.uniform(1400, 2200), rng.uniform(2800, 3600))
    return filter_static(
        x, lambda f: 0.05 + sum(resonance_gain(f, fc, 300.0) for fc in formants_hz)
    )


def knock(rng: np.random.Generator, duration_s: float | None) -> np.ndarray:
    """2-5 knocks 0.15-0.3 s apart: a low damped door resonance plus a knuckle click."""
    body_hz = rng.uniform(100, 300)
    tau_s = rng.uniform(0.02, 0.04)
    n = n_samples(0.1)
    t = np.arange(n) / SAMPLE_RATE_HZ

    def one_knock() -> np.ndarray:
        f = body_hz * rng.uniform(0.97, 1.03)
        body = np.sin(2 * np.pi * f * t) * np.exp(-t / tau_s)
        overtone = 0.4 * np.sin(2 * np.pi * 2.3 * f * t) * np.exp(-t / (tau_s / 2))
        click = 0.6 * rng.standard_normal(n) * np.exp(-t / 0.0015)
        return rng.uniform(0.7, 1.0) * (body + overtone + click)

    return _sequence(rng, duration_s, (2, 5), one_knock, (0.05, 0.2))


def glass_break(rng: np.random.Generator, duration_s: float | None) -> np.ndarray:
    """Broadband crack, then many short 3-8 kHz ringing shards; 0.4-1.0 s."""
    duration_s = rng.uniform(0.4, 1.0) if duration_s is None else duration_s
    n = n_samples(duration_s)
    t = np.arange(n) / SAMPLE_RATE_HZ
    crack = rng.standard_normal(n) * np.exp(-t / rng.uniform(0.003, 0.008))
    debris = 0.12 * rng.standard_normal(n) * np.exp(-t / (duration_s / 3))
    out = filter_static(crack + debris, lambda f: np.clip((f - 1000.0) / 2000.0, 0.0, 1.0))
    count = rng.integers(25, 70)
    onsets_s = np.minimum(rng.exponential(duration_s * 0.25, count), duration_s * 0.9)
    for onset_s in onsets_s:
        start = int(onset_s * SAMPLE_RATE_HZ)
        tau = rng.uniform(0.004, 0.03)
        m = min(n - start, n_samples(5 * tau))
        tt = np.arange(m) / SAMPLE_RATE_HZ
        f = rng.uniform(3000, 7500)
        f2 = min(f * rng.uniform(1.3, 1.9), 7800.0)
        ring = np.sin(2 * np.pi * f * tt) + 0.5 * np.sin(2 * np.pi * f2 * tt)
        level = rng.uniform(0.2, 1.0) * np.exp(-onset_s / (duration_s * 0.4))
        out[start : start + m] += level * ring * np.exp(-tt / tau)
    return out


# --- voices (speech lives in synth_speech) ---------------------------------------
def baby_cry(rng: np.random.Generator, duration_s: float | None) -> np.ndarray:
    """Cries of 0.5-1 s (pitch 350-550 Hz, arched contour, vibrato) with gasps; 1-3 s."""
    duration_s = rng.uniform(1.0, 3.0) if duration_s is None else duration_s
    pitch_hz = rng.uniform(350, 550)

    def cry() -> np.ndarray:
        n = n_samples(rng.uniform(0.5, 1.0))
        u = np.linspace(0.0, 1.0, n)
        vibrato = 1 + 0.025 * np.sin(2 * np.pi * rng.uniform(5, 8) * u * n / SAMPLE_RATE_HZ)
        freq_hz = pitch_hz * rng.uniform(0.95, 1.05) * (0.85 + 0.3 * np.sin(np.pi * u)) * vibrato
        x = harmonic_tone(phase_of(freq_hz), freq_hz, 1.0 / np.arange(1, 16) ** 0.7)
        x += 0.15 * rng.standard_normal(n)  # a strained, hoarse voice
        return x * ar_envelope(n, 0.05, 0.1) * (0.6 + 0.4 * np.sin(np.pi * u))

    x = _sequence(rng, duration_s, (1, 1), cry, (0.1, 0.3))
    formants_hz = (rng.uniform(1000, 1300), rng.uniform(2500, 3200))
    return filter_static(x, lambda f: 0.3 + sum(resonance_gain(f, fc, 500.0) for fc in formants_hz))


EVENT_GENERATORS: dict[str, EventFn] = {
    "siren": siren,
    "smoke_alarm": smoke_alarm,
    "doorbell": doorbell,
    "dog_bark": dog_bark,
    "glass_break": glass_break,
    "knock": knock,
    "car_horn": car_horn,
    "baby_cry": baby_cry,
    "speech": speech,
}
"""Label -> generator(rng, duration_s or None for the class's own default)."""

EXTRA_GENERATORS: dict[str, EventFn] = {"co_alarm": co_alarm, "kettle": kettle}
"""Sounds outside the built-in labels (the corpus never draws them): custom classes a user
adds on top of a bundle, and the few-shot tests' held-out class."""


def generate_event(
    label: str, rng: np.random.Generator, duration_s: float | None = None
) -> np.ndarray:
    """One event of class ``label``: float32, peak-normalised to :data:`EVENT_PEAK`."""
    try:
        make = {**EVENT_GENERATORS, **EXTRA_GENERATORS}[label]
    except KeyError:
        known = ", ".join([*EVENT_GENERATORS, *EXTRA_GENERATORS])
        raise KeyError(f"unknown event label {label!r}; known labels: {known}") from None
    if duration_s is not None and not duration_s > 0:
        raise ValueError(f"duration_s must be positive, got {duration_s!r}")
    x = make(rng, duration_s)
    x = x * ar_envelope(len(x), 0.0, 0.01)  # a cut-off tail must not click
    return peak_normalise(x, EVENT_PEAK)


__all__ = ["EVENT_GENERATORS", "EVENT_PEAK", "EXTRA_GENERATORS", "T3_CYCLE_S", "T4_CYCLE_S", "generate_event", "t3_gate",
           "t4_gate"]
