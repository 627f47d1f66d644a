"""The built-in corpus: deterministic bytes, sound labels, events that sound like their class."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from shared_models.constants import EVENT_LABELS, SAMPLE_RATE_HZ
from shared_models.synth import (
    BACKGROUNDS,
    EVENT_GENERATORS,
    EXTRA_GENERATORS,
    T3_CYCLE_S,
    T4_CYCLE_S,
    generate_background,
    generate_event,
    random_scene,
    scripted_scene,
)
from shared_models.wavio import WavFormatError, read_wav, write_wav
from training.corpus import CorpusError, corpus_hash, load_corpus, synthesize_corpus

FIXTURES = Path(__file__).parent / "fixtures"


# --- helpers -----------------------------------------------------------------------
def dominant_hz(x: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / SAMPLE_RATE_HZ)[np.argmax(spectrum)])


def window_rms(x: np.ndarray, start_s: float, end_s: float) -> float:
    seg = x[int(start_s * SAMPLE_RATE_HZ) : int(end_s * SAMPLE_RATE_HZ)].astype(np.float64)
    return float(np.sqrt(np.mean(seg**2)))


def event(label: str, seed: int) -> np.ndarray:
    return generate_event(label, np.random.default_rng(seed)).astype(np.float64)


@pytest.fixture(scope="module")
def corpus_3min(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus3")
    synthesize_corpus(out, minutes=3.0, seed=0, progress=False)
    return out


# --- corpus -----------------------------------------------------------------------
def test_same_seed_gives_identical_corpus_bytes_and_another_seed_does_not(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    manifest_a = synthesize_corpus(a, minutes=0.5, seed=7, progress=False)
    manifest_b = synthesize_corpus(b, minutes=0.5, seed=7, progress=False)
    synthesize_corpus(c, minutes=0.5, seed=8, progress=False)
    assert (
        corpus_hash(a) == corpus_hash(b) == manifest_a["data_sha256"] == manifest_b["data_sha256"]
    )
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()
    assert corpus_hash(c) != corpus_hash(a)


def test_manifest_describes_the_corpus(corpus_3min):
    text = (corpus_3min / "manifest.json").read_text()
    manifest = json.loads(text)
    assert list(manifest) == sorted(manifest)  # sorted keys: stable bytes
    assert manifest["n_clips"] == 18 == len(list((corpus_3min / "clips").glob("clip_*.wav")))
    assert manifest["sample_rate_hz"] == SAMPLE_RATE_HZ
    assert manifest["labels"] == list(EVENT_LABELS)
    assert manifest["data_sha256"] == corpus_hash(corpus_3min)
    assert isinstance(manifest["espeak_ng"], bool)


def test_every_label_appears_and_labels_lie_within_their_clips(corpus_3min):
    clips = load_corpus(corpus_3min)
    assert len(clips) == 18
    seen = {e.label for clip in clips for e in clip.events}
    assert seen == set(EVENT_LABELS)
    assert 1 <= sum(not clip.events for clip in clips) <= 3  # ~10 % background-only
    for clip in clips:
        assert clip.duration_s == pytest.approx(10.0)
        audio, rate = read_wav(clip.wav_path)
        assert rate == SAMPLE_RATE_HZ and len(audio) == 10 * SAMPLE_RATE_HZ
        for e in clip.events:
            assert 0.0 <= e.onset_s < e.offset_s <= clip.duration_s + 1e-3


def test_rewriting_a_corpus_smaller_leaves_no_stale_clips(tmp_path):
    synthesize_corpus(tmp_path, minutes=0.5, seed=1, progress=False)
    synthesize_corpus(tmp_path, minutes=0.2, seed=1, progress=False)
    assert len(load_corpus(tmp_path)) == 1


def test_load_corpus_reads_a_hand_made_directory(tmp_path):
    (tmp_path / "clips").mkdir()
    for name in ("a.wav", "b.wav"):
        write_wav(tmp_path / "clips" / name, np.zeros(2 * SAMPLE_RATE_HZ), SAMPLE_RATE_HZ)
    (tmp_path / "labels.csv").write_text("clip,label,onset_s,offset_s\nb.wav,knock,0.5,0.9\n")
    (tmp_path / "manifest.json").write_text("{}")
    clips = load_corpus(tmp_path)
    assert [c.wav_path.name for c in clips] == ["a.wav", "b.wav"]
    assert clips[0].events == [] and clips[1].events[0].label == "knock"
    assert clips[1].duration_s == pytest.approx(2.0)


@pytest.mark.parametrize(
    "labels_text, manifest_text, expected",
    [
        (None, "{}", "labels.csv"),
        ("clip,label,onset_s,offset_s\nb.wav,kazoo,0.5,0.9\n", "{}", "labels.csv:2"),
        ("clip,label,onset_s,offset_s\nb.wav,knock,0.9,0.5\n", "{}", "labels.csv:2"),
        ("clip,label,onset_s,offset_s\nb.wav,knock,0.5,9.0\n", "{}", "labels.csv:2"),
        ("clip,label,onset_s,offset_s\nz.wav,knock,0.5,0.9\n", "{}", "labels.csv:2"),
        ("clip,label,start\n", "{}", "labels.csv:1"),
        ("clip,label,onset_s,offset_s\n", None, "manifest.json"),
        ("clip,label,onset_s,offset_s\n", "{not json", "manifest.json"),
    ],
)
def test_load_corpus_names_the_bad_file(tmp_path, labels_text, manifest_text, expected):
    (tmp_path / "clips").mkdir()
    write_wav(tmp_path / "clips" / "b.wav", np.zeros(SAMPLE_RATE_HZ), SAMPLE_RATE_HZ)
    if labels_text is not None:
        (tmp_path / "labels.csv").write_text(labels_text)
    if manifest_text is not None:
        (tmp_path / "manifest.json").write_text(manifest_text)
    with pytest.raises(CorpusError, match=expected):
        load_corpus(tmp_path)


# --- events ------------------------------------------------------------------------
def test_every_label_has_a_generator_and_unknown_labels_are_named():
    assert set(EVENT_GENERATORS) == set(EVENT_LABELS)
    with pytest.raises(KeyError, match=r"known labels: .*smoke_alarm"):
        generate_event("kazoo", np.random.default_rng(0))


@pytest.mark.parametrize(
    "label, min_s, max_s",
    [
        ("siren", 3.0, 5.0),
        ("smoke_alarm", 2.5, 6.5),
        ("doorbell", 1.5, 2.0),
        ("dog_bark", 0.15, 1.8),
        ("glass_break", 0.4, 1.0),
        ("knock", 0.2, 1.6),
        ("car_horn", 0.4, 1.5),
        ("baby_cry", 1.0, 3.0),
        ("speech", 0.5, 3.0),
    ],
)
def test_events_are_deterministic_peak_normalised_and_of_plausible_length(label, min_s, max_s):
    for seed in range(3):
        x = generate_event(label, np.random.default_rng(seed))
        again = generate_event(label, np.random.default_rng(seed))
        assert x.dtype == np.float32 and np.array_equal(x, again)
        assert np.all(np.isfinite(x)) and np.max(np.abs(x)) == pytest.approx(0.9, abs=1e-3)
        assert min_s - 0.01 <= len(x) / SAMPLE_RATE_HZ <= max_s + 0.01
    fixed = generate_event(label, np.random.default_rng(0), duration_s=1.25)
    assert len(fixed) == int(1.25 * SAMPLE_RATE_HZ)


def test_smoke_alarm_beeps_near_3_1_khz_in_the_t3_pattern():
    for seed in range(4):
        x = event("smoke_alarm", seed)
        assert 2900 <= dominant_hz(x) <= 3400
        cycles = round((len(x) / SAMPLE_RATE_HZ + 1.5) / T3_CYCLE_S)
        assert cycles in (1, 2)
        for c in range(cycles):
            t0 = c * T3_CYCLE_S
            beeps = [window_rms(x, t0 + s + 0.05, t0 + s + 0.45) for s in (0.0, 1.0, 2.0)]
            gaps = [window_rms(x, t0 + s + 0.05, t0 + s + 0.45) for s in (0.5, 1.5)]
            assert min(beeps) > 100 * max(gaps)  # > 40 dB between on and off
            if c + 1 < cycles:  # the 1.5 s pause before the next cycle
                assert window_rms(x, t0 + 2.55, t0 + 3.95) < min(beeps) / 100


def test_co_alarm_beeps_in_the_t4_pattern_and_is_no_built_in_label():
    assert "co_alarm" in EXTRA_GENERATORS and "co_alarm" not in EVENT_LABELS
    for seed in range(4):
        x = event("co_alarm", seed)
        assert 2900 <= dominant_hz(x) <= 3500
        bursts = round((len(x) / SAMPLE_RATE_HZ + 5.0) / T4_CYCLE_S)
        assert bursts in (1, 2)
        for b in range(bursts):
            t0 = b * T4_CYCLE_S
            beeps = [window_rms(x, t0 + s + 0.02, t0 + s + 0.08) for s in (0.0, 0.2, 0.4, 0.6)]
            gaps = [window_rms(x, t0 + s + 0.02, t0 + s + 0.08) for s in (0.1, 0.3, 0.5)]
            assert min(beeps) > 100 * max(gaps)
            if b + 1 < bursts:  # the 5 s pause before the next burst
                assert window_rms(x, t0 + 0.75, t0 + 5.65) < min(beeps) / 100


def test_kettle_whistles_between_1_8_and_3_khz_and_rises_then_holds():
    assert "kettle" in EXTRA_GENERATORS and "kettle" not in EVENT_LABELS
    frame = int(0.1 * SAMPLE_RATE_HZ)
    for seed in range(4):
        x = event("kettle", seed)
        assert 3.0 - 0.01 <= len(x) / SAMPLE_RATE_HZ <= 6.0 + 0.01
        pitches = [dominant_hz(x[i : i + frame]) for i in range(frame, len(x) - frame, frame)]
        assert all(1700 <= p <= 3000 for p in pitches), (seed, min(pitches), max(pitches))
        assert np.median(pitches[-5:]) > 1.05 * pitches[0]  # the steam builds


def test_siren_fundamental_sweeps_within_500_to_1800_hz():
    frame = int(0.05 * SAMPLE_RATE_HZ)
    for seed in range(6):
        x = event("siren", seed)
        pitches = [dominant_hz(x[i : i + frame]) for i in range(0, len(x) - frame, frame)]
        assert all(500 <= p <= 1800 for p in pitches), (seed, min(pitches), max(pitches))
        assert max(pitches) - min(pitches) > 150  # it sweeps or alternates, never a steady tone


def test_doorbell_rings_two_distinct_pitches_a_third_apart():
    for seed in range(4):
        x = event("doorbell", seed)
        ding = dominant_hz(x[int(0.02 * SAMPLE_RATE_HZ) : int(0.4 * SAMPLE_RATE_HZ)])
        dong = dominant_hz(x[int(0.6 * len(x)) :])
        assert 1.15 <= ding / dong <= 1.4  # a major third is 1.26


def test_glass_break_energy_is_mostly_above_2_5_khz():
    for seed in range(4):
        x = event("glass_break", seed)
        power = np.abs(np.fft.rfft(x)) ** 2
        freqs = np.fft.rfftfreq(len(x), 1 / SAMPLE_RATE_HZ)
        assert power[freqs > 2500].sum() > 0.6 * power.sum()


@pytest.mark.parametrize(
    "label, low_hz, high_hz",
    [("car_horn", 380, 520), ("knock", 90, 320), ("baby_cry", 300, 700), ("dog_bark", 250, 900)],
)
def test_pitched_events_sit_in_their_pitch_range(label, low_hz, high_hz):
    for seed in range(4):
        assert low_hz <= dominant_hz(event(label, seed)) <= high_hz


FAKE_ESPEAK = """#!{python}
import struct, sys
import numpy as np
rate = 22050
tone = np.sin(2 * np.pi * 440 * np.arange(rate) / rate)  # 1 s at 440 Hz
data = (np.concatenate([np.zeros(2000), tone, np.zeros(2000)]) * 20000).astype("<i2").tobytes()
fmt = struct.pack("<HHIIHH", 1, 1, rate, 2 * rate, 2, 16)
# like espeak-ng --stdout: the sizes are unknown when streaming, so they are set to the maximum
sys.stdout.buffer.write(b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE" + b"fmt "
                        + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", 0xFFFFFFFF) + data)
"""


def test_speech_uses_espeak_ng_when_it_is_on_path(tmp_path, monkeypatch):
    import sys

    fake = tmp_path / "espeak-ng"
    fake.write_text(FAKE_ESPEAK.format(python=sys.executable))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("SOUNDFLEET_NO_ESPEAK", raising=False)
    x = event("speech", 0)
    assert len(x) == pytest.approx(SAMPLE_RATE_HZ, abs=20)  # resampled to 16 kHz, silence trimmed
    assert dominant_hz(x) == pytest.approx(440, abs=5)
    monkeypatch.setenv("SOUNDFLEET_NO_ESPEAK", "1")
    assert dominant_hz(event("speech", 0)) != pytest.approx(440, abs=5)


# --- backgrounds and scenes ---------------------------------------------------------
@pytest.mark.parametrize("kind", BACKGROUNDS)
def test_backgrounds_are_rms_normalised(kind):
    x = generate_background(kind, 2 * SAMPLE_RATE_HZ, np.random.default_rng(0))
    assert x.dtype == np.float32 and len(x) == 2 * SAMPLE_RATE_HZ
    assert np.sqrt(np.mean(x.astype(np.float64) ** 2)) == pytest.approx(1.0, rel=1e-3)


def test_unknown_background_is_named():
    with pytest.raises(KeyError, match="known backgrounds: pink"):
        generate_background("traffic", 100, np.random.default_rng(0))


def test_random_scenes_are_deterministic_and_stay_in_range():
    for seed in range(4):
        scene = random_scene(np.random.default_rng(seed), duration_s=5.0)
        again = random_scene(np.random.default_rng(seed), duration_s=5.0)
        assert np.array_equal(scene.audio, again.audio) and scene.events == again.events
        assert scene.audio.dtype == np.float32 and len(scene.audio) == 5 * SAMPLE_RATE_HZ
        assert np.max(np.abs(scene.audio)) <= 1.0
        assert len(scene.events) <= 3
        for e in scene.events:
            assert e.label in EVENT_LABELS and 0 <= e.onset_s < e.offset_s <= 5.0


def test_scripted_scene_puts_events_at_the_requested_onsets():
    script = [("knock", 1.0), ("smoke_alarm", 3.0), ("glass_break", 6.5)]
    scene = scripted_scene(script, duration_s=8.0, seed=5, background="brown")
    assert [(e.label, e.onset_s) for e in scene.events] == script
    for label, onset_s in script:
        before = window_rms(scene.audio, onset_s - 0.3, onset_s - 0.02)
        after = window_rms(scene.audio, onset_s, onset_s + 0.2)
        assert after > 2.5 * before, label  # SNR 12 dB: the level jumps at the onset
    assert scene.events[-1].offset_s <= 8.0
    with pytest.raises(ValueError, match="outside"):
        scripted_scene([("knock", 9.0)], duration_s=8.0, seed=0)


# --- WAV I/O ------------------------------------------------------------------------
def test_wav_round_trip_is_within_one_16_bit_step(tmp_path):
    x = np.random.default_rng(0).uniform(-1, 1, 5000)
    x[:4] = [-1.0, 1.0, 0.0, 1.5]  # full scale both ways, and a value to clip
    write_wav(tmp_path / "x.wav", x, 22050)
    y, rate = read_wav(tmp_path / "x.wav")
    assert rate == 22050 and y.dtype == np.float32 and len(y) == len(x)
    assert np.max(np.abs(y - np.clip(x, -1, 1))) <= 1 / 32767


def _wav_bytes(samples: np.ndarray, channels: int, bits: int, rate: int = 8000) -> bytes:
    data = samples.tobytes()
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * block, block, bits)
    return (
        b"RIFF"
        + struct.pack("<I", 36 + len(data))
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data"
        + struct.pack("<I", len(data))
        + data
    )


@pytest.mark.parametrize(
    "samples, channels, bits, expected",
    [
        (np.array([[16384, -16384], [32767, 32767]], dtype="<i2"), 2, 16, [0.0, 1.0]),
        (np.array([128, 255, 1], dtype=np.uint8), 1, 8, [0.0, 1.0, -1.0]),
        (np.array([0, 2**31 - 1, -(2**30)], dtype="<i4"), 1, 32, [0.0, 1.0, -0.5]),
    ],
)
def test_read_wav_decodes_8_16_32_bit_and_mixes_channels(
    tmp_path, samples, channels, bits, expected
):
    path = tmp_path / "in.wav"
    path.write_bytes(_wav_bytes(samples, channels, bits))
    audio, rate = read_wav(path)
    assert rate == 8000
    np.testing.assert_allclose(audio, expected, atol=1e-4)


def test_read_wav_rejects_a_text_file_naming_it(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio\n")
    with pytest.raises(WavFormatError, match=r"notes\.wav"):
        read_wav(path)
    assert issubclass(WavFormatError, ValueError)


@pytest.mark.parametrize(
    "name, seconds",
    [("siren_street.wav", 8.0), ("smoke_alarm_kitchen.wav", 8.0), ("quiet_room.wav", 4.0)],
)
def test_fixture_wavs_are_16khz_mono_of_the_documented_length(name, seconds):
    audio, rate = read_wav(FIXTURES / name)
    assert rate == SAMPLE_RATE_HZ and len(audio) == int(seconds * SAMPLE_RATE_HZ)
    assert 0.0 < np.max(np.abs(audio)) <= 1.0
