"""The wire contract's JSON messages (status, sound events) and MQTT topics: round trips,
units, and a named error for malformed input (frames are in test_wire.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared_models.wire import (
    FRAMES_SUBSCRIPTION,
    MAX_PAYLOAD_BYTES,
    MODELS_EDGE_TOPIC,
    STATUS_SUBSCRIPTION,
    TOPIC_ROOT,
    InvalidField,
    ModelAnnouncement,
    PayloadTooLarge,
    SoundEvent,
    StatusMessage,
    WireError,
    events_topic,
    frames_topic,
    parse_device_topic,
    status_topic,
    validate_name,
)

T0_NS = 1_700_000_000_000_000_000  # 2023-11-14T22:13:20Z
U32_MAX = 2**32 - 1
slow_ok = settings(deadline=None)  # numpy work in a few examples can exceed the 200 ms default


# --- helpers -----------------------------------------------------------------------


def mqtt_matches(topic_filter: str, topic: str) -> bool:
    """Minimal MQTT matching for '+' filters (no '#'), enough to check our subscriptions."""
    levels, filter_levels = topic.split("/"), topic_filter.split("/")
    return len(levels) == len(filter_levels) and all(
        f in ("+", t) for f, t in zip(filter_levels, levels, strict=True)
    )


# --- status JSON ----------------------------------------------------------------------
@given(
    state=st.sampled_from(["online", "offline"]),
    agent_version=st.text(max_size=20),
    model_version=st.text(max_size=20),
    codebook_id=st.integers(0, U32_MAX),
    t_ns=st.integers(0, 2**63 - 1),
    uptime_s=st.floats(0, 1e9),
    spool_depth=st.integers(0, 2**40),
    spool_dropped=st.integers(0, 2**40),
    cpu_percent=st.floats(0, 400),
    rss_mb=st.floats(0, 1e5),
    model_error=st.text(max_size=40),
    callback_errors=st.integers(0, 2**40),
)
def test_status_round_trips_through_json(**fields: object) -> None:
    msg = StatusMessage(**fields)
    data = msg.to_bytes()
    assert StatusMessage.from_bytes(data) == msg
    assert json.loads(data) == fields


def test_last_will_status_is_offline_with_zeroed_heartbeat_fields() -> None:
    data = StatusMessage("offline").to_bytes()
    assert json.loads(data) == {
        "state": "offline", "agent_version": "", "model_version": "", "codebook_id": 0, "t_ns": 0,
        "uptime_s": 0.0, "spool_depth": 0, "spool_dropped": 0, "cpu_percent": 0.0, "rss_mb": 0.0,
        "model_error": "", "callback_errors": 0,
    }  # fmt: skip
    assert StatusMessage.from_bytes(b'{"state": "offline"}') == StatusMessage("offline")


@pytest.mark.parametrize("field,value", [("spool_depth", -1), ("cpu_percent", float("nan")),
                                         ("rss_mb", -0.5), ("uptime_s", True), ("model_error", 3)])
def test_status_rejects_bad_heartbeat_fields(field: str, value: object) -> None:
    with pytest.raises(WireError):
        StatusMessage("online", **{field: value})


# --- model announcement JSON ------------------------------------------------------------
ANNOUNCEMENT = {"model_version": "sf1-abc", "codebook_id": 7, "wire_version": 1, "sha256": "ab" * 32,
                "size": 123, "url": "http://models.local/sf1-abc.tar", "t_ns": 5}


def test_model_announcement_round_trips_through_json() -> None:
    msg = ModelAnnouncement(**ANNOUNCEMENT)
    assert json.loads(msg.to_bytes()) == ANNOUNCEMENT
    assert ModelAnnouncement.from_bytes(msg.to_bytes()) == msg


@pytest.mark.parametrize("field,value", [("sha256", "AB" * 32), ("sha256", "ab" * 31), ("url", "ftp://x/y.tar"),
                                         ("size", 0), ("codebook_id", 2**32), ("model_version", "")])
def test_model_announcement_rejects_bad_fields(field: str, value: object) -> None:
    with pytest.raises(WireError):
        ModelAnnouncement(**{**ANNOUNCEMENT, field: value})


def test_status_ignores_unknown_keys() -> None:
    data = b'{"state": "online", "agent_version": "1.2", "future_field": [1, 2]}'
    assert StatusMessage.from_bytes(data) == StatusMessage("online", agent_version="1.2")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{not json",
        b"\xff\xfe",
        b"[]",
        b'"online"',
        b"{}",
        b'{"agent_version": "1"}',
        b'{"state": "maybe"}',
        b'{"state": ["online"]}',
        b'{"state": "online", "codebook_id": "5"}',
        b'{"state": "online", "codebook_id": -1}',
        b'{"state": "online", "t_ns": 1.5}',
        b'{"state": "online", "agent_version": 3}',
    ],
)
def test_malformed_status_is_invalid_field(data: bytes) -> None:
    with pytest.raises(InvalidField):
        StatusMessage.from_bytes(data)


def test_oversized_json_is_payload_too_large() -> None:
    data = b'{"state": "online", "agent_version": "' + b"x" * MAX_PAYLOAD_BYTES + b'"}'
    with pytest.raises(PayloadTooLarge):
        StatusMessage.from_bytes(data)
    with pytest.raises(PayloadTooLarge):
        SoundEvent.from_bytes(data)


# --- sound event JSON -------------------------------------------------------------------
names = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)


def example_event(**overrides: object) -> SoundEvent:
    fields = {
        "event_id": "4f1c2a",
        "site": "home",
        "device": "kitchen",
        "label": "siren",
        "score": 0.93,
        "start_ns": T0_NS + 123_456_789,
        "end_ns": T0_NS + 2_000_000_000,
        "model_version": "m-2024.1",
        "codebook_id": 0x01020304,
        "seq_first": 10,
        "seq_last": 12,
    }
    return SoundEvent(**(fields | overrides))


@given(
    event_id=st.text(min_size=1, max_size=40),
    site=names,
    device=names,
    label=st.sampled_from(["siren", "smoke_alarm", "glass_break"]),
    score=st.floats(0.0, 1.0),
    start_ns=st.integers(0, 2**62),
    duration_ns=st.integers(0, 2**61),
    model_version=st.text(max_size=20),
    codebook_id=st.integers(0, U32_MAX),
    seq_first=st.integers(0, U32_MAX),
    seq_last=st.integers(0, U32_MAX),
)
def test_sound_event_round_trips_through_json(duration_ns: int, **fields: object) -> None:
    event = SoundEvent(end_ns=fields["start_ns"] + duration_ns, **fields)
    assert SoundEvent.from_bytes(event.to_bytes()) == event
    assert SoundEvent.from_dict(event.to_dict()) == event
    decoded = json.loads(event.to_bytes())
    assert decoded["start_ns"] == event.start_ns and decoded["end_ns"] == event.end_ns
    for iso_key, ns in (("start", event.start_ns), ("end", event.end_ns)):
        assert decoded[iso_key].endswith("Z") and len(decoded[iso_key].split(".")[1]) == 4
        parsed = datetime.fromisoformat(decoded[iso_key])  # Python 3.11 reads the "Z"
        epoch_ms = (parsed - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
        assert epoch_ms == ns // 1_000_000  # milliseconds, floored


def test_sound_event_json_has_iso_and_ns_times() -> None:
    body = json.loads(example_event().to_bytes())
    assert body["start"] == "2023-11-14T22:13:20.123Z"
    assert body["end"] == "2023-11-14T22:13:22.000Z"
    assert body["start_ns"] == T0_NS + 123_456_789
    assert set(body) == {
        "event_id", "site", "device", "label", "score", "start", "end", "start_ns", "end_ns",
        "model_version", "codebook_id", "seq_first", "seq_last",
    }  # fmt: skip
    zero = example_event(start_ns=0, end_ns=999_999)
    assert (zero.to_dict()["start"], zero.to_dict()["end"]) == (
        "1970-01-01T00:00:00.000Z",
        "1970-01-01T00:00:00.000Z",
    )


def test_sound_event_from_dict_ignores_the_derived_iso_fields() -> None:
    tampered = example_event().to_dict() | {"start": "1999-01-01T00:00:00.000Z", "extra": 1}
    assert SoundEvent.from_dict(tampered) == example_event()
    plain = {k: v for k, v in example_event().to_dict().items() if k not in ("start", "end")}
    assert SoundEvent.from_dict(plain) == example_event()


@pytest.mark.parametrize(
    "overrides",
    [
        {"score": 1.5},
        {"score": -0.1},
        {"score": float("nan")},
        {"score": True},
        {"score": "0.9"},
        {"end_ns": T0_NS},  # before start_ns
        {"start_ns": -1},
        {"site": "a/b"},
        {"device": "+"},
        {"event_id": ""},
        {"label": ""},
        {"seq_last": 2**32},
        {"codebook_id": -1},
    ],
    ids=repr,
)
def test_invalid_sound_event_fields_are_rejected(overrides: dict) -> None:
    with pytest.raises(InvalidField):
        example_event(**overrides)


def test_sound_event_accepts_numpy_numbers_and_stores_python_ones() -> None:
    event = example_event(score=np.float32(0.5), codebook_id=np.uint32(7), seq_first=np.int64(1))
    assert type(event.score) is float and event.score == 0.5
    assert type(event.codebook_id) is int and type(event.seq_first) is int
    assert SoundEvent.from_bytes(event.to_bytes()) == event


def test_sound_event_with_missing_fields_is_invalid_field() -> None:
    body = example_event().to_dict()
    del body["label"]
    with pytest.raises(InvalidField, match="label"):
        SoundEvent.from_dict(body)
    with pytest.raises(InvalidField):
        SoundEvent.from_bytes(b"{bad json")


# --- topics -----------------------------------------------------------------------------
def test_topic_builders() -> None:
    assert frames_topic("home", "kitchen-1") == "soundfleet/v1/home/kitchen-1/frames"
    assert status_topic("home", "kitchen-1") == "soundfleet/v1/home/kitchen-1/status"
    assert events_topic("home", "kitchen-1") == "soundfleet/v1/home/kitchen-1/events"
    assert TOPIC_ROOT == "soundfleet/v1"
    assert FRAMES_SUBSCRIPTION == "soundfleet/v1/+/+/frames"
    assert STATUS_SUBSCRIPTION == "soundfleet/v1/+/+/status"
    assert MODELS_EDGE_TOPIC == "soundfleet/v1/models/edge"
    assert mqtt_matches(FRAMES_SUBSCRIPTION, frames_topic("a", "b"))
    assert mqtt_matches(STATUS_SUBSCRIPTION, status_topic("a", "b"))
    assert not mqtt_matches(FRAMES_SUBSCRIPTION, MODELS_EDGE_TOPIC)


@pytest.mark.parametrize(
    "bad", ["", "+", "#", "a/b", "a+", "kitchen#1", "x" * 65, "café", "a b", "a\n", None, 5]
)
def test_topic_builders_reject_bad_names(bad: object) -> None:
    for build in (frames_topic, status_topic, events_topic):
        with pytest.raises(InvalidField):
            build(bad, "device")
        with pytest.raises(InvalidField):
            build("site", bad)
    with pytest.raises(InvalidField):
        validate_name(bad)


def test_longest_valid_name_is_64_chars() -> None:
    assert validate_name("x" * 64) == "x" * 64


@given(site=names, device=names, kind=st.sampled_from(["frames", "status", "events"]))
def test_parse_device_topic_round_trips(site: str, device: str, kind: str) -> None:
    build = {"frames": frames_topic, "status": status_topic, "events": events_topic}[kind]
    assert parse_device_topic(build(site, device)) == (site, device, kind)


@pytest.mark.parametrize(
    "topic",
    [
        MODELS_EDGE_TOPIC,
        "soundfleet/v2/home/kitchen/frames",
        "soundfleet/v1/home/kitchen/frames/extra",
        "soundfleet/v1/home/kitchen/logs",
        "soundfleet/v1/+/kitchen/frames",
        "soundfleet/v1//kitchen/frames",
        "soundfleet/v1/home/kitchen/",
        "/soundfleet/v1/home/kitchen/frames",
        "",
        None,
    ],
)
def test_parse_device_topic_rejects_other_shapes(topic: object) -> None:
    with pytest.raises(InvalidField):
        parse_device_topic(topic)
