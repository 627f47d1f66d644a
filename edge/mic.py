"""Microphones through PortAudio (the ``sounddevice`` package), as 16 kHz mono blocks.

``sounddevice`` is imported when a microphone is first used or listed, not with this
module: an agent reading files or stdin runs without PortAudio. PortAudio calls back
from its own audio thread; :class:`_BlockQueue` hands the blocks to the consumer and
never makes that thread wait.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from edge.source_blocks import SourceError, input_frames, to_blocks
from shared_models.constants import SAMPLE_RATE_HZ

log = logging.getLogger(__name__)

PORTAUDIO_HINT = (
    "PortAudio library not found: install it (Debian/Ubuntu: apt install libportaudio2; "
    "macOS: brew install portaudio), or stream audio from a file or from stdin (--source -)"
)
MIC_SILENCE_TIMEOUT_S = 5.0
"""A microphone that delivers nothing for this long (beyond one block) is reported as failed."""


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
            "the sounddevice package is not installed: python3.11 scripts/deps.py install edge "
            "(or pip install sounddevice)"
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
    frames = input_frames(block_samples, rate_hz)
    log.info(
        "microphone %d %r: %d Hz, %d channel(s)", info["index"], info["name"], rate_hz, channels
    )
    chunks = _mic_chunks(sd, info, rate_hz, channels, frames, _BlockQueue(queue_blocks))
    return to_blocks(chunks, rate_hz, block_samples)


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
