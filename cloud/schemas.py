"""What the HTTP API returns, as pydantic models (they become the OpenAPI document), and the
one parser of the time parameters the routes share.

The event models mirror :class:`shared_models.wire.SoundEvent` (its ``to_dict``); they allow
extra keys so a field added to the wire event is passed through, not silently dropped.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field

from shared_models.constants import NS_PER_SECOND

STREAM_ID_RE = re.compile(r"\d{1,20}-\d{1,20}")
"""A Redis Stream entry id, ``<unix ms>-<sequence>``."""


class Event(BaseModel):
    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={"example": {
            "event_id": "4f1c0d8a9b2e4c7f8a6d5e3b2c1a0f9e", "site": "street", "device": "pole-7",
            "label": "siren", "score": 0.998, "start_ns": 1767225602000000000,
            "end_ns": 1767225606000000000, "model_version": "sf1-a9143974", "codebook_id": 2836674932,
            "seq_first": 2, "seq_last": 5, "start": "2026-01-01T00:00:02.000Z",
            "end": "2026-01-01T00:00:06.000Z",
        }},
    )

    event_id: str = Field(description="unique id of the event (uuid4 hex)")
    site: str = Field(description="site id, as in the MQTT topic")
    device: str = Field(description="device id, as in the MQTT topic")
    label: str = Field(description='event class, e.g. "siren"')
    score: float = Field(description="peak window probability while the event was active, in [0, 1]")
    start_ns: int = Field(description="capture time the event starts, unix ns")
    end_ns: int = Field(description="capture time the event ends, unix ns")
    model_version: str = Field(description="version of the cloud model bundle that detected it")
    codebook_id: int = Field(description="u32 id of the codebook of the frames it came from")
    seq_first: int = Field(description="seq of the first frames message it came from")
    seq_last: int = Field(description="seq of the last frames message it came from")
    start: str = Field(description="start_ns as ISO 8601 UTC, millisecond precision")
    end: str = Field(description="end_ns as ISO 8601 UTC, millisecond precision")


class ClipEvent(Event):
    """An event found in an uploaded clip: times count from the clip's first sample (epoch 0)."""

    start_s: float = Field(description="start, seconds from the start of the clip (= start_ns / 1e9)")
    end_s: float = Field(description="end, seconds from the start of the clip (= end_ns / 1e9)")


class ClassifyResult(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {
        "model_version": "sf1-a9143974", "duration_s": 8.0, "windows": 8,
        "events": [{**Event.model_config["json_schema_extra"]["example"], "site": "upload",
                    "device": "clip", "start_ns": 2000000000, "end_ns": 6000000000,
                    "seq_first": 2, "seq_last": 5, "start": "1970-01-01T00:00:02.000Z",
                    "end": "1970-01-01T00:00:06.000Z", "start_s": 2.0, "end_s": 6.0}],
    }})

    model_version: str = Field(description="version of the model bundle (edge encoder and cloud models)")
    duration_s: float = Field(description="length of the clip after conversion to 16 kHz mono, seconds")
    windows: int = Field(description="1 s classifier windows run over the clip")
    events: list[ClipEvent] = Field(description="events found, in start order")


class Health(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: str = Field(description='"ok"')
    mqtt_connected: bool = Field(description="the ingest's MQTT client is connected and subscribed")
    workers_alive: int = Field(description="ingest worker threads alive")
    queued: int = Field(description="MQTT messages waiting in the ingest queues")
    metrics: dict[str, int] = Field(description="the Redis counters (received, accepted, rejected:<reason>, ...)")


class Readiness(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {
        "status": "not ready", "reason": "mqtt: ingest not connected to the broker",
        "checks": {"mqtt": False, "redis": True, "code_lm": True, "classifier": True},
    }})

    status: str = Field(description='"ready" or "not ready"')
    reason: str = Field("", description="why not ready: every failed check, separated by '; '")
    checks: dict[str, bool] = Field(description="mqtt, ingest (rounds finishing, workers alive), redis, devices (no device's work waiting past cloud.ingest_stuck_after_s), code_lm, classifier: did each check pass")
    warnings: list[str] = Field(default_factory=list, description="ready, but at risk: Redis runs without persistence, or the ingest lags behind capture")


class Device(BaseModel):
    model_config = ConfigDict(extra="allow")

    site: str = Field(description="site id")
    device: str = Field(description="device id")


class Problem(BaseModel):
    detail: str = Field(description="what was wrong with the request")


def parse_time_ns(value: str, name: str = "since") -> int:
    """A point in time as unix ns: digits are unix ns, anything else ISO 8601 (UTC if no zone).

    Raises ValueError with a message naming the parameter."""
    value = value.strip()
    if value.isdigit():
        return int(value)
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is neither unix ns nor ISO 8601 "
                         "(e.g. 2026-01-01T12:00:00Z)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    seconds = int(when.timestamp())  # whole seconds exactly, then the microseconds
    return seconds * NS_PER_SECOND + when.microsecond * 1000


def parse_stream_start(value: str, name: str = "since") -> str:
    """Where an event stream resumes: an entry id as is, or a time (see :func:`parse_time_ns`)
    as the id just before the first entry appended at or after it."""
    value = value.strip()
    if STREAM_ID_RE.fullmatch(value):
        return value
    ms = parse_time_ns(value, name) // 1_000_000
    return f"{ms - 1}-{2**64 - 1}" if ms > 0 else "0-0"  # XREAD returns ids strictly after this
