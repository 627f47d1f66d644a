"""Edge audio sources: files, stdin, microphones and the source registry (edge/sources.py,
edge/mic.py). Needs only the `edge` extra: test_edge_only_venv.py runs it there too.
"""

from __future__ import annotations

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
    from edge.mic import _find_input_device
    from edge.sources import SourceError, format_devices

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
    from edge.mic import _BlockQueue, _make_callback

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
    from edge.mic import _BlockQueue, _make_callback
    from edge.source_blocks import to_blocks

    blocks = _BlockQueue(max_blocks=50)
    callback = _make_callback(blocks)
    t = np.arange(48_000) / 48_000  # 1 s of a 48 kHz stereo device, 10 callbacks of 4800 frames
    stereo = np.stack([0.2 * np.sin(2 * np.pi * 1000 * t)] * 2, axis=1).astype(np.float32)
    for start in range(0, len(stereo), 4_800):
        callback(stereo[start : start + 4_800], 4_800, None, None)
    chunks = (blocks.get(0) for _ in range(10))
    check_blocks(list(to_blocks(chunks, 48_000, BLOCK_SAMPLES)), 16_000, 1000.0, 0.2)
