"""Augmentation of real event recordings (training.augment) and the false-alarm calibration
of the per-label thresholds (training.eval_events.calibrate_event_thresholds)."""

from __future__ import annotations

import numpy as np
import pytest

from cloud.classify import clip_windows
from cloud.events import EventPolicy
from shared_models.constants import PATCH_SAMPLES, SAMPLE_RATE_HZ
from training.augment import (
    AugmentConfig,
    active_region,
    augment_clips,
    band_limit,
    mix_event,
    simulated_rir,
)
from training.dataset import FramedClip, frame_labels, frame_patches
from training.eval_events import ScoredClip, calibrate_event_thresholds
from training.sources import ClipEvent

DRY = AugmentConfig(rir_probability=0, bandlimit_probability=0, mic_eq_probability=0, pitch_probability=0,
                    gain_db=(0.0, 0.0))


def tone(seconds: float, hz: float = 1000.0) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE_HZ)) / SAMPLE_RATE_HZ
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def padded(burst: np.ndarray, before_s: float, after_s: float) -> np.ndarray:
    return np.concatenate([np.zeros(int(before_s * SAMPLE_RATE_HZ), np.float32), burst,
                           np.zeros(int(after_s * SAMPLE_RATE_HZ), np.float32)])


def test_active_region_is_the_loud_part_of_a_recording():
    audio = padded(tone(0.4), 0.5, 1.0)
    start, end = active_region(audio)
    assert abs(start - 0.5 * SAMPLE_RATE_HZ) <= PATCH_SAMPLES
    assert abs(end - 0.9 * SAMPLE_RATE_HZ) <= PATCH_SAMPLES
    assert active_region(np.zeros(8000, np.float32)) == (0, 8000)


@pytest.mark.parametrize("snr_db", [-5.0, 5.0, 20.0])
def test_the_event_sits_at_the_requested_snr_over_its_labelled_span(snr_db):
    rng = np.random.default_rng(1)
    noise = (0.05 * rng.standard_normal(10 * SAMPLE_RATE_HZ)).astype(np.float32)
    config = AugmentConfig(**{**DRY.__dict__, "snr_db": (snr_db, snr_db)})
    m = mix_event(np.random.default_rng(2), padded(tone(0.8), 0.3, 0.3), "siren", noise, (), config)
    (label, onset_s, offset_s), = m.events
    assert label == "siren" and 0 <= onset_s < offset_s <= 4.0
    inside = m.audio[int(onset_s * SAMPLE_RATE_HZ) : int(offset_s * SAMPLE_RATE_HZ) - 1600]  # 0.1 s label tail off
    outside = np.concatenate([m.audio[: int(onset_s * SAMPLE_RATE_HZ)], m.audio[int(offset_s * SAMPLE_RATE_HZ) :]])
    p_in, p_out = np.mean(inside.astype(np.float64) ** 2), np.mean(outside.astype(np.float64) ** 2)
    assert 10 * np.log10((p_in - p_out) / p_out) == pytest.approx(snr_db, abs=1.0)
    assert np.max(np.abs(m.audio)) == pytest.approx(1.0, abs=1e-4)  # gain 0 dB: peak at full scale


def test_band_limiting_leaves_nothing_above_the_capture_nyquist():
    noise = np.random.default_rng(0).standard_normal(SAMPLE_RATE_HZ)
    spectrum = np.abs(np.fft.rfft(band_limit(noise, 8_000)))
    freqs = np.fft.rfftfreq(SAMPLE_RATE_HZ, 1 / SAMPLE_RATE_HZ)
    above, below = spectrum[freqs > 4_000], spectrum[(freqs > 300) & (freqs < 3_500)]
    assert 20 * np.log10(above.mean() / below.mean()) < -40


def test_the_simulated_room_decays_by_60_db_in_rt60_and_keeps_the_direct_to_reverb_ratio():
    rir = simulated_rir(np.random.default_rng(0), rt60_s=0.5, direct_to_reverb_db=6.0)
    assert rir[0] == 1.0 and len(rir) == SAMPLE_RATE_HZ // 2
    assert 10 * np.log10(1.0 / np.sum(rir[1:] ** 2)) == pytest.approx(6.0, abs=0.5)
    early = np.mean(rir[800:1600] ** 2)  # 50..100 ms
    late = np.mean(rir[-1600:-800] ** 2)  # 400..450 ms, 350 ms later: -42 dB at this decay rate
    assert 10 * np.log10(late / early) == pytest.approx(-60 * 0.35 / 0.5, abs=4.0)


def _weak(audio: np.ndarray, labels: tuple[str, ...], carried: list[str]) -> FramedClip:
    patches = frame_patches(audio)
    duration_s = len(patches) * PATCH_SAMPLES / SAMPLE_RATE_HZ
    return FramedClip(patches, frame_labels([ClipEvent(x, 0.0, duration_s) for x in carried], len(patches), labels),
                      weak=True)


def test_augment_clips_mixes_every_event_label_into_negatives_deterministically():
    labels = ("dog_bark", "siren", "speech")
    rng = np.random.default_rng(0)
    clips = [
        _weak(padded(tone(0.4, 600), 0.1, 0.1), labels, ["dog_bark"]),
        _weak(tone(2.0, 900), labels, ["siren"]),
        _weak((0.05 * rng.standard_normal(5 * SAMPLE_RATE_HZ)).astype(np.float32), labels, []),
        _weak((0.05 * rng.standard_normal(5 * SAMPLE_RATE_HZ)).astype(np.float32), labels, ["speech"]),
    ]
    a = augment_clips(clips, labels, per_label=6, seed=7)
    b = augment_clips(clips, labels, per_label=6, seed=7)
    assert len(a) == 12  # 6 per event label; speech is a background here, not an event to mix
    assert all(np.array_equal(x.patches, y.patches) for x, y in zip(a, b, strict=True))
    for k, clip in enumerate(a):
        own = labels.index("dog_bark" if k < 6 else "siren")
        active = clip.labels[:, own] > 0
        assert 0 < active.sum() < len(active)  # strong: the event's span, not the whole clip
        speech = clip.labels[:, labels.index("speech")]
        assert speech.all() or not speech.any()  # a speech background carries speech throughout
        assert not clip.weak
    assert any(c.labels[:, 2].all() for c in a) and any(not c.labels[:, 2].any() for c in a)
    assert augment_clips(clips[:2], labels, per_label=6, seed=7) == []  # no negatives: nothing to mix into


def _scored(peaks: list[float], carried: set[str], seconds: int = 60) -> ScoredClip:
    """A clip whose one label scores 0.1 except a 2 s bump to ``peaks[k]`` every 20 s."""
    probs = np.full((seconds, 1), 0.1, np.float32)
    for k, peak in enumerate(peaks):
        probs[20 * k + 5 : 20 * k + 7, 0] = peak
    windows = clip_windows(np.zeros(seconds * 40, np.int64), 40, 160)
    return ScoredClip(windows, probs, frozenset(carried), float(seconds))


def test_thresholds_sit_just_above_the_loudest_false_event_when_the_budget_allows_none():
    scored = [_scored([0.62, 0.4], set()), _scored([0.55], {"speech"}),
              _scored([0.9], {"siren"}), _scored([0.7], {"siren"})]
    thresholds, minimums, report = calibrate_event_thresholds(scored, ("siren",), {"siren": EventPolicy()}, 40, 1.0)
    assert report["false_events_allowed_per_label"] == 0  # 2 minutes of pool cannot hold 1 per 24 h
    assert thresholds == {"siren": 0.63} and minimums == {"siren": 1}
    assert report["labels"]["siren"]["recall"] == 1.0 and report["labels"]["siren"]["pool_false_events"] == 0


def test_a_long_pool_spends_its_budget_and_an_unreachable_one_takes_the_top_threshold():
    quiet = [_scored([0.2], set(), seconds=3600) for _ in range(47)]  # 47 h of nothing
    loud_once = _scored([0.8], set(), seconds=3600)  # one false event in 48 h
    _, _, strict = calibrate_event_thresholds([*quiet, loud_once], ("siren",), {"siren": EventPolicy()}, 40, 0.0)
    spent, _, lenient = calibrate_event_thresholds([*quiet, loud_once], ("siren",), {"siren": EventPolicy()}, 40, 0.5)
    assert strict["labels"]["siren"]["on_threshold"] == 0.81
    assert lenient["false_events_allowed_per_label"] == 1 and spent == {"siren": 0.3}
    always = [_scored([0.9995], set())]
    top, _, _ = calibrate_event_thresholds(always, ("siren",), {"siren": EventPolicy()}, 40, 1.0)
    assert top == {"siren": 0.999}
    _, _, above_099 = calibrate_event_thresholds([_scored([0.993], set())], ("siren",), {"siren": EventPolicy()}, 40, 1.0)
    assert above_099["labels"]["siren"]["on_threshold"] == 0.995  # the grid goes past 0.99


def _sustained(level: float, start: int, length: int, carried: set[str], seconds: int = 30) -> ScoredClip:
    """A clip whose one label scores ``level`` for ``length`` windows from ``start``, 0.1 elsewhere."""
    probs = np.full((seconds, 1), 0.1, np.float32)
    probs[start : start + length, 0] = level
    return ScoredClip(clip_windows(np.zeros(seconds * 40, np.int64), 40, 160), probs, frozenset(carried), float(seconds))


def test_a_long_sound_buys_a_lower_threshold_with_more_windows_and_a_short_one_keeps_one():
    """Negatives whose label jumps to 0.905 for 2 windows at a time: with 1 window the threshold
    must clear it (0.91) and the 4 s siren at 0.6 is missed; 3 windows never start on a 2-window blip,
    so the threshold falls to the grid's floor and the siren is found. A bark is 1 window at
    0.95: more windows would miss it, so it keeps 1."""
    negatives = [_scored([0.905, 0.905], set()) for _ in range(3)]
    sirens = [_sustained(0.6, 5, 4, {"siren"}) for _ in range(2)]
    thresholds, minimums, report = calibrate_event_thresholds(
        [*negatives, *sirens], ("siren",), {"siren": EventPolicy()}, 40, 1.0, min_windows=(1, 2, 3))
    assert minimums == {"siren": 3} and thresholds == {"siren": 0.3}
    tried = {o["min_windows"]: o for o in report["labels"]["siren"]["tried"]}
    assert tried[1]["on_threshold"] == 0.91 and tried[1]["recall"] == 0.0
    assert tried[2]["on_threshold"] == 0.91 and tried[3]["recall"] == 1.0
    barks = [_sustained(0.95, 5, 1, {"siren"}) for _ in range(2)]
    thresholds, minimums, _ = calibrate_event_thresholds(
        [*negatives, *barks], ("siren",), {"siren": EventPolicy()}, 40, 1.0, min_windows=(1, 2, 3))
    assert minimums == {"siren": 1} and thresholds == {"siren": 0.91}
