"""Audio sources on both sides.

Training: dataset layouts beyond the built-in corpus, and the fleet archive
(training/sources.py). Edge: files, stdin, microphones and the source registry
(edge/sources.py), at the end of this file.
"""

from __future__ import annotations

import csv
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from shared_models.constants import EVENT_LABELS, NS_PER_SECOND
from shared_models.wavio import write_wav
from training.fleet_archive import (
    FleetRow,
    FleetSequence,
    fleet_partitioning,
    read_fleet_archive,
    write_fleet_shard,
)
from training.sources import LAYOUTS, Clip, ClipEvent, DatasetError, load_dataset


def tone(path: Path, seconds: float = 0.5, rate_hz: int = 16_000, freq_hz: float = 440.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate_hz)) / rate_hz
    write_wav(path, 0.3 * np.sin(2 * np.pi * freq_hz * t), rate_hz)
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


ESC50_HEADER = ["filename", "fold", "target", "category", "esc10", "src_file", "take"]


def make_esc50(root: Path) -> Path:
    rows = [
        ["1-100-A-0.wav", 1, 0, "dog", "True", "100", "A"],
        ["1-200-A-1.wav", 1, 1, "rooster", "False", "200", "A"],
        ["2-300-A-0.wav", 2, 0, "dog", "True", "300", "A"],
        ["3-400-A-2.wav", 3, 2, "rain", "False", "400", "A"],
    ]
    for row in rows:
        tone(root / "audio" / row[0], seconds=0.75, rate_hz=44_100)
    write_csv(root / "meta" / "esc50.csv", ESC50_HEADER, rows)
    return root


def make_fsd50k(root: Path) -> Path:
    truth = root / "FSD50K.ground_truth"
    write_csv(
        truth / "dev.csv",
        ["fname", "labels", "mids", "split"],
        [
            [64760, "Electric_guitar,Guitar,Music", "/m/02sgy,/m/0342h,/m/04rlf", "train"],
            [16399, "Bark,Dog,Animal", "/m/05tny_,/m/0bt9lr,/m/0jbk", "val"],
        ],
    )
    write_csv(truth / "eval.csv", ["fname", "labels", "mids"], [[37199, "Siren", "/m/03kmc9"]])
    tone(root / "FSD50K.dev_audio" / "64760.wav", seconds=1.0, rate_hz=44_100)
    tone(root / "FSD50K.dev_audio" / "16399.wav", seconds=0.5, rate_hz=44_100)
    tone(root / "FSD50K.eval_audio" / "37199.wav", seconds=0.6, rate_hz=22_050)
    return root


def make_builtin(root: Path) -> Path:
    tone(root / "clips" / "clip_00000.wav", seconds=1.0)
    tone(root / "clips" / "clip_00001.wav", seconds=0.5)
    write_csv(root / "labels.csv", ["clip", "label", "onset_s", "offset_s"],
              [["clip_00000.wav", "siren", "0.100", "0.600"]])  # fmt: skip
    (root / "manifest.json").write_text(json.dumps({"labels": list(EVENT_LABELS)}))
    return root


def test_builtin_corpus_loads_with_strong_labels_in_manifest_order(tmp_path):
    ds = load_dataset(make_builtin(tmp_path / "corpus"))
    assert ds.labels == EVENT_LABELS
    assert [c.wav_path.name for c in ds.clips] == ["clip_00000.wav", "clip_00001.wav"]
    assert ds.clips[0].events == [ClipEvent("siren", 0.1, 0.6)]
    assert ds.clips[1].events == []
    assert [c.duration_s for c in ds.clips] == pytest.approx([1.0, 0.5])
    assert all(isinstance(c, Clip) for c in ds.clips)


def test_labelled_folders_give_weak_whole_clip_labels(tmp_path):
    root = tmp_path / "folders"
    tone(root / "cat" / "a.wav", seconds=0.5, rate_hz=8_000)
    tone(root / "cat" / "b.WAV", seconds=0.8, rate_hz=8_000)
    tone(root / "alarm" / "c.wav", seconds=1.0, rate_hz=48_000)
    (root / "empty").mkdir()
    ds = load_dataset(root)
    assert ds.labels == ("alarm", "cat")
    assert ds.name == "folders"
    by_name = {c.wav_path.name: c for c in ds.clips}
    assert {n: c.duration_s for n, c in by_name.items()} == pytest.approx(
        {"a.wav": 0.5, "b.WAV": 0.8, "c.wav": 1.0}
    )
    for name, label in [("a.wav", "cat"), ("b.WAV", "cat"), ("c.wav", "alarm")]:
        assert by_name[name].events == [ClipEvent(label, 0.0, by_name[name].duration_s)]


def test_esc50_layout_labels_durations_and_fold_selection(tmp_path):
    root = make_esc50(tmp_path / "ESC-50-master")
    ds = load_dataset(root)
    assert ds.labels == ("dog", "rain", "rooster")
    assert len(ds.clips) == 4
    assert all(c.duration_s == pytest.approx(0.75) for c in ds.clips)
    assert {c.wav_path.name: c.events[0].label for c in ds.clips}["1-200-A-1.wav"] == "rooster"

    part = load_dataset(root, folds=[1, 3])
    assert [c.wav_path.name for c in part.clips] == [
        "1-100-A-0.wav",
        "1-200-A-1.wav",
        "3-400-A-2.wav",
    ]
    assert part.labels == ds.labels  # the label set is the whole dataset's
    assert part.data_sha256 != ds.data_sha256
    with pytest.raises(DatasetError, match=r"no fold\(s\) \[7\]"):
        load_dataset(root, folds=[7])


def test_fsd50k_parses_quoted_comma_separated_multi_labels(tmp_path):
    root = make_fsd50k(tmp_path / "FSD50K")
    assert '"Electric_guitar,Guitar,Music"' in (root / "FSD50K.ground_truth/dev.csv").read_text()
    ds = load_dataset(root)
    assert ds.labels == ("Animal", "Bark", "Dog", "Electric_guitar", "Guitar", "Music", "Siren")
    by_name = {c.wav_path.name: c for c in ds.clips}
    guitar = by_name["64760.wav"]
    assert [e.label for e in guitar.events] == ["Electric_guitar", "Guitar", "Music"]
    assert all(e.onset_s == 0.0 and e.offset_s == guitar.duration_s for e in guitar.events)
    assert guitar.duration_s == pytest.approx(1.0)
    assert by_name["37199.wav"].duration_s == pytest.approx(0.6)
    assert by_name["37199.wav"].wav_path.parent.name == "FSD50K.eval_audio"

    evaluation = load_dataset(root, splits=["eval"])
    assert [c.wav_path.name for c in evaluation.clips] == ["37199.wav"]
    train = load_dataset(root, splits=["train"])
    assert [c.wav_path.name for c in train.clips] == ["64760.wav"]


def test_fsd50k_dev_only_is_detected(tmp_path):
    root = make_fsd50k(tmp_path / "FSD50K")
    (root / "FSD50K.ground_truth" / "eval.csv").unlink()
    ds = load_dataset(root)
    assert len(ds.clips) == 2 and "Siren" not in ds.labels


def test_missing_audio_error_names_the_csv_line(tmp_path):
    root = make_esc50(tmp_path / "esc")
    (root / "audio" / "2-300-A-0.wav").unlink()
    with pytest.raises(DatasetError, match=r"esc50\.csv:4: audio file not found: .*2-300-A-0\.wav"):
        load_dataset(root)
    assert len(load_dataset(root, folds=[1, 3]).clips) == 3  # other folds still load

    fsd = make_fsd50k(tmp_path / "fsd")
    (fsd / "FSD50K.eval_audio" / "37199.wav").unlink()
    with pytest.raises(DatasetError, match=r"eval\.csv:2: audio file not found"):
        load_dataset(fsd)


def test_unknown_layout_error_lists_the_known_layouts(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(DatasetError) as info:
        load_dataset(tmp_path)
    for name in LAYOUTS:
        assert name in str(info.value)
    assert "meta/esc50.csv" in str(info.value)
    with pytest.raises(DatasetError, match="unknown dataset layout 'audioset'"):
        load_dataset(tmp_path, layout="audioset")


def test_forced_layout_overrides_detection(tmp_path):
    root = make_esc50(tmp_path / "esc")
    ds = load_dataset(root, layout="folders")  # audio/ is then just a folder of clips
    assert ds.labels == ("audio",) and len(ds.clips) == 4


def test_data_sha256_changes_with_one_audio_byte(tmp_path):
    root = make_esc50(tmp_path / "esc")
    before = load_dataset(root).data_sha256
    assert load_dataset(root).data_sha256 == before
    wav = root / "audio" / "3-400-A-2.wav"
    data = bytearray(wav.read_bytes())
    data[-1] ^= 1
    wav.write_bytes(bytes(data))
    assert load_dataset(root).data_sha256 != before


# --- fleet archive -------------------------------------------------------------------

T0_NS = 1_750_000_000 * NS_PER_SECOND  # 2025-06-15 UTC


def row(device: str, seq: int, codes, codebook_id: int = 7, site: str = "home") -> FleetRow:
    return FleetRow(site, device, seq, T0_NS + seq * NS_PER_SECOND, np.array(codes), codebook_id)


def test_fleet_archive_round_trip_splits_on_seq_gaps_and_filters_codebooks(tmp_path):
    rows = [
        row("kitchen", 10, [1, 2]),
        row("kitchen", 11, [3, 65535]),
        row("kitchen", 13, [4]),  # seq 12 missing: a new sequence
        row("hall", 0, [9, 9, 9]),
        row("hall", 0, [9, 9, 9]),  # a redelivery, kept once
        row("kitchen", 5, [100], codebook_id=8),
        row("garage", 1, [5], site="other site/ä"),
    ]
    written = write_fleet_shard(tmp_path, rows[:4])
    written += write_fleet_shard(tmp_path, [dict(r.__dict__) for r in rows[4:]])
    first = tmp_path / "codebook_id=7" / "site=home" / "date=2025-06-15"
    assert first / "part-0.parquet" in written and first / "part-1.parquet" in written

    import pyarrow.parquet as pq

    table = pq.ParquetFile(first / "part-0.parquet").read()
    assert table.schema.field("seq").type == "uint32"
    assert table.schema.field("codes").type == "binary"
    assert (
        pq.ParquetFile(first / "part-0.parquet").metadata.row_group(0).column(0).compression
        == "ZSTD"
    )

    seqs = list(read_fleet_archive(tmp_path, codebook_id=7))
    assert [(s.site, s.device, s.seq_first) for s in seqs] == [
        ("home", "hall", 0),
        ("home", "kitchen", 10),
        ("home", "kitchen", 13),
        ("other site/ä", "garage", 1),
    ]
    kitchen = seqs[1]
    assert isinstance(kitchen, FleetSequence) and kitchen.codes.dtype == np.uint16
    assert kitchen.codes.tolist() == [1, 2, 3, 65535]
    assert kitchen.t_start_ns == T0_NS + 10 * NS_PER_SECOND and kitchen.codebook_id == 7
    assert seqs[0].codes.tolist() == [9, 9, 9]
    site, device, seq_first, t_start_ns, codes, codebook_id = seqs[2]
    assert (device, seq_first, codes.tolist()) == ("kitchen", 13, [4])

    other = list(read_fleet_archive(tmp_path, codebook_id=8))
    assert [(s.device, s.codes.tolist(), s.codebook_id) for s in other] == [("kitchen", [100], 8)]
    assert len(list(read_fleet_archive(tmp_path))) == 5
    assert list(read_fleet_archive(tmp_path, codebook_id=99)) == []


def test_fleet_archive_reads_as_a_hive_partitioned_pyarrow_dataset(tmp_path):
    import pyarrow.dataset as pads

    write_fleet_shard(
        tmp_path, [row("a", 0, [1]), row("b", 0, [2], site="x y"), row("a", 1, [3], 8)]
    )
    table = pads.dataset(tmp_path, format="parquet", partitioning=fleet_partitioning()).to_table(
        filter=pads.field("codebook_id") == 7
    )
    assert sorted(zip(table["site"].to_pylist(), table["date"].to_pylist(), strict=True)) == [
        ("home", "2025-06-15"),
        ("x y", "2025-06-15"),
    ]


def test_fleet_rows_out_of_range_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="uint16"):
        write_fleet_shard(tmp_path, [row("d", 0, [70000])])


def test_synthesized_corpus_loads_with_the_manifest_hash(tmp_path):
    from training.corpus import synthesize_corpus

    manifest = synthesize_corpus(tmp_path, minutes=0.05, clip_seconds=1.0, progress=False)
    ds = load_dataset(tmp_path)
    assert ds.data_sha256 == manifest["data_sha256"]
    assert len(ds.clips) == 3 and all(c.duration_s == pytest.approx(1.0) for c in ds.clips)
    assert {e.label for c in ds.clips for e in c.events} <= set(ds.labels)


# --- edge audio sources (edge/sources.py) ----------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
BLOCK_SAMPLES = 4_000  # 0.25 s at 16 kHz


def write_tone_file(
    path: Path,
    rate_hz: int,
    amplitudes: list[float],
    seconds: float,
    freq_hz: float = 1000.0,
    subtype: str = "PCM_16",
) -> int:
    """A tone with one amplitude per channel, written by libsndfile; returns the frame count."""
    import soundfile

    t = np.arange(round(seconds * rate_hz)) / rate_hz
    audio = np.stack([a * np.sin(2 * np.pi * freq_hz * t) for a in amplitudes], axis=1)  # (n, ch)
    soundfile.write(path, audio, rate_hz, subtype=subtype)
    return len(t)


def spectral_peak_hz(audio: np.ndarray, rate_hz: int = 16_000) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.fft.rfftfreq(len(audio), 1 / rate_hz)[spectrum.argmax()])


def check_blocks(blocks: list[np.ndarray], n_expected: int, freq_hz: float, amplitude: float):
    """Block shapes, total length (+-1 sample), the tone's frequency and amplitude (2 %)."""
    assert all(b.dtype == np.float32 and b.ndim == 1 for b in blocks)
    assert all(len(b) == BLOCK_SAMPLES for b in blocks[:-1])
    assert 0 < len(blocks[-1]) <= BLOCK_SAMPLES
    audio = np.concatenate(blocks)
    assert abs(len(audio) - n_expected) <= 1
    steady = audio[800:-800]  # away from the filter's zero-padded ends
    assert spectral_peak_hz(steady) == pytest.approx(freq_hz, abs=16_000 / len(steady))
    amplitude_measured = np.sqrt(2 * np.mean(steady.astype(np.float64) ** 2))
    assert amplitude_measured == pytest.approx(amplitude, rel=0.02)


def test_stereo_44k1_wav_reads_as_16khz_mono_blocks(tmp_path):
    from edge.sources import file_source

    path = tmp_path / "stereo.wav"
    n_in = write_tone_file(path, 44_100, [0.5, 0.1], seconds=2.3)  # the mix has amplitude 0.3
    blocks = list(file_source(str(path), BLOCK_SAMPLES))
    check_blocks(blocks, round(n_in * 16_000 / 44_100), 1000.0, 0.3)


def test_24bit_flac_at_48khz_reads_as_16khz_mono_blocks(tmp_path):
    from edge.sources import open_source

    path = tmp_path / "tone.flac"
    n_in = write_tone_file(path, 48_000, [0.4], seconds=2.5, freq_hz=440.0, subtype="PCM_24")
    blocks = list(open_source(str(path), BLOCK_SAMPLES))
    check_blocks(blocks, n_in // 3, 440.0, 0.4)


def test_16bit_wav_without_soundfile_reads_the_same_through_the_stdlib(tmp_path, monkeypatch):
    from edge.sources import SourceError, file_source

    path = tmp_path / "stereo.wav"
    write_tone_file(path, 44_100, [0.5, 0.1], seconds=1.0)
    with_soundfile = np.concatenate(list(file_source(str(path), BLOCK_SAMPLES)))
    monkeypatch.setitem(sys.modules, "soundfile", None)  # `import soundfile` now raises ImportError
    with_wave = np.concatenate(list(file_source(str(path), BLOCK_SAMPLES)))
    assert np.array_equal(with_wave, with_soundfile)

    deep = tmp_path / "deep.wav"
    monkeypatch.delitem(sys.modules, "soundfile")
    write_tone_file(deep, 16_000, [0.5], seconds=0.1, subtype="PCM_24")
    monkeypatch.setitem(sys.modules, "soundfile", None)
    with pytest.raises(SourceError, match=rf"{re.escape(str(deep))}.*24-bit WAV needs soundfile"):
        file_source(str(deep), BLOCK_SAMPLES)


def test_missing_unreadable_and_unsupported_files_raise_source_error_naming_the_file(
    tmp_path, monkeypatch
):
    from edge.sources import SourceError, file_source, open_source

    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(np.random.default_rng(0).bytes(5000))
    text = tmp_path / "notes.txt"
    text.write_text("not audio\n" * 100)
    for path in [tmp_path / "missing.wav", garbage, text, tmp_path]:
        with pytest.raises(SourceError, match=re.escape(str(path))):
            file_source(str(path), BLOCK_SAMPLES)
    with pytest.raises(SourceError, match="audio file not found: .*missing.flac"):
        open_source(f"file:{tmp_path / 'missing.flac'}", BLOCK_SAMPLES)
    monkeypatch.setitem(sys.modules, "soundfile", None)
    with pytest.raises(SourceError, match=re.escape(str(garbage))):
        file_source(str(garbage), BLOCK_SAMPLES)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_a_long_file_is_read_block_by_block_without_growing_peak_memory(tmp_path):
    import soundfile

    path = tmp_path / "long.wav"  # 120 s of 48 kHz stereo: 46 MB as float32, 23 MB on disk
    rng = np.random.default_rng(0)
    with soundfile.SoundFile(path, "w", 48_000, 2, subtype="PCM_16") as f:
        for _ in range(12):
            f.write((0.1 * rng.standard_normal((480_000, 2))).astype(np.float32))  # 10 s each
    child = (
        "import json, sys\n"
        "from edge.sources import file_source\n"
        "def peak_kb():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmHWM:'):\n"
        "            return int(line.split()[1])\n"
        "warm = file_source(sys.argv[1], 16000); next(warm); warm.close()\n"
        "before = peak_kb()\n"
        "samples = sum(len(b) for b in file_source(sys.argv[1], 16000))\n"
        "print(json.dumps({'growth_kb': peak_kb() - before, 'samples': samples}))\n"
    )
    command = [sys.executable, "-c", child, str(path)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert abs(report["samples"] - 120 * 16_000) <= 1
    assert report["growth_kb"] < 15 * 1024, report  # reading it whole would add > 46 MB


def test_stdin_pcm_at_48khz_stereo_through_a_pipe(tmp_path):
    t = np.arange(2 * 48_000) / 48_000
    left = np.rint(0.6 * 32767 * np.sin(2 * np.pi * 1000 * t)).astype("<i2")
    pcm = np.stack([left, np.zeros_like(left)], axis=1).tobytes()  # interleaved, right silent
    child = (
        "import sys, numpy as np\n"
        "from edge.sources import open_source\n"
        f"blocks = list(open_source('-', {BLOCK_SAMPLES}, input_rate_hz=48000, input_channels=2))\n"
        "np.save(sys.argv[1], np.array([len(b) for b in blocks]))\n"
        "np.save(sys.argv[2], np.concatenate(blocks))\n"
    )
    lengths_path, audio_path = tmp_path / "lengths.npy", tmp_path / "audio.npy"
    command = [sys.executable, "-c", child, str(lengths_path), str(audio_path)]
    trailing = b"\x01\x02\x03"  # a partial frame and an odd byte
    result = subprocess.run(
        command, input=pcm + trailing, capture_output=True, cwd=REPO, timeout=60
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert b"dropped 3 trailing byte(s)" in result.stderr
    audio = np.load(audio_path)
    blocks = np.split(audio, np.cumsum(np.load(lengths_path))[:-1])
    check_blocks(blocks, 32_000, 1000.0, 0.3)


def test_stdin_source_reassembles_frames_split_across_partial_reads():
    from edge.resample import resample
    from edge.sources import stdin_source

    rng = np.random.default_rng(1)
    pcm = rng.integers(-20_000, 20_000, size=8_000 * 3, dtype=np.int16)  # 3 s of 8 kHz mono
    data = pcm.astype("<i2").tobytes()
    read_fd, write_fd = os.pipe()

    def writer():  # odd-sized writes: reads end mid-sample
        with os.fdopen(write_fd, "wb", buffering=0) as w:
            for start in range(0, len(data), 777):
                w.write(data[start : start + 777])
                time.sleep(0.0005)

    thread = threading.Thread(target=writer)
    thread.start()
    with os.fdopen(read_fd, "rb", buffering=0) as stream:  # unbuffered: short reads come through
        blocks = list(stdin_source(BLOCK_SAMPLES, rate_hz=8_000, stream=stream))
    thread.join()
    expected = resample(pcm.astype(np.float32) / 32768.0, 8_000)
    assert [len(b) for b in blocks] == [BLOCK_SAMPLES] * 12
    assert np.abs(np.concatenate(blocks) - expected).max() < 1e-6


def test_max_seconds_caps_a_file_source(tmp_path):
    from edge.sources import open_source

    path = tmp_path / "three_seconds.wav"
    write_tone_file(path, 48_000, [0.3, 0.3], seconds=3.0)
    blocks = list(open_source(str(path), BLOCK_SAMPLES, max_seconds=1.3))
    assert sum(len(b) for b in blocks) == round(1.3 * 16_000)


def test_source_strings_pick_the_kind_and_unknown_kinds_list_the_known_ones(tmp_path):
    from edge.sources import SourceError, open_source, parse_source

    assert parse_source("-") == ("stdin", "")
    assert parse_source("synthetic") == ("synthetic", "")
    assert parse_source("mic") == ("mic", "")
    assert parse_source("mic:USB Audio: 2") == ("mic", "USB Audio: 2")
    assert parse_source("file:mic") == ("file", "mic")
    assert parse_source("recordings/a.flac") == ("file", "recordings/a.flac")
    assert parse_source("C:/audio/a.wav") == ("file", "C:/audio/a.wav")
    with pytest.raises(SourceError, match="unknown source kind 'rtsp'.*'mic:<index or name>'"):
        open_source("rtsp://camera/audio", BLOCK_SAMPLES)
    with pytest.raises(SourceError, match="takes no argument"):
        open_source("synthetic:3", BLOCK_SAMPLES)


def test_input_devices_are_listed_or_the_portaudio_hint_is_given():
    from edge.sources import SourceError, format_devices, list_input_devices, open_source

    try:
        devices = list_input_devices()
    except SourceError as exc:
        assert "apt install libportaudio2" in str(exc)
    else:
        assert isinstance(devices, list)
        assert all(
            set(d) == {"index", "name", "max_input_channels", "default_samplerate", "is_default"}
            for d in devices
        )
        assert isinstance(format_devices(devices), str)
    # Without PortAudio: the hint; with it: the unknown device and what exists.
    with pytest.raises(SourceError, match="libportaudio2|not an audio input|no audio input"):
        open_source("mic:no such microphone 5f3a", BLOCK_SAMPLES)


DEVICES = [
    {"index": 0, "name": "HDA Intel PCH: ALC3246 Analog (hw:0,0)", "max_input_channels": 2,
     "default_samplerate": 44_100.0, "is_default": False},
    {"index": 3, "name": "USB Audio Device: Mic (hw:1,0)", "max_input_channels": 1,
     "default_samplerate": 48_000.0, "is_default": True},
    {"index": 4, "name": "USB Audio Device: Line (hw:1,1)", "max_input_channels": 2,
     "default_samplerate": 48_000.0, "is_default": False},
]  # fmt: skip


def test_microphones_are_found_by_index_name_or_default():
    from edge.sources import SourceError, _find_input_device, format_devices

    assert _find_input_device(DEVICES, None)["index"] == 3
    assert _find_input_device(DEVICES, 4)["index"] == 4
    assert _find_input_device(DEVICES, "0")["index"] == 0
    assert _find_input_device(DEVICES, "alc3246")["index"] == 0
    with pytest.raises(SourceError, match=r"'USB' matches several inputs(.|\n)*Mic(.|\n)*Line"):
        _find_input_device(DEVICES, "USB")
    with pytest.raises(SourceError, match=r"microphone 7 is not an audio input(.|\n)*ALC3246"):
        _find_input_device(DEVICES, 7)
    table = format_devices(DEVICES).splitlines()
    assert len(table) == 4 and table[2].startswith("*") and "USB Audio Device: Mic" in table[2]
    assert format_devices([]) == "no audio input devices found"


def test_mic_callback_queues_copies_and_drops_the_oldest_block_when_full(caplog):
    from edge.sources import _BlockQueue, _make_callback

    blocks = _BlockQueue(max_blocks=3)
    callback = _make_callback(blocks)
    indata = np.zeros((480, 2), dtype=np.float32)  # PortAudio reuses one buffer per callback
    for i in range(5):
        indata[:] = i
        started = time.perf_counter()
        callback(indata, len(indata), None, None)
        assert time.perf_counter() - started < 0.1  # a full queue never blocks the audio thread
    assert blocks.dropped == 2
    assert [float(blocks.get(0)[0, 0]) for _ in range(3)] == [2.0, 3.0, 4.0]
    with pytest.raises(queue.Empty):
        blocks.get(timeout_s=0.01)
    assert "dropped the oldest block (2 so far)" in caplog.text


def test_mic_blocks_from_the_callback_come_out_as_16khz_mono():
    from edge.sources import _BlockQueue, _make_callback, _to_blocks

    blocks = _BlockQueue(max_blocks=50)
    callback = _make_callback(blocks)
    t = np.arange(48_000) / 48_000  # 1 s of a 48 kHz stereo device, 10 callbacks of 4800 frames
    stereo = np.stack([0.2 * np.sin(2 * np.pi * 1000 * t)] * 2, axis=1).astype(np.float32)
    for start in range(0, len(stereo), 4_800):
        callback(stereo[start : start + 4_800], 4_800, None, None)
    chunks = (blocks.get(0) for _ in range(10))
    check_blocks(list(_to_blocks(chunks, 48_000, BLOCK_SAMPLES)), 16_000, 1000.0, 0.2)
