"""Classify an uploaded clip with the same models and event logic as the live fleet.

    upload (WAV, any rate / channels) -> 16 kHz mono (the edge's file-source path)
        -> edge.onnx codes (EdgeEncoder, as an agent would)
        -> one 1 s step at a time, exactly as the ingest sees a device's messages:
           context = the last ``context_frames`` codes up to the end of the step,
           window = its last ``window_frames`` codes
        -> CodeLM.states -> Classifier.probs (the app's own deployments, batched with live traffic)
        -> cloud.events.step for each label, cloud.events.close at the end of the clip

Times: the clip's first sample is the epoch, so ``start_ns`` / ``end_ns`` count
nanoseconds from the start of the clip (their ISO 8601 forms read 1970-01-01T00:00:..Z)
and ``start_s`` / ``end_s`` are the same in seconds. ``seq_first`` / ``seq_last``
index the 1 s steps (the messages an edge agent would have sent). Nothing is stored:
an upload has no device state, and its events go to no stream.
"""

from __future__ import annotations

import asyncio
import email.message
import io
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cloud import events as event_logic
from edge.encoder import EdgeEncoder
from edge.source_blocks import to_blocks
from shared_models.constants import (
    FRAME_DURATION_NS,
    FRAMES_PER_SECOND,
    NS_PER_SECOND,
    PATCH_SAMPLES,
    SAMPLE_RATE_HZ,
)
from shared_models.wire import SoundEvent, WireError, validate_name

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
"""Largest request body accepted (20 MiB: 10 min of 16 kHz 16-bit mono is 19.2 MB)."""
MIN_CLIP_S = 1.0
"""Shortest clip: one classifier window."""
MAX_CLIP_S = 600.0
"""Longest clip: 10 minutes."""
WINDOWS_PER_REQUEST = 64
"""Windows of one clip per model request; the chunks go one after another, so a long upload
never holds more than one request's worth of the models and cannot crowd out live devices."""
AUDIO_CONTENT_TYPES = ("audio/", "application/octet-stream")
"""Raw bodies accepted: any ``audio/*`` type (``audio/wav``, ``audio/x-wav``, ``audio/flac``, ...)."""


class ClipError(ValueError):
    """The upload cannot be classified; ``status_code`` is the HTTP status to answer with."""

    def __init__(self, status_code: int, message: str):
        super().__init__(message)
        self.status_code = status_code


# --- the request body -------------------------------------------------------------------------
def upload_bytes(content_type: str, body: bytes, field: str = "file") -> bytes:
    """The audio file in a request body: the ``file`` part of multipart/form-data, or the body."""
    media_type = content_type.split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        return multipart_part(content_type, body, field)
    if media_type.startswith(AUDIO_CONTENT_TYPES):
        return body
    raise ClipError(415, f"unsupported Content-Type {media_type or '(none)'!r}: send multipart/form-data "
                         f"with a {field!r} part, or the file itself as audio/wav")


def multipart_part(content_type: str, body: bytes, field: str) -> bytes:
    """The content of the part named ``field`` (RFC 7578), from a body held whole in memory."""
    header = email.message.Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise ClipError(400, "multipart/form-data without a boundary parameter")
    # The boundary never occurs inside a part (RFC 2046), so splitting on it is exact for binary data.
    for part in body.split(b"--" + boundary.encode("latin-1"))[1:]:
        if part.startswith(b"--"):  # the close delimiter
            break
        head, sep, content = part.partition(b"\r\n\r\n")
        if not sep:
            continue
        headers = email.message.Message()
        for line in head.decode("latin-1").strip().split("\r\n"):
            key, _, value = line.partition(":")
            headers[key.strip()] = value.strip()
        if headers.get_param("name", header="content-disposition") == field:
            return content[:-2] if content.endswith(b"\r\n") else content
    raise ClipError(400, f"multipart/form-data without a part named {field!r} (the audio file)")


def decode_clip(data: bytes) -> np.ndarray:
    """Any file libsndfile reads (WAV, FLAC, OGG, ...) -> (N,) float32 16 kHz mono, as the edge
    agent's file source converts it (channel mean, windowed-sinc resampler)."""
    import soundfile

    if not data:
        raise ClipError(400, "empty upload: send a WAV file")
    try:
        f = soundfile.SoundFile(io.BytesIO(data))
    except (RuntimeError, ValueError, TypeError) as exc:  # LibsndfileError is a RuntimeError
        raise ClipError(415, f"not a WAV (or other audio file libsndfile reads): {exc}") from None
    with f:
        if f.frames <= 0 or f.samplerate <= 0:
            raise ClipError(400, "the audio file holds no samples")
        duration_s = f.frames / f.samplerate
        if duration_s < MIN_CLIP_S:
            raise ClipError(422, f"clip too short: {duration_s:.3f} s < {MIN_CLIP_S:.0f} s (one window)")
        if duration_s > MAX_CLIP_S:
            raise ClipError(422, f"clip too long: {duration_s:.1f} s > {MAX_CLIP_S:.0f} s")
        try:
            samples = f.read(dtype="float32", always_2d=True)  # (frames, channels)
        except (RuntimeError, ValueError) as exc:
            raise ClipError(400, f"cannot decode the audio file: {exc}") from None
    try:
        audio = np.concatenate(list(to_blocks([samples], f.samplerate, SAMPLE_RATE_HZ)))  # (N,)
    except ValueError as exc:  # a rate the resampler cannot convert exactly (e.g. 44101 Hz)
        raise ClipError(422, f"unsupported sample rate {f.samplerate} Hz: {exc}") from None
    return np.nan_to_num(audio, nan=0.0, posinf=1.0, neginf=-1.0)


# --- windows, the way the ingest sees them ----------------------------------------------------------
@dataclass(frozen=True)
class Window:
    step: int  # index of the 1 s step (the seq of the message an agent would have sent)
    end_frame: int  # frames from the start of the clip to the end of this step (exclusive)
    context: np.ndarray  # (T,) uint16 codes, T <= context_frames, ending at end_frame
    codes: np.ndarray  # (W,) uint16: the last window_frames codes of the context

    @property
    def end_ns(self) -> int:
        return self.end_frame * FRAME_DURATION_NS


def clip_windows(codes: np.ndarray, window_frames: int, context_frames: int,
                 step_frames: int = FRAMES_PER_SECOND) -> list[Window]:
    """One window per step of ``step_frames`` codes (the last step may be shorter), once
    ``window_frames`` codes have arrived; each with the context the ingest would hold then."""
    out = []
    for step, start in enumerate(range(0, len(codes), step_frames)):
        end = min(start + step_frames, len(codes))
        if end < window_frames:
            continue  # not a full window yet
        context = codes[max(0, end - context_frames) : end]  # (T,)
        out.append(Window(step, end, context, context[-window_frames:]))
    return out


def clip_events(windows: list[Window], probs: list[np.ndarray], labels: list[str],
                policies: dict[str, event_logic.EventPolicy], window_frames: int
                ) -> list[tuple[str, event_logic.ClosedEvent]]:
    """The event logic over a clip's windows, in order; whatever is active at the end closes there."""
    states = {label: event_logic.LabelState() for label in labels}
    closed: list[tuple[str, event_logic.ClosedEvent]] = []
    for window, p in zip(windows, probs, strict=True):
        start_ns = window.end_ns - window_frames * FRAME_DURATION_NS
        for label, score in zip(labels, p, strict=True):
            event = event_logic.step(states[label], policies[label], float(score), start_ns,
                                     window.end_ns, window.step)
            if event:
                closed.append((label, event))
    for label, state in states.items():
        if event := event_logic.close(state, policies[label]):
            closed.append((label, event))
    return sorted(closed, key=lambda item: (item[1].start_ns, item[0]))


class ClipClassifier:
    """Holds the edge encoder and the handles of the app's two model deployments."""

    def __init__(self, bundle_dir: str | Path, manifest: dict, policies: dict[str, event_logic.EventPolicy],
                 code_lm, classifier):
        self.encoder = EdgeEncoder(bundle_dir)
        self.manifest, self.policies = manifest, policies
        self.code_lm, self.classifier = code_lm, classifier
        self.labels = list(manifest["labels"])
        self.window = manifest["classifier_config"]["window_frames"]
        self.context = manifest["code_lm_config"]["context_frames"]
        self.lm_dim = manifest["classifier_config"]["lm_dim"]

    async def classify(self, data: bytes, site: str = "upload", device: str = "clip") -> dict:
        """The whole pipeline on one uploaded file; ClipError for anything wrong with it."""
        try:
            validate_name(site)
            validate_name(device)
        except WireError as exc:
            raise ClipError(422, str(exc)) from None
        audio = await asyncio.to_thread(decode_clip, data)
        n_frames = len(audio) // PATCH_SAMPLES  # an incomplete last patch is dropped, as on the edge
        patches = audio[: n_frames * PATCH_SAMPLES].reshape(n_frames, PATCH_SAMPLES)  # (N, PATCH_SAMPLES)
        encoded = await asyncio.to_thread(self.encoder.encode, patches)
        windows = clip_windows(encoded.codes, self.window, self.context)
        if not windows:
            raise ClipError(422, f"clip too short after conversion: {n_frames} frames < {self.window}")
        results: list[np.ndarray] = []
        for i in range(0, len(windows), WINDOWS_PER_REQUEST):
            chunk = windows[i : i + WINDOWS_PER_REQUEST]
            states = self.code_lm.states.remote([w.context for w in chunk])
            results.extend(await self.classifier.probs.remote(states, np.stack([w.codes for w in chunk])))
        closed = clip_events(windows, results, self.labels, self.policies, self.window)
        events = [self._event(site, device, label, c) for label, c in closed]
        log.info("classified a %.1f s clip: %d windows, %d events", len(audio) / SAMPLE_RATE_HZ,
                 len(windows), len(events))
        return {"model_version": self.manifest["model_version"],
                "duration_s": round(len(audio) / SAMPLE_RATE_HZ, 3),
                "windows": len(windows), "events": events}

    def _event(self, site: str, device: str, label: str, closed: event_logic.ClosedEvent) -> dict:
        event = SoundEvent(
            event_id=uuid.uuid4().hex, site=site, device=device, label=label,
            score=round(closed.score, 4), start_ns=closed.start_ns, end_ns=closed.end_ns,
            model_version=self.manifest["model_version"], codebook_id=self.manifest["codebook_id"],
            seq_first=closed.seq_first, seq_last=closed.seq_last,
        )
        return {**event.to_dict(), "start_s": closed.start_ns / NS_PER_SECOND,
                "end_s": closed.end_ns / NS_PER_SECOND}

    async def probe(self) -> dict[str, bool | str]:
        """One tiny request to each model (readiness): True, or the error as text."""
        codes = np.zeros((1, self.window), dtype=np.uint16)  # (1, W)
        states = np.zeros((1, self.window, self.lm_dim), dtype=np.float32)  # (1, W, C)
        results = await asyncio.gather(self.code_lm.states.remote(list(codes)),
                                       self.classifier.probs.remote(states, codes),
                                       return_exceptions=True)
        return {name: True if not isinstance(r, BaseException) else f"{type(r).__name__}: {r}"
                for name, r in zip(("code_lm", "classifier"), results, strict=True)}
