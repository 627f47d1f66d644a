"""Hostile input costs only itself: the decoders raise named errors for anything the network
can send, and a callback that raises does not stop paho's network thread.

Regression tests for the durable-acknowledgement issue's finding 2: before, a deeply nested
JSON raised RecursionError, a 400-digit number OverflowError / ValueError, and a lone
surrogate was accepted and crashed redis-py later; a raising handler killed the link's thread."""

from __future__ import annotations

import logging
import threading
import time
import uuid

import pytest

from edge.link import BrokerLink, LinkSettings
from shared_models import wire
from shared_models.callbacks import CallbackGuard
from soundfleet.fuzz import fuzz

DECODERS = (wire.StatusMessage, wire.ModelAnnouncement, wire.SoundEvent)
HOSTILE = {
    "400-digit float field": b'{"state":"online","uptime_s":' + b"9" * 400 + b"}",
    "5000-digit integer": b'{"state":"online","codebook_id":' + b"1" * 5000 + b"}",
    "float overflow": b'{"state":"online","rss_mb":1e999}',
    "NaN": b'{"state":"online","cpu_percent":NaN}',
    "nesting past the recursion limit": b'{"state":"online","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "lone surrogate": b'{"state":"online","agent_version":"\\ud800"}',
}


@pytest.mark.parametrize("decoder", DECODERS, ids=lambda d: d.__name__)
@pytest.mark.parametrize("payload", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_json_raises_a_named_wire_error(decoder, payload):
    with pytest.raises(wire.WireError):
        decoder.from_bytes(payload)


def test_a_huge_integer_from_a_dict_is_refused_without_printing_it():
    with pytest.raises(wire.InvalidField, match="bit integer"):
        wire.StatusMessage.from_dict({"state": "online", "uptime_s": 10**5000})


def test_fuzzed_payloads_raise_only_named_errors():
    """A seeded few thousand mutations per decoder (the benchmark runs 100,000): every input is
    either accepted and re-encodes, or raises a WireError; both outcomes occur for each."""
    for report in fuzz(2000, seed=1):
        assert report.findings == {}, (report.decoder, report.examples)
        assert report.accepted > 0 and sum(report.rejected.values()) > 0, report.to_dict()


def test_the_guard_counts_every_exception_and_logs_each_kind_once(caplog):
    guard = CallbackGuard(logging.getLogger("test.guard"))

    def handler(value):
        if value < 0:
            raise ValueError("negative")
        if value == 0:
            raise ZeroDivisionError("zero")
        return value * 2

    wrapped = guard.wrap(handler)
    with caplog.at_level(logging.ERROR, logger="test.guard"):
        results = [wrapped(v) for v in (1, -1, -2, 0, 0, 3)]
    assert results == [2, None, None, None, None, 6]
    assert guard.errors == 4
    logged = [r for r in caplog.records if r.name == "test.guard"]
    assert sorted(r.getMessage().split(" raised ")[1].split(" ")[0] for r in logged) == ["ValueError", "ZeroDivisionError"]


def test_a_raising_handler_leaves_the_link_alive(mqtt_url, mqtt_client_factory):
    """On the real broker: three messages make the subscription handler raise; the fourth still
    arrives, and the link still publishes and gets its PUBACKs."""
    topic = f"soundfleet/test/poison/{uuid.uuid4().hex[:8]}"
    received: list[bytes] = []
    got_good = threading.Event()

    def handler(payload: bytes) -> None:
        if payload.startswith(b"bad"):
            raise RecursionError("what a hostile payload does to a naive decoder")
        received.append(payload)
        got_good.set()

    acked: list[object] = []
    link = BrokerLink(LinkSettings(broker_url=mqtt_url, client_id=f"test-poison-{uuid.uuid4().hex[:8]}"),
                      will=lambda: (f"{topic}/status", b"gone"), on_ack=acked.append,
                      subscriptions={topic: handler})
    try:
        assert link.connect()
        time.sleep(0.3)  # the subscription is in place
        sender = mqtt_client_factory()
        for payload in (b"bad 1", b"bad 2", b"bad 3", b"good"):
            sender.publish(topic, payload, qos=1).wait_for_publish(5)
        assert got_good.wait(10), "the message after the raising ones never arrived"
        assert link.publish(f"{topic}/out", b"still here", token="after")
        deadline = time.monotonic() + 10
        while not acked and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        link.close()
    assert received == [b"good"]
    assert link.callback_guard.errors == 3
    assert acked == ["after"]
