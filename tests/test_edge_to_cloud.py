"""End to end on real components: edge agent -> real MQTT broker -> Serve app -> real Redis.

Nothing is mocked: the agent runs the shipped ONNX model, publishes through the
session's broker (the machine's Mosquitto when it runs), the Serve app's ingest
consumes it, and the test reads the event back from Redis and over HTTP.
"""

from __future__ import annotations

import time
import uuid
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest

from edge.agent import EdgeAgent
from edge.sources import file_source
from shared_models import bundle, wire
from shared_models.constants import HOP_SAMPLES
from soundfleet.config import EdgeConfig

FIXTURES = Path(__file__).parent / "fixtures"
SITE = "itest"


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what() if callable(what) else what}")


def _stream_wav(mqtt_url: str, device: str, wav: Path, state_dir: Path) -> EdgeAgent:
    config = EdgeConfig(broker_url=mqtt_url, site=SITE, device=device, realtime=False)
    agent = EdgeAgent(config, state_dir=state_dir)
    agent.run(file_source(str(wav), config.frames_per_message * HOP_SAMPLES))
    return agent


@pytest.mark.slow
def test_siren_wav_from_edge_agent_becomes_siren_event_in_redis(cloud_app, mqtt_url, tmp_path, device_id):
    device = device_id("street")
    agent = _stream_wav(mqtt_url, device, FIXTURES / "siren_street.wav", tmp_path)
    assert agent.stats.messages == 8 and agent.stats.frames == 8 * 40

    # events are emitted when they close, so wait for the siren itself, not just any event
    sirens = _wait_for(lambda: cloud_app.store.events(site=SITE, device=device, label="siren"), 60,
                       lambda: f"a siren event (have: {cloud_app.store.events(site=SITE, device=device)})")
    assert len(sirens) == 1
    siren = sirens[0]
    # the siren starts at 2.0 s in the fixture: the event must cover it, in the stream's own time
    start_s = (siren["start_ns"] - agent.t0_ns) / 1e9
    end_s = (siren["end_ns"] - agent.t0_ns) / 1e9
    assert start_s <= 4.0 and end_s >= 3.0, (start_s, end_s)
    assert 0.5 <= siren["score"] <= 1.0
    assert siren["seq_first"] <= siren["seq_last"]
    assert siren["codebook_id"] == agent.encoder.codebook_id
    assert siren["start"].endswith("Z")

    # the raw stream entry in Redis, read without the project's store class
    entries = cloud_app.store.r.xrange(cloud_app.config.key_prefix + "events")
    assert any(f[b"device"].decode() == device and f[b"label"] == b"siren" for _, f in entries)
    device_state = cloud_app.store.r.hgetall(f"{cloud_app.config.key_prefix}dev:{SITE}:{device}")
    assert int(device_state[b"last_seq"]) == agent.stats.last_seq
    assert int(device_state[b"frames"]) == agent.stats.frames

    # and over HTTP
    http = httpx.get(f"{cloud_app.http_url}/v1/events", params={"device": device, "label": "siren"}, timeout=10)
    assert http.status_code == 200 and http.json()[0]["event_id"] == siren["event_id"]
    health = httpx.get(f"{cloud_app.http_url}/healthz", timeout=10).json()
    assert health["status"] == "ok" and health["mqtt_connected"]


@pytest.mark.slow
def test_quiet_room_gives_no_event(cloud_app, mqtt_url, tmp_path, device_id):
    device = device_id("quiet")
    agent = _stream_wav(mqtt_url, device, FIXTURES / "quiet_room.wav", tmp_path)
    key = f"{cloud_app.config.key_prefix}dev:{SITE}:{device}"
    _wait_for(lambda: cloud_app.store.r.hget(key, "status_state") == b"offline", 30, "the offline status")
    _wait_for(lambda: int(cloud_app.store.r.hget(key, "last_seq") or -1) == agent.stats.last_seq, 30, "all frames")
    assert cloud_app.store.events(site=SITE, device=device) == []


def _valid_payload(codebook_id: int, seq: int = 0, top_code: int = 39) -> bytes:
    codes = np.arange(40, dtype=np.uint16)
    codes[-1] = top_code
    return wire.FramesMessage(codebook_id=codebook_id, seq=seq, t_start_ns=time.time_ns(), codes=codes).to_bytes()


def _with_crc(body: bytes) -> bytes:
    return body + zlib.crc32(body).to_bytes(4, "little")


@pytest.mark.slow
def test_bad_payloads_are_counted_and_dead_lettered_without_crashing(cloud_app, mqtt_url, mqtt_client_factory):
    device = f"fuzz-{uuid.uuid4().hex[:6]}"
    codebook_id = bundle.load_manifest(bundle.default_bundle_dir())["codebook_id"]
    good = _valid_payload(codebook_id)
    wrong_version = _with_crc(good[:4] + bytes([9]) + good[5:-4])
    cases = {
        "Truncated": good[:20],
        "ChecksumMismatch": good[:-5] + bytes([good[-5] ^ 0xFF]) + good[-4:],
        "PayloadTooLarge": good + bytes(wire.MAX_PAYLOAD_BYTES),
        "UnsupportedVersion": wrong_version,
        "BadMagic": _with_crc(b"NOPE" + good[4:-4]),
        "WrongCodebook": _valid_payload((codebook_id + 1) % 2**32),
        # the right codebook id, a code past its end: the model would fail on it at every retry
        "CodeOutOfRange": _valid_payload(codebook_id, top_code=bundle.load_manifest(bundle.default_bundle_dir())["codebook_size"]),
    }
    before = cloud_app.store.metrics()
    client = mqtt_client_factory()
    topic = wire.frames_topic(SITE, device)
    for payload in cases.values():
        client.publish(topic, payload, qos=1).wait_for_publish(5)
    client.publish(f"soundfleet/v1/{SITE}/{device}/bogus", b"x", qos=1)  # ignored: not subscribed
    client.publish(topic, _valid_payload(codebook_id, seq=0), qos=1).wait_for_publish(5)

    key = f"{cloud_app.config.key_prefix}dev:{SITE}:{device}"
    _wait_for(lambda: cloud_app.store.r.hget(key, "last_seq") == b"0", 30, "the valid frame after the bad ones")
    after = cloud_app.store.metrics()
    for reason in cases:
        assert after.get(f"rejected:{reason}", 0) - before.get(f"rejected:{reason}", 0) == 1, reason
    letters = cloud_app.store.r.xrange(cloud_app.config.key_prefix + "deadletter")
    mine = [f for _, f in letters if f[b"topic"].decode() == topic]
    assert sorted(f[b"reason"].decode() for f in mine) == sorted(cases)
    assert all(f[b"payload"] for f in mine)

    # a duplicate of the accepted frame is dropped and counted, and the ingest is still healthy
    client.publish(topic, _valid_payload(codebook_id, seq=0), qos=1).wait_for_publish(5)
    _wait_for(lambda: cloud_app.store.metrics().get("duplicates", 0) > after.get("duplicates", 0), 30, "a duplicate")
    health = httpx.get(f"{cloud_app.http_url}/healthz", timeout=10).json()
    assert health["status"] == "ok" and health["workers_alive"] == cloud_app.config.ingest_workers


@pytest.mark.slow
def test_hostile_statuses_cost_only_themselves(cloud_app, mqtt_client_factory, device_id):
    """A status whose JSON would overflow a float, nest past the recursion limit or carry a lone
    surrogate is dead-lettered on its own; the frames beside it in the same round go on."""
    device = device_id("hostile")
    codebook_id = bundle.load_manifest(bundle.default_bundle_dir())["codebook_id"]
    hostile = [b'{"state":"online","uptime_s":' + b"9" * 400 + b"}",
               b'{"state":"online","extra":' + b"[" * 100_000 + b"}",
               b'{"state":"online","model_error":"\\ud800"}']
    client = mqtt_client_factory()
    for payload in hostile:
        client.publish(wire.status_topic(SITE, device), payload, qos=1)
    for seq in range(3):
        client.publish(wire.frames_topic(SITE, device), _valid_payload(codebook_id, seq=seq), qos=1).wait_for_publish(5)
    key = f"{cloud_app.config.key_prefix}dev:{SITE}:{device}"
    _wait_for(lambda: cloud_app.store.r.hget(key, "last_seq") == b"2", 30, "the frames after the hostile statuses")
    letters = cloud_app.store.r.xrange(cloud_app.config.key_prefix + "deadletter")
    mine = [f for _, f in letters if f[b"topic"].decode() == wire.status_topic(SITE, device)]
    assert [f[b"reason"] for f in mine] == [b"InvalidField"] * 3
    assert cloud_app.store.r.hget(key, "status_state") is None  # none of them was taken as a status
    health = httpx.get(f"{cloud_app.http_url}/healthz", timeout=10).json()
    assert health["status"] == "ok" and health["workers_alive"] == cloud_app.config.ingest_workers


@pytest.mark.slow
def test_clearing_a_retained_status_is_not_a_bad_payload(cloud_app, mqtt_client_factory, device_id):
    device = device_id("cleared")
    topic = wire.status_topic(SITE, device)
    before = cloud_app.store.metrics()
    client = mqtt_client_factory()
    online = wire.StatusMessage(state="online", agent_version="test").to_bytes()
    client.publish(topic, online, qos=1, retain=True).wait_for_publish(5)
    client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)  # MQTT's "delete retained"
    # then frames of the same device: one worker takes its messages in order, round after round;
    # seq 1, sent once seq 0 is in, comes in a later round than the clear, so by then the clear was
    # handled (the counter alone could move for another test's device)
    codebook_id = bundle.load_manifest(bundle.default_bundle_dir())["codebook_id"]
    key = f"{cloud_app.config.key_prefix}dev:{SITE}:{device}"
    for seq in (0, 1):
        client.publish(wire.frames_topic(SITE, device), _valid_payload(codebook_id, seq=seq), qos=1).wait_for_publish(5)
        _wait_for(lambda s=seq: cloud_app.store.r.hget(key, "last_seq") == str(s).encode(), 30,
                  f"frame {seq} after the cleared status")
    assert cloud_app.store.metrics().get("status_cleared", 0) > before.get("status_cleared", 0)
    assert cloud_app.store.r.hget(key, "status_state") == b"online"
    letters = cloud_app.store.r.xrange(cloud_app.config.key_prefix + "deadletter")
    assert not [f for _, f in letters if f[b"topic"].decode() == topic]
