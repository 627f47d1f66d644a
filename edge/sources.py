"""Audio sources for the edge agent, all yielding 16 kHz mono float32 blocks.

A registry keyed by the ``source`` string's type: a WAV/FLAC path, ``-``
for raw s16le PCM on stdin, or ``synthetic`` for the built-in scene generator.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from shared_models.constants import SAMPLE_RATE_HZ
from shared_models.wavio import resample_linear

log = logging.getLogger(__name__)


class SourceError(RuntimeError):
    """The audio source cannot be opened or read."""


def file_source(path: str, block_samples: int) -> Iterator[np.ndarray]:
    p = Path(path)
    if not p.is_file():
        raise SourceError(f"audio file not found: {p}")
    try:
        import soundfile

        audio, rate = soundfile.read(str(p), dtype="float32", always_2d=True)
        audio = audio.mean(axis=1)
    except ImportError:  # soundfile missing: 16-bit PCM WAV through the stdlib reader
        from shared_models.wavio import read_wav

        audio, rate = read_wav(p)
    except Exception as exc:  # soundfile raises its own LibsndfileError
        raise SourceError(f"cannot read audio file {p}: {exc}") from None
    audio = resample_linear(audio, int(rate))
    log.info("file source %s: %.1f s at %d Hz", p, len(audio) / SAMPLE_RATE_HZ, rate)
    for i in range(0, len(audio), block_samples):
        yield audio[i : i + block_samples]


def stdin_source(block_samples: int) -> Iterator[np.ndarray]:
    """Raw 16 kHz mono s16le PCM, e.g. ``arecord -f S16_LE -r 16000 -c 1``."""
    stream = sys.stdin.buffer
    while True:
        data = stream.read(block_samples * 2)
        if not data:
            return
        data = data[: len(data) // 2 * 2]
        yield np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


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


def open_source(source: str, block_samples: int, seed: int = 0, max_seconds: float = 0.0) -> Iterator[np.ndarray]:
    if source == "synthetic":
        return synthetic_source(block_samples, seed, max_seconds)
    if source == "-":
        return stdin_source(block_samples)
    return file_source(source, block_samples)


def array_source(audio: np.ndarray, block_samples: int) -> Iterator[np.ndarray]:
    """Blocks of an in-memory 16 kHz mono signal (the demo's scripted scenes)."""
    for i in range(0, len(audio), block_samples):
        yield audio[i : i + block_samples].astype(np.float32, copy=False)
