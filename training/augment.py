"""Make the few real event recordings count: mix them into real background and speech
as a real microphone would hear them.

A real event clip (a 0.4 s bark, a 3 s siren) carries a weak label: the whole file.
Its *active region* (where its level is within ``ACTIVE_RANGE_DB`` of its loudest 25 ms
frame) is cut out and placed, at a random offset, into ``MIXTURE_S`` seconds of a real
negative recording (background, confusers or speech), after the chain a room and a cheap
device apply (:class:`AugmentConfig`):

1. pitch/tempo: resampled by up to ``pitch_semitones`` (a bigger dog, another horn);
2. the room: convolved with a simulated room impulse response (:func:`simulated_rir`);
3. level: scaled so that the event's power over its active region is ``snr_db`` above
   the background's power over the same samples (-5 .. 20 dB);
4. the device, on the sum: cheap-microphone EQ (high-pass, presence peak), band-limiting
   to what an 8 or 11.025 kHz capture keeps, and an overall gain.

The mixture is strongly labelled: the event's label over where it was placed (plus its
reverberant tail), and every label the negative carried (speech) over the whole clip.
Everything is drawn from one ``numpy`` generator, so a seed gives the same mixtures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared_models.constants import PATCH_SAMPLES, SAMPLE_RATE_HZ
from shared_models.synth_dsp import fft_convolve, filter_static, resonance_gain, rms
from training.dataset import FramedClip, frame_labels, frame_patches
from training.sources import ClipEvent

ACTIVE_RANGE_DB = 30.0
"""A 25 ms frame is part of an event while its level is within this many dB of the loudest."""

MIXTURE_S = 4.0
"""Length of one mixture: room for a 1 s window before and after a short event."""

TAIL_LABEL_S = 0.1
"""The label runs this far past the event's dry end (the reverberant tail is still the event)."""


@dataclass(frozen=True)
class AugmentConfig:
    """The ranges every random choice is drawn from (uniformly unless said otherwise)."""

    snr_db: tuple[float, float] = (-5.0, 20.0)
    rir_probability: float = 0.6
    rt60_s: tuple[float, float] = (0.15, 0.9)  # living rooms to stairwells
    direct_to_reverb_db: tuple[float, float] = (-3.0, 12.0)  # far to near the microphone
    bandlimit_probability: float = 0.3
    bandlimit_rates_hz: tuple[int, ...] = (8_000, 11_025)
    mic_eq_probability: float = 0.5
    highpass_hz: tuple[float, float] = (80.0, 400.0)
    presence_hz: tuple[float, float] = (2_000.0, 5_000.0)
    presence_db: tuple[float, float] = (-6.0, 6.0)
    pitch_probability: float = 0.3
    pitch_semitones: float = 1.0
    gain_db: tuple[float, float] = (-20.0, 0.0)  # overall level of the mixture, peak 0 dBFS at most


@dataclass
class Mixture:
    audio: np.ndarray  # (MIXTURE_S * SAMPLE_RATE_HZ,) float32, 16 kHz
    events: list[tuple[str, float, float]]  # (label, onset_s, offset_s)
    snr_db: float


def active_region(audio: np.ndarray, range_db: float = ACTIVE_RANGE_DB) -> tuple[int, int]:
    """(start, end) samples from the first to the last 25 ms frame within ``range_db`` of the
    loudest frame; the whole clip for silence."""
    n = len(audio) // PATCH_SAMPLES
    if n == 0:
        return 0, len(audio)
    power = np.mean(np.square(audio[: n * PATCH_SAMPLES].reshape(n, PATCH_SAMPLES), dtype=np.float64), axis=1)
    if power.max() <= 0:
        return 0, len(audio)
    loud = np.flatnonzero(power >= power.max() * 10 ** (-range_db / 10))
    return int(loud[0]) * PATCH_SAMPLES, min(len(audio), (int(loud[-1]) + 1) * PATCH_SAMPLES)


def simulated_rir(rng: np.random.Generator, rt60_s: float, direct_to_reverb_db: float) -> np.ndarray:
    """A room impulse response: the direct path, then a diffuse tail of Gaussian noise that
    decays by 60 dB in ``rt60_s`` (the statistical room model of Schroeder and Polack),
    starting after a 2..10 ms pre-delay and darkening over time (air and wall absorption
    take the highs first). Scaled so the direct path carries ``direct_to_reverb_db`` more
    energy than the tail."""
    n = int(min(rt60_s, 1.0) * SAMPLE_RATE_HZ)
    t = np.arange(n) / SAMPLE_RATE_HZ
    tail = rng.standard_normal(n) * np.exp(-6.9078 * t / rt60_s)  # 10^(-60/20) at t = rt60
    tail = 0.5 * tail + 0.5 * np.concatenate([[0.0], tail[:-1]])  # a gentle low-pass, once more ...
    tail[: int(rng.uniform(0.002, 0.010) * SAMPLE_RATE_HZ)] = 0.0
    tail *= np.sqrt(10 ** (-direct_to_reverb_db / 10) / max(float(np.sum(tail**2)), 1e-12))
    tail[0] = 1.0  # the direct path
    return tail


def band_limit(audio: np.ndarray, capture_rate_hz: int) -> np.ndarray:
    """What survives a capture at ``capture_rate_hz`` played back at 16 kHz: nothing above
    its Nyquist frequency (zero-phase, in the frequency domain)."""
    cutoff_hz = 0.95 * capture_rate_hz / 2
    return filter_static(audio, lambda f: (f < cutoff_hz).astype(np.float64))


def mic_eq(audio: np.ndarray, highpass_hz: float, presence_hz: float, presence_db: float) -> np.ndarray:
    """A cheap microphone: a second-order high-pass (a small capsule has no bass) and a
    presence peak or dip (its resonance)."""
    peak = 10 ** (presence_db / 20) - 1.0

    def gain(f: np.ndarray) -> np.ndarray:
        ratio = np.square(f / highpass_hz)
        return ratio / np.sqrt(1 + np.square(ratio)) * (1 + peak * resonance_gain(f, presence_hz, presence_hz / 2))

    return filter_static(audio, gain)


def shift_pitch(audio: np.ndarray, semitones: float) -> np.ndarray:
    """Resample by 2**(semitones / 12): pitch and tempo move together, as with a bigger
    animal or another model of horn."""
    factor = 2 ** (semitones / 12)
    n_out = max(1, int(len(audio) / factor))
    return np.interp(np.arange(n_out) * factor, np.arange(len(audio)), audio)


def background_segment(rng: np.random.Generator, audio: np.ndarray, n: int) -> np.ndarray:
    """``n`` samples from a random offset of ``audio``, looped when it is shorter."""
    if len(audio) == 0:
        return np.zeros(n)
    if len(audio) < n:
        audio = np.tile(audio, -(-n // len(audio)) + 1)
    start = int(rng.integers(0, len(audio) - n + 1))
    return audio[start : start + n].astype(np.float64)


def mix_event(
    rng: np.random.Generator,
    event: np.ndarray,
    label: str,
    background: np.ndarray,
    background_labels: tuple[str, ...] = (),
    config: AugmentConfig = AugmentConfig(),
    mixture_s: float = MIXTURE_S,
) -> Mixture:
    """One strongly labelled mixture of a real event clip into a real negative clip (both 16 kHz)."""
    n = int(mixture_s * SAMPLE_RATE_HZ)
    start, end = active_region(event)
    dry = event[start:end].astype(np.float64)
    if rng.random() < config.pitch_probability:
        dry = shift_pitch(dry, rng.uniform(-config.pitch_semitones, config.pitch_semitones))
    dry = dry[: n - SAMPLE_RATE_HZ // 2]  # leave room: at most mixture_s - 0.5 s of event
    wet = dry
    if rng.random() < config.rir_probability:
        rir = simulated_rir(rng, rng.uniform(*config.rt60_s), rng.uniform(*config.direct_to_reverb_db))
        wet = fft_convolve(np.concatenate([dry, np.zeros(len(rir))]), rir)
    offset = int(rng.integers(0, max(1, n - len(dry))))
    placed = np.zeros(n)
    wet = wet[: n - offset]
    placed[offset : offset + len(wet)] = wet
    noise = background_segment(rng, background, n)
    snr_db = float(rng.uniform(*config.snr_db))
    span = slice(offset, offset + len(dry))
    noise_power = rms(noise[span]) ** 2
    event_power = rms(placed[span]) ** 2
    if noise_power > 0 and event_power > 0:
        placed *= np.sqrt(noise_power * 10 ** (snr_db / 10) / event_power)
    elif event_power > 0:  # digital silence underneath: the event at a modest level
        placed *= 0.1 / np.sqrt(event_power)
    mixed = placed + noise
    if rng.random() < config.mic_eq_probability:
        mixed = mic_eq(mixed, rng.uniform(*config.highpass_hz), rng.uniform(*config.presence_hz),
                       rng.uniform(*config.presence_db))
    if rng.random() < config.bandlimit_probability:
        mixed = band_limit(mixed, int(rng.choice(config.bandlimit_rates_hz)))
    peak = float(np.max(np.abs(mixed), initial=0.0))
    if peak > 0:
        mixed *= 10 ** (rng.uniform(*config.gain_db) / 20) / peak
    onset_s = offset / SAMPLE_RATE_HZ
    offset_s = min(mixture_s, (offset + len(dry)) / SAMPLE_RATE_HZ + TAIL_LABEL_S)
    events = [(label, onset_s, offset_s)] + [(other, 0.0, mixture_s) for other in background_labels if other != label]
    return Mixture(mixed.astype(np.float32), events, snr_db)


def augment_clips(
    clips: list[FramedClip],
    labels: tuple[str, ...],
    per_label: int,
    seed: int,
    config: AugmentConfig = AugmentConfig(),
    quiet: frozenset[str] = frozenset({"speech"}),
) -> list[FramedClip]:
    """``per_label`` mixtures for every label that has weakly labelled event clips in ``clips``
    (a folder of real barks), each into a weakly labelled negative of ``clips`` (a real
    background, confuser or ``quiet`` clip such as speech), cycling through the label's clips.

    Returns strongly labelled clips; none when ``clips`` has no event clips or no negatives.
    """
    rng = np.random.default_rng(seed)
    carried = [c.carried(labels) for c in clips]
    negatives = [(c, tuple(sorted(on))) for c, on in zip(clips, carried, strict=True) if c.weak and on <= quiet]
    out: list[FramedClip] = []
    if not negatives or per_label <= 0:
        return out
    for label in labels:
        sources = [c for c, on in zip(clips, carried, strict=True) if c.weak and on == {label} and label not in quiet]
        for k in range(per_label if sources else 0):
            background, background_labels = negatives[int(rng.integers(len(negatives)))]
            mixture = mix_event(rng, sources[k % len(sources)].patches.reshape(-1), label,
                                background.patches.reshape(-1), background_labels, config)
            patches = frame_patches(mixture.audio)
            events = [ClipEvent(name, onset_s, offset_s) for name, onset_s, offset_s in mixture.events]
            out.append(FramedClip(patches, frame_labels(events, len(patches), labels)))
    return out
