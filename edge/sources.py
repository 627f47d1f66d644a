"""Audio sources for the edge agent, all yielding 16 kHz mono float32 blocks.

Every source yields blocks of exactly ``block_samples`` samples (the last may be
shorter), whatever the rate and channel count it reads: channels are averaged
(:func:`edge.resample.to_mono`) and the rate converted by a windowed-sinc
:class:`edge.resample.StreamResampler`. Audio is read a block at a time, never
whole, so a long file or an endless stream costs the same memory as a short one.

The ``source`` string picks the kind through the :data:`SOURCE_KINDS` registry:

- ``synthetic``: random labelled scenes from the built-in generator;
- ``-`` (or ``stdin``): raw s16le PCM on stdin, e.g. ``arecord -f S16_LE -r 48000 -c 2 |``;
- ``mic`` or ``mic:<index or name substring>``: a microphone through PortAudio;
- ``file:<path>`` or any other string: an audio file libsndfile reads (WAV, FLAC, OGG, ...).
"""

from __future__ import annotations

import logging
import math
import queue
import re
import sys
import wave
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from edge.resample import StreamResampler, to_mono
from shared_models.constants import SAMPLE_RATE_HZ

log = logging.getLogger(__name__)

PORTAUDIO_HINT = (
    "PortAudio library not found: install it (Debian/Ubuntu: apt install libportaudio2; "
    "macOS: brew install portaudio), or stream audio from a file or from stdin (--source -)"
)
MIC_SILENCE_TIMEOUT_S = 5.0
"""A microphone that delivers nothing for this long (beyond one block) is reported as failed."""

PCM16_SCALE = 32768.0
"""s16le samples are divided by this, as libsndfile does, so both file readers agree exactly."""


class SourceError(RuntimeError):
    """The audio source cannot be opened or read; the message names the file or device."""


# --- conversion: any rate and channel count -> 16 kHz mono blocks ---------------------------
def _input_frames(block_samples: int, rate_hz: int) -> int:
    """Input frames at ``rate_hz`` that make about one output block (the read size)."""
    return max(1, math.ceil(block_samples * rate_hz / SAMPLE_RATE_HZ))


def _to_blocks(
    chunks: Iterable[np.ndarray], rate_hz: int, block_samples: int
) -> Iterator[np.ndarray]:
    """Mix ``(frames, channels)`` chunks at ``rate_hz`` to mono, resample, re-cut into blocks."""
    resampler = StreamResampler(rate_hz, SAMPLE_RATE_HZ)
    buffer = np.zeros(0, dtype=np.float32)  # resampled audio not yet yielded, < one block
    for chunk in chunks:
        buffer = np.concatenate([buffer, resampler.process(to_mono(chunk))])
        while len(buffer) >= block_samples:
            yield buffer[:block_samples]
            buffer = buffer[block_samples:]
    buffer = np.concatenate([buffer, resampler.flush()])
    for start in range(0, len(buffer), block_samples):
        yield buffer[start : start + block_samples]


def _pcm16_frames(data: bytes, channels: int) -> np.ndarray:
    """Whole frames of interleaved s16le bytes as float32 ``(frames, channels)``."""
    pcm = np.frombuffer(data, dtype="<i2").reshape(-1, channels)  # (frames, channels)
    return pcm.astype(np.float32) / PCM16_SCALE


def _limit(blocks: Iterator[np.ndarray], max_samples: int) -> Iterator[np.ndarray]:
    """The first ``max_samples`` samples of ``blocks``; closes the source (a microphone) after."""
    remaining = max_samples
    try:
        for block in blocks:
            yield block[:remaining]
            remaining -= len(block)
            if remaining <= 0:
                return
    finally:
        close = getattr(blocks, "close", None)
        if close is not None:
            close()


# --- files ----------------------------------------------------------------------------------
def file_source(path: str, block_samples: int) -> Iterator[np.ndarray]:
    """Blocks of an audio file, read ``block_samples`` at a time (never the whole file).

    Opens the file now, so a missing or unreadable file fails here, not at the first block.
    Without soundfile (or libsndfile) only 16-bit PCM WAV is readable, through ``wave``.
    """
    p = Path(path)
    if not p.exists():
        raise SourceError(f"audio file not found: {p}")
    if not p.is_file():
        raise SourceError(f"not an audio file (a directory or device): {p}")
    try:
        import soundfile
    except (ImportError, OSError) as exc:  # OSError: the package is there, libsndfile is not
        log.info("soundfile unavailable (%s): reading %s with the stdlib wave module", exc, p)
        rate_hz, channels, n_frames, chunks = _open_wave(p, block_samples)
    else:
        rate_hz, channels, n_frames, chunks = _open_soundfile(soundfile, p, block_samples)
    log.info(
        "file source %s: %.1f s at %d Hz, %d channel(s)", p, n_frames / rate_hz, rate_hz, channels
    )
    return _to_blocks(chunks, rate_hz, block_samples)


def _open_soundfile(soundfile: Any, path: Path, block_samples: int):
    """(rate_hz, channels, frames, chunks) of any file libsndfile reads."""
    try:
        f = soundfile.SoundFile(str(path))
    except (RuntimeError, ValueError, TypeError) as exc:  # LibsndfileError is a RuntimeError
        raise SourceError(f"cannot read audio file {path}: {exc}") from None
    frames_per_read = _input_frames(block_samples, f.samplerate)

    def chunks() -> Iterator[np.ndarray]:
        with f:
            while True:
                try:
                    data = f.read(frames_per_read, dtype="float32", always_2d=True)  # (frames, ch)
                except (RuntimeError, ValueError) as exc:
                    raise SourceError(f"error reading audio file {path}: {exc}") from None
                if len(data) == 0:
                    return
                yield data

    return f.samplerate, f.channels, f.frames, chunks()


def _open_wave(path: Path, block_samples: int):
    """(rate_hz, channels, frames, chunks) of a 16-bit PCM WAV through the stdlib."""
    try:
        reader = wave.open(str(path), "rb")
    except (wave.Error, EOFError, OSError) as exc:
        raise SourceError(
            f"cannot read audio file {path}: {exc} (without soundfile only 16-bit PCM WAV "
            "is supported: pip install soundfile)"
        ) from None
    if reader.getsampwidth() != 2:
        bits = 8 * reader.getsampwidth()
        reader.close()
        raise SourceError(
            f"cannot read audio file {path}: {bits}-bit WAV needs soundfile "
            "(the stdlib fallback reads 16-bit PCM only)"
        )
    channels = reader.getnchannels()
    frames_per_read = _input_frames(block_samples, reader.getframerate())

    def chunks() -> Iterator[np.ndarray]:
        with reader:
            while data := reader.readframes(frames_per_read):
                # A truncated file may end mid-frame.
                whole = len(data) // (2 * channels) * (2 * channels)
                yield _pcm16_frames(data[:whole], channels)

    return reader.getframerate(), channels, reader.getnframes(), chunks()


# --- stdin ----------------------------------------------------------------------------------
def stdin_source(
    block_samples: int,
    rate_hz: int = SAMPLE_RATE_HZ,
    channels: int = 1,
    *,
    stream: BinaryIO | None = None,
) -> Iterator[np.ndarray]:
    """Raw interleaved s16le PCM at ``rate_hz`` with ``channels``, from stdin (or ``stream``).

    e.g. ``arecord -f S16_LE -r 48000 -c 2 | soundfleet edge run --source -`` with
    ``rate_hz=48000, channels=2``. Reads may end anywhere, even mid-sample: the
    bytes of an incomplete frame wait for the next read; at the end they are dropped.
    """
    if channels < 1 or rate_hz < 1:
        raise SourceError(
            f"stdin PCM needs a positive rate and channel count, got {rate_hz} Hz, {channels} ch"
        )
    stream = sys.stdin.buffer if stream is None else stream
    frames_per_read = _input_frames(block_samples, rate_hz)
    log.info("stdin source: s16le PCM, %d Hz, %d channel(s)", rate_hz, channels)
    return _to_blocks(_pcm_chunks(stream, frames_per_read, channels), rate_hz, block_samples)


def _pcm_chunks(stream: BinaryIO, frames_per_read: int, channels: int) -> Iterator[np.ndarray]:
    frame_bytes = 2 * channels
    pending = b""  # the start of a frame that the last read cut
    while data := stream.read(frames_per_read * frame_bytes):
        data = pending + data
        whole = len(data) // frame_bytes * frame_bytes
        pending = data[whole:]
        if whole:
            yield _pcm16_frames(data[:whole], channels)
    if pending:
        log.warning(
            "stdin: dropped %d trailing byte(s), less than one %d-byte frame",
            len(pending),
            frame_bytes,
        )


# --- microphones (PortAudio) ----------------------------------------------------------------
class _BlockQueue:
    """Blocks from PortAudio's callback thread to the consumer, never blocking the callback.

    Bounded, because a consumer that stalls (a slow broker) must not grow memory
    without limit; when full, the oldest block is dropped: live detection wants
    the newest audio, and the audio thread must never wait.
    """

    def __init__(self, max_blocks: int):
        self._queue: queue.Queue[np.ndarray] = queue.Queue(maxsize=max(1, max_blocks))
        self.dropped = 0

    def push(self, block: np.ndarray) -> None:
        while True:
            try:
                self._queue.put_nowait(block)
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    continue  # the consumer just made room
                self.dropped += 1
                log.warning(
                    "microphone: consumer too slow, dropped the oldest block (%d so far)",
                    self.dropped,
                )

    def get(self, timeout_s: float | None = None) -> np.ndarray:
        """The oldest queued block; ``queue.Empty`` after ``timeout_s`` without one."""
        return self._queue.get(timeout=timeout_s)


def _make_callback(blocks: _BlockQueue) -> Callable[[np.ndarray, int, Any, Any], None]:
    """The ``sounddevice.InputStream`` callback: queue a copy (PortAudio reuses ``indata``)."""

    def callback(indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        if status:
            log.warning("microphone: %s", status)  # e.g. "input overflow"
        blocks.push(indata.copy())  # (frames, channels)

    return callback


def _import_sounddevice() -> Any:
    try:
        import sounddevice
    except OSError:  # the Python package is installed, the PortAudio C library is not
        raise SourceError(PORTAUDIO_HINT) from None
    except ImportError:
        raise SourceError(
            "the sounddevice package is not installed: pip install 'soundfleet[edge]'"
        ) from None
    return sounddevice


def list_input_devices() -> list[dict]:
    """The inputs PortAudio sees, as dicts.

    Keys: index, name, max_input_channels, default_samplerate (Hz), is_default.
    """
    return _input_devices(_import_sounddevice())


def _input_devices(sd: Any) -> list[dict]:
    try:
        devices = sd.query_devices()
        default_index = sd.default.device[0]
    except sd.PortAudioError as exc:
        raise SourceError(f"cannot list audio devices: {exc}") from None
    return [
        {
            "index": i,
            "name": d["name"],
            "max_input_channels": int(d["max_input_channels"]),
            "default_samplerate": float(d["default_samplerate"]),
            "is_default": i == default_index,
        }
        for i, d in enumerate(devices)
        if d["max_input_channels"] > 0
    ]


def format_devices(devices: list[dict]) -> str:
    """A small table of :func:`list_input_devices`, the default marked with ``*``."""
    if not devices:
        return "no audio input devices found"
    width = max(4, *(len(d["name"]) for d in devices))
    lines = [f"  {'index':>5}  {'name':<{width}}  {'channels':>8}  {'rate_hz':>7}"]
    for d in devices:
        mark = "*" if d["is_default"] else " "
        lines.append(
            f"{mark} {d['index']:>5}  {d['name']:<{width}}  {d['max_input_channels']:>8}  "
            f"{d['default_samplerate']:>7.0f}"
        )
    return "\n".join(lines)


def _find_input_device(devices: list[dict], device: str | int | None) -> dict:
    """The device named by index or by a (case-insensitive) name substring; None is the default."""
    if not devices:
        raise SourceError("no audio input devices found")
    if device is None or device == "":
        matches = [d for d in devices if d["is_default"]] or devices[:1]
    elif isinstance(device, int) or device.strip().isdigit():
        matches = [d for d in devices if d["index"] == int(device)]
    else:
        matches = [d for d in devices if device.lower() in d["name"].lower()]
        exact = [d for d in matches if d["name"].lower() == device.lower()]
        matches = exact or matches
    if len(matches) == 1:
        return matches[0]
    problem = "matches several inputs" if matches else "is not an audio input"
    raise SourceError(
        f"microphone {device!r} {problem}; inputs:\n{format_devices(matches or devices)}"
    )


def mic_source(
    block_samples: int,
    device: str | int | None = None,
    rate_hz: int | None = None,
    channels: int | None = None,
    queue_blocks: int = 50,
) -> Iterator[np.ndarray]:
    """Blocks from a PortAudio input (``device``: index, name substring, or None for the default).

    Opens at 16 kHz when the device supports it, else at its default rate and
    resamples. The stream starts at the first block asked for, so audio is not
    queued (and dropped) while the agent is still connecting.
    """
    sd = _import_sounddevice()
    info = _find_input_device(_input_devices(sd), device)
    channels = channels or 1
    if channels > info["max_input_channels"]:
        raise SourceError(
            f"microphone {info['name']!r} has {info['max_input_channels']} input "
            f"channel(s), {channels} asked for"
        )
    if rate_hz is None:
        try:
            sd.check_input_settings(
                device=info["index"], channels=channels, samplerate=SAMPLE_RATE_HZ, dtype="float32"
            )
            rate_hz = SAMPLE_RATE_HZ
        except (sd.PortAudioError, ValueError):
            rate_hz = int(info["default_samplerate"])
    frames = _input_frames(block_samples, rate_hz)
    log.info(
        "microphone %d %r: %d Hz, %d channel(s)", info["index"], info["name"], rate_hz, channels
    )
    chunks = _mic_chunks(sd, info, rate_hz, channels, frames, _BlockQueue(queue_blocks))
    return _to_blocks(chunks, rate_hz, block_samples)


def _mic_chunks(
    sd: Any, info: dict, rate_hz: int, channels: int, frames: int, blocks: _BlockQueue
) -> Iterator[np.ndarray]:
    try:
        stream = sd.InputStream(
            device=info["index"],
            channels=channels,
            samplerate=rate_hz,
            blocksize=frames,
            dtype="float32",
            callback=_make_callback(blocks),
        )
    except (sd.PortAudioError, ValueError) as exc:
        raise SourceError(f"cannot open microphone {info['name']!r}: {exc}") from None
    timeout_s = MIC_SILENCE_TIMEOUT_S + frames / rate_hz
    try:
        with stream:
            while True:
                try:
                    yield blocks.get(timeout_s)
                except queue.Empty:
                    raise SourceError(
                        f"microphone {info['name']!r} delivered no audio for {timeout_s:.0f} s"
                    ) from None
    finally:
        if blocks.dropped:
            log.warning("microphone: %d block(s) dropped in total", blocks.dropped)


# --- synthetic and in-memory ----------------------------------------------------------------
def synthetic_source(block_samples: int, seed: int, max_seconds: float) -> Iterator[np.ndarray]:
    """Endless (or ``max_seconds`` long) random labelled scenes from the built-in generator."""
    from shared_models.synth import random_scene

    rng = np.random.default_rng(seed)
    remaining = int(max_seconds * SAMPLE_RATE_HZ) if max_seconds > 0 else None
    buffer = np.zeros(0, dtype=np.float32)
    while remaining is None or remaining > 0:
        scene = random_scene(rng, duration_s=10.0)
        log.info("synthetic scene: %s", [(e.label, round(e.onset_s, 2)) for e in scene.events])
        buffer = np.concatenate([buffer, scene.audio])
        while len(buffer) >= block_samples and (remaining is None or remaining > 0):
            block, buffer = buffer[:block_samples], buffer[block_samples:]
            if remaining is not None:
                block = block[:remaining]
                remaining -= len(block)
            yield block


def array_source(audio: np.ndarray, block_samples: int) -> Iterator[np.ndarray]:
    """Blocks of an in-memory 16 kHz mono signal (the demo's scripted scenes)."""
    for i in range(0, len(audio), block_samples):
        yield audio[i : i + block_samples].astype(np.float32, copy=False)


# --- the registry ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Request:
    """What every opener may use from :func:`open_source`'s arguments."""

    block_samples: int
    seed: int
    max_seconds: float
    input_rate_hz: int  # stdin only
    input_channels: int  # stdin only


def _open_synthetic(argument: str, request: _Request) -> Iterator[np.ndarray]:
    if argument:
        raise SourceError(f"the synthetic source takes no argument, got {argument!r}")
    return synthetic_source(request.block_samples, request.seed, request.max_seconds)


def _open_stdin(argument: str, request: _Request) -> Iterator[np.ndarray]:
    if argument:
        raise SourceError(f"the stdin source takes no argument, got {argument!r}")
    return stdin_source(request.block_samples, request.input_rate_hz, request.input_channels)


def _open_mic(argument: str, request: _Request) -> Iterator[np.ndarray]:
    return mic_source(request.block_samples, argument or None)


def _open_file(argument: str, request: _Request) -> Iterator[np.ndarray]:
    if not argument:
        raise SourceError("file source without a path: use file:<path> or just the path")
    return file_source(argument, request.block_samples)


SOURCE_KINDS: dict[str, Callable[[str, _Request], Iterator[np.ndarray]]] = {
    "synthetic": _open_synthetic,
    "stdin": _open_stdin,
    "mic": _open_mic,
    "file": _open_file,
}
SOURCE_HELP = (
    "sources are 'synthetic', '-' (s16le PCM on stdin), 'mic', 'mic:<index or name>', "
    "'file:<path>' or the path of an audio file"
)


def parse_source(source: str) -> tuple[str, str]:
    """(kind, argument) of a source string: ``mic:2`` -> ("mic", "2"), ``a.wav`` -> ("file", ...).

    A file named like a kind (``mic``) is reached as ``file:mic`` or ``./mic``.
    """
    if source == "-":
        return "stdin", ""
    kind, colon, argument = source.partition(":")
    if kind in SOURCE_KINDS:
        return kind, argument
    if colon and re.fullmatch(r"[a-z][a-z0-9_]+", kind) and not Path(source).exists():
        raise SourceError(f"unknown source kind {kind!r} in {source!r}: {SOURCE_HELP}")
    return "file", source


def open_source(
    source: str,
    block_samples: int,
    seed: int = 0,
    max_seconds: float = 0.0,
    *,
    input_rate_hz: int = SAMPLE_RATE_HZ,
    input_channels: int = 1,
) -> Iterator[np.ndarray]:
    """16 kHz mono blocks of ``block_samples`` from ``source``, at most ``max_seconds`` if > 0.

    ``input_rate_hz`` and ``input_channels`` describe raw PCM on stdin (files and
    microphones say their own format).
    """
    kind, argument = parse_source(source)
    request = _Request(block_samples, seed, max_seconds, input_rate_hz, input_channels)
    blocks = SOURCE_KINDS[kind](argument, request)
    if max_seconds > 0 and kind != "synthetic":  # synthetic stops by itself, mid-scene
        blocks = _limit(blocks, round(max_seconds * SAMPLE_RATE_HZ))
    return blocks
