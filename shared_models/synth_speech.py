"""Synthetic speech for the corpus (numpy only; espeak-ng used when installed).

Two sources: ``espeak-ng`` (a real text-to-speech engine, if its binary is on
PATH) speaking short phrases, and a formant synthesiser (a jittered glottal
pulse train through three moving vowel formants) that needs nothing. The
formant synthesiser also makes the "babble" background. Use it through
:mod:`shared_models.synth`.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess

import numpy as np

from shared_models.constants import SAMPLE_RATE_HZ
from shared_models.synth_dsp import ar_envelope, filter_framewise, n_samples, resonance_gain

log = logging.getLogger(__name__)

# fmt: off
_VOWEL_FORMANTS_HZ = np.array([
    [730, 1090, 2440],  # a (father)
    [270, 2290, 3010],  # i (beet)
    [300,  870, 2240],  # u (boot)
    [530, 1840, 2480],  # e (bet)
    [570,  840, 2410],  # o (bought)
    [660, 1720, 2410],  # ae (bat)
    [490, 1350, 1690],  # er (bird)
    [440, 1020, 2240],  # oo (book)
], dtype=np.float64)  # (8, 3): F1-F3 of adult male American English vowels (Peterson & Barney)
# fmt: on
_FORMANT_BANDWIDTHS_HZ = (90.0, 110.0, 170.0)
_FORMANT_LEVELS = (1.0, 0.5, 0.25)


def formant_speech(rng: np.random.Generator, n: int, f0_hz: float | None = None) -> np.ndarray:
    """``n`` samples of speech-like sound from one voice (pitch ``f0_hz``, 90-220 Hz if None).

    Syllables of 0.1-0.28 s with changing vowels, some with a fricative onset,
    and pauses; a pitch contour that falls over each ~2 s phrase, with jitter.
    """
    f0_hz = rng.uniform(90, 220) if f0_hz is None else f0_hz
    # syllable layout: enough syllables to fill n samples even if all are short pauses
    max_syll = int(n / SAMPLE_RATE_HZ / 0.06) + 2
    durs_s = rng.uniform(0.1, 0.28, max_syll)
    pause = rng.random(max_syll) < 0.2
    durs_s[pause] = rng.uniform(0.06, 0.25, pause.sum())
    bounds = np.concatenate([[0.0], np.cumsum(durs_s)]) * SAMPLE_RATE_HZ  # (S + 1,) in samples
    idx = np.arange(n)
    syl = np.searchsorted(bounds, idx, side="right") - 1  # (n,) syllable of each sample
    since = idx - bounds[syl]  # samples since the syllable began
    u = since / (bounds[syl + 1] - bounds[syl])  # position inside the syllable, 0..1
    level = rng.uniform(0.5, 1.0, max_syll) * ~pause  # (S,)
    env = np.sqrt(4 * u * (1 - u)) * level[syl]  # (n,) each syllable swells and fades

    # glottal source: one pulse per pitch period
    centres_s = (bounds[:-1] + bounds[1:]) / 2 / SAMPLE_RATE_HZ  # (S,)
    t_s = idx / SAMPLE_RATE_HZ
    declination = 1 - 0.1 * (t_s % 2.0) / 2.0
    knots = np.arange(0, n + 64, 64)  # jitter: a new random pitch offset every 4 ms
    jitter = np.interp(idx, knots, 0.02 * rng.standard_normal(len(knots)))
    freq_hz = np.interp(t_s, centres_s, f0_hz * rng.uniform(0.9, 1.15, max_syll))
    freq_hz *= declination + jitter
    pulses = np.diff(np.floor(np.cumsum(freq_hz) / SAMPLE_RATE_HZ), prepend=0.0)
    source = (pulses + 0.03 * rng.standard_normal(n, dtype=np.float32)) * env  # + breath

    # vocal tract: three formants gliding from one syllable's vowel to the next
    tract = 1 + 0.15 * (f0_hz - 90) / 130  # higher voices, shorter vocal tracts
    formants = _VOWEL_FORMANTS_HZ[rng.integers(0, len(_VOWEL_FORMANTS_HZ), max_syll)] * tract

    def vocal_tract(frame_s: np.ndarray, f: np.ndarray) -> np.ndarray:
        gains = np.zeros((len(frame_s), len(f)), dtype=np.float32)  # (F, B)
        for i in range(3):
            fc = np.interp(frame_s, centres_s, formants[:, i]).astype(np.float32)  # (F,)
            gains += _FORMANT_LEVELS[i] * resonance_gain(f, fc[:, None], _FORMANT_BANDWIDTHS_HZ[i])
        no_dc = np.clip((f - 40.0) / 60.0, 0.0, 1.0)
        return gains * (no_dc / (1 + f / 500.0))  # and the glottal pulse's spectral roll-off

    voiced = filter_framewise(source, vocal_tract)
    fricative = (rng.random(max_syll) < 0.4) & ~pause
    hissing = fricative[syl] & (since < n_samples(0.06))  # the first 60 ms of those syllables
    hiss = np.zeros(n)
    hiss[hissing] = np.diff(rng.standard_normal(np.count_nonzero(hissing) + 1))  # bright noise
    return voiced / (np.sqrt(np.mean(voiced**2)) + 1e-9) + 0.2 * hiss * level[syl]


_ESPEAK_DISABLE_ENV = "SOUNDFLEET_NO_ESPEAK"
"""Set to any non-empty value to use the formant synthesiser even where espeak-ng exists."""

_ESPEAK_VOICES = ("en", "en-us", "en-gb", "en+m3", "en+f2", "en+f4")
# fmt: off
_WORDS = (
    "hello", "kitchen", "window", "open", "close", "the", "door", "please", "come", "here",
    "where", "is", "my", "phone", "dinner", "ready", "today", "morning", "quiet", "light",
    "turn", "off", "music", "later", "okay", "thank", "you", "garden", "weather", "rain",
)
# fmt: on


def espeak_available() -> bool:
    """Whether speech events come from ``espeak-ng`` (on PATH, not disabled by the env)."""
    return not os.environ.get(_ESPEAK_DISABLE_ENV) and shutil.which("espeak-ng") is not None


def _espeak_phrase(rng: np.random.Generator) -> np.ndarray | None:
    """A few words spoken by espeak-ng, at 16 kHz, trimmed; None if espeak-ng failed."""
    from shared_models.wavio import WavFormatError, decode_wav

    words = " ".join(rng.choice(_WORDS, size=rng.integers(2, 7)))
    voice = _ESPEAK_VOICES[rng.integers(len(_ESPEAK_VOICES))]
    pitch, words_per_min = rng.integers(20, 80), rng.integers(130, 190)
    cmd = ["espeak-ng", "--stdout", "-v", voice, "-p", str(pitch), "-s", str(words_per_min), words]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=20, check=True)
        audio, rate_hz = decode_wav(proc.stdout, source="espeak-ng stdout")
    except (OSError, subprocess.SubprocessError, WavFormatError) as exc:
        log.warning("espeak-ng failed (%s); using the formant synthesiser", exc)
        return None
    t_out = np.arange(int(len(audio) * SAMPLE_RATE_HZ / rate_hz)) * (rate_hz / SAMPLE_RATE_HZ)
    audio = np.interp(t_out, np.arange(len(audio)), audio)  # linear resampling to 16 kHz
    loud = np.flatnonzero(np.abs(audio) > 0.02 * np.max(np.abs(audio), initial=1e-9))
    return audio[loud[0] : loud[-1] + 1] if len(loud) else None


def speech(rng: np.random.Generator, duration_s: float | None) -> np.ndarray:
    """A short phrase, 1-3 s: espeak-ng when available, else the formant synthesiser."""
    target = None if duration_s is None else n_samples(duration_s)
    if espeak_available():
        phrase = _espeak_phrase(rng)
        if phrase is not None and target is None:
            return phrase[: n_samples(3.0)]
        if phrase is not None:
            return np.pad(phrase[:target], (0, max(0, target - len(phrase))))
    n = n_samples(rng.uniform(1.0, 3.0)) if target is None else target
    return formant_speech(rng, n) * ar_envelope(n, 0.01, 0.05)
