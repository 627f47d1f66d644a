"""WAV reading and writing with numpy and the standard library only.

The edge must read WAV files without soundfile, and the corpus must write
byte-identical files for the same seed, so this module owns both directions.
Writing is always 16-bit PCM mono; reading accepts 8/16/24/32-bit integer PCM
and 32-bit float, in plain or WAVE_FORMAT_EXTENSIBLE headers, and mixes any
number of channels down to mono by their mean.

Integer scale convention (one rule for both directions): full scale is the
largest positive code (32767 for 16 bits), so a float written and read back
differs by at most half a step, 0.5 / 32767; the most negative code reads as
slightly below -1 and is clipped to -1.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from shared_models.constants import SAMPLE_RATE_HZ

PCM16_FULL_SCALE = 32767
"""The float 1.0 is written as this 16-bit code."""

_FORMAT_PCM = 0x0001
_FORMAT_FLOAT = 0x0003
_FORMAT_EXTENSIBLE = 0xFFFE
_MAX_DATA_BYTES = 0xFFFFFFFF - 36  # the RIFF size field is 32 bits

_HEADER = struct.Struct("<4sI4s4sIHHIIHH4sI")  # RIFF header + 16-byte fmt chunk + data chunk header


class WavFormatError(ValueError):
    """The bytes are not a WAV file this module can read; the message names the source."""


@dataclass(frozen=True)
class WavInfo:
    """What a WAV header says, read without decoding the samples."""

    sample_rate_hz: int
    n_channels: int
    bits_per_sample: int
    n_frames: int
    is_float: bool

    @property
    def duration_s(self) -> float:
        return self.n_frames / self.sample_rate_hz


def write_wav(path: str | Path, audio: np.ndarray, sample_rate_hz: int) -> None:
    """Write ``audio`` (1-D float, nominally in [-1, 1]) as 16-bit PCM mono.

    Samples outside [-1, 1] are clipped; rounding is numpy's round-half-to-even,
    so the same float array always gives the same bytes.
    """
    samples = np.asarray(audio, dtype=np.float64)
    if samples.ndim != 1:
        raise ValueError(
            f"write_wav writes mono audio: expected a 1-D array, got shape {samples.shape}"
        )
    if not np.all(np.isfinite(samples)):
        raise ValueError(f"write_wav: {path}: audio contains NaN or infinite samples")
    rate = int(sample_rate_hz)
    if rate != sample_rate_hz or rate <= 0:
        raise ValueError(
            f"write_wav: sample_rate_hz must be a positive integer, got {sample_rate_hz!r}"
        )
    pcm = np.rint(np.clip(samples, -1.0, 1.0) * PCM16_FULL_SCALE).astype("<i2")
    data = pcm.tobytes()
    if len(data) > _MAX_DATA_BYTES:
        raise ValueError(f"write_wav: {path}: {len(data)} bytes of audio do not fit a RIFF file")
    header = _HEADER.pack(
        b"RIFF",
        36 + len(data),
        b"WAVE",
        b"fmt ",
        16,
        _FORMAT_PCM,
        1,
        rate,
        rate * 2,
        2,
        16,
        b"data",
        len(data),
    )  # fmt fields: format tag, channels, rate, byte rate, block align, bits
    Path(path).write_bytes(header + data)


def resample_linear(audio: np.ndarray, rate_hz: int) -> np.ndarray:
    """Resample mono float32 audio to SAMPLE_RATE_HZ by linear interpolation (numpy only)."""
    if rate_hz == SAMPLE_RATE_HZ:
        return audio.astype(np.float32, copy=False)
    n_out = int(round(len(audio) * SAMPLE_RATE_HZ / rate_hz))
    t_out = np.arange(n_out) * (rate_hz / SAMPLE_RATE_HZ)
    return np.interp(t_out, np.arange(len(audio)), audio).astype(np.float32)


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a WAV file: (float32 mono samples in [-1, 1], sample rate in Hz)."""
    path = Path(path)
    return decode_wav(path.read_bytes(), source=str(path))


def read_wav_info(path: str | Path) -> WavInfo:
    """The header of a WAV file (rate, channels, length) without reading the samples."""
    path = Path(path)
    with path.open("rb") as f:
        info, _ = _scan(f, str(path))
    return info


def decode_wav(data: bytes, source: str = "<bytes>") -> tuple[np.ndarray, int]:
    """Decode WAV bytes (a file, or a tool's stdout) to float32 mono and the rate in Hz.

    A data chunk whose declared size runs past the end (streamed WAVs, such as
    ``espeak-ng --stdout``, leave it unset) is read up to the last whole frame.
    """
    info, offset = _scan(io.BytesIO(data), source)
    frame_bytes = info.n_channels * info.bits_per_sample // 8
    raw = data[offset : offset + info.n_frames * frame_bytes]
    samples = _decode_samples(raw, info)  # (n_frames * n_channels,) float64
    mono = samples.reshape(info.n_frames, info.n_channels).mean(axis=1)  # (n_frames,)
    return np.clip(mono, -1.0, 1.0).astype(np.float32), info.sample_rate_hz


def _decode_samples(raw: bytes, info: WavInfo) -> np.ndarray:
    bits = info.bits_per_sample
    if info.is_float:
        return np.frombuffer(raw, dtype="<f4").astype(np.float64)
    if bits == 8:  # 8-bit WAV is unsigned, centred on 128
        return (np.frombuffer(raw, dtype=np.uint8).astype(np.float64) - 128.0) / 127.0
    if bits == 16:
        return np.frombuffer(raw, dtype="<i2") / float(PCM16_FULL_SCALE)
    if bits == 24:
        b = (
            np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        )  # (n, 3) little-endian
        value = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        value = np.where(value >= 1 << 23, value - (1 << 24), value)  # sign-extend
        return value / float((1 << 23) - 1)
    return np.frombuffer(raw, dtype="<i4") / float((1 << 31) - 1)  # 32-bit


def _scan(f: BinaryIO, source: str) -> tuple[WavInfo, int]:
    """Walk the RIFF chunks: the format, and the byte offset where the samples start."""
    total = f.seek(0, io.SEEK_END)
    f.seek(0)
    head = f.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise WavFormatError(f"{source}: not a WAV file (no RIFF/WAVE header)")
    fmt: tuple[int, int, int, bool] | None = None
    while True:
        chunk = f.read(8)
        if len(chunk) < 8:
            break
        chunk_id, size = struct.unpack("<4sI", chunk)
        start = f.tell()
        if chunk_id == b"fmt ":
            fmt = _parse_fmt(f.read(min(size, 64)), source)
        elif chunk_id == b"data":
            if fmt is None:
                raise WavFormatError(f"{source}: data chunk comes before the fmt chunk")
            rate, channels, bits, is_float = fmt
            size = min(size, total - start)
            n_frames = size // (channels * bits // 8)
            return WavInfo(rate, channels, bits, n_frames, is_float), start
        f.seek(start + size + (size & 1))  # chunks are padded to an even length
    missing = "fmt" if fmt is None else "data"
    raise WavFormatError(f"{source}: WAV file has no {missing} chunk")


def _parse_fmt(body: bytes, source: str) -> tuple[int, int, int, bool]:
    """(rate, channels, bits, is_float) from a fmt chunk, or a WavFormatError."""
    if len(body) < 16:
        raise WavFormatError(f"{source}: fmt chunk is {len(body)} bytes, expected at least 16")
    tag, channels, rate, _byte_rate, block_align, bits = struct.unpack("<HHIIHH", body[:16])
    if tag == _FORMAT_EXTENSIBLE:
        if len(body) < 26:
            raise WavFormatError(f"{source}: WAVE_FORMAT_EXTENSIBLE fmt chunk is truncated")
        (tag,) = struct.unpack("<H", body[24:26])  # first two bytes of the sub-format GUID
    supported = (tag == _FORMAT_PCM and bits in (8, 16, 24, 32)) or (
        tag == _FORMAT_FLOAT and bits == 32
    )
    if not supported:
        raise WavFormatError(
            f"{source}: unsupported WAV encoding (format tag {tag:#06x}, {bits} bits); "
            "supported: 8/16/24/32-bit integer PCM and 32-bit float"
        )
    if channels < 1 or rate < 1 or block_align != channels * bits // 8:
        raise WavFormatError(
            f"{source}: inconsistent fmt chunk (channels={channels}, rate={rate}, "
            f"block_align={block_align}, bits={bits})"
        )
    return rate, channels, bits, tag == _FORMAT_FLOAT
