"""Audio sources for the edge agent, all yielding 16 kHz mono float32 blocks.

Every source yields blocks of exactly ``block_samples`` samples (the last may be
shorter), whatever the rate and channel count it reads: channels are averaged and
the rate converted by :func:`edge.source_blocks.to_blocks`. Audio is read a block
at a time, never whole, so a long file or an endless stream costs the same memory
as a short one.

The ``source`` string picks the kind through the :data:`SOURCE_KINDS` registry:

- ``synthetic``: random labelled scenes from the built-in generator;
- ``-`` (or ``stdin``): raw s16le PCM on stdin, e.g. ``arecord -f S16_LE -r 48000 -c 2 |``;
- ``mic`` or ``mic:<index or name substring>``: a microphone through PortAudio (:mod:`edge.mic`);
- ``file:<path>`` or any other string: an audio file libsndfile reads (WAV, FLAC, OGG, ...).
"""

from __future__ import annotations

import logging
import re
import sys
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from edge.mic import format_devices, list_input_devices, mic_source
from edge.source_blocks import SourceError, input_frames, to_blocks
from shared_models.constants import SAMPLE_RATE_HZ

__all__ = [
    "SOURCE_KINDS", "SourceError", "array_source", "file_source", "format_devices",
    "list_input_devices", "mic_source", "open_source", "parse_source", "stdin_source",
    "synthetic_source",
]  # fmt: skip

log = logging.getLogger(__name__)

PCM16_SCALE = 32768.0
"""s16le samples are divided by this, as libsndfile does, so both file readers agree exactly."""


def _pcm16_frames(data: bytes, channels: int) -> np.ndarray:
    """Whole frames of interleaved s16le bytes as float32 ``(frames, channels)``."""
    pcm = np.frombuffer(data, dtype="<i2").reshape(-1, channels)  # (frames, channels)
    return pcm.astype(np.float32) / PCM16_SCALE


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
    return to_blocks(chunks, rate_hz, block_samples)


def _open_soundfile(soundfile: Any, path: Path, block_samples: int):
    """(rate_hz, channels, frames, chunks) of any file libsndfile reads."""
    try:
        f = soundfile.SoundFile(str(path))
    except (RuntimeError, ValueError, TypeError) as exc:  # LibsndfileError is a RuntimeError
        raise SourceError(f"cannot read audio file {path}: {exc}") from None
    frames_per_read = input_frames(block_samples, f.samplerate)

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
    frames_per_read = input_frames(block_samples, reader.getframerate())

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
    frames_per_read = input_frames(block_samples, rate_hz)
    log.info("stdin source: s16le PCM, %d Hz, %d channel(s)", rate_hz, channels)
    return to_blocks(_pcm_chunks(stream, frames_per_read, channels), rate_hz, block_samples)


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
