"""The broker and Redis configs the project ships (infra/) keep what they hold across a crash.

The outage tests elsewhere (test_edge_delivery, test_edge_status, test_redis_restart) run their
own servers from these same files (conftest's OwnMosquitto / OwnRedis), with only the port, the
data directory, the user and (Mosquitto) the autosave interval changed."""

from __future__ import annotations

import signal
import threading
import time
import uuid

import paho.mqtt.client as mqtt

from cloud.store import CloudStore, persistence_warning
from soundfleet.services.urls import parse_mqtt_url

QUEUED = 5_000  # above Mosquitto's default max_queued_messages (1,000): the rest would be dropped


def _session(url: str, client_id: str, received: list[bytes] | None = None) -> mqtt.Client:
    """A persistent session (clean_session False), connected, loop running."""
    endpoint = parse_mqtt_url(url)
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         clean_session=False, protocol=mqtt.MQTTv311)
    connected = threading.Event()
    client.on_connect = lambda *a: connected.set()
    if received is not None:
        client.on_message = lambda c, u, msg: received.append(bytes(msg.payload))
    client.connect(endpoint.host, endpoint.port, keepalive=30)
    client.loop_start()
    assert connected.wait(10), f"no CONNACK from {url}"
    return client


def _close(client: mqtt.Client) -> None:
    client.disconnect()
    client.loop_stop()


def test_frames_queued_for_an_offline_session_survive_a_broker_crash(own_mosquitto):
    """The cloud ingest's session while it is down: 5,000 QoS 1 messages queue in the broker,
    the broker is SIGKILLed after an autosave, and all of them arrive, in order, after it is back."""
    topic = f"soundfleet/test/durable/{uuid.uuid4().hex[:8]}"
    ingest_id = f"test-ingest-{uuid.uuid4().hex[:8]}"
    subscriber = _session(own_mosquitto.url, ingest_id)
    subscriber.subscribe(topic, qos=1)
    time.sleep(0.3)
    _close(subscriber)  # the session and its subscription stay on the broker

    publisher = _session(own_mosquitto.url, f"test-pub-{uuid.uuid4().hex[:8]}")
    infos = [publisher.publish(topic, seq.to_bytes(4, "little"), qos=1) for seq in range(QUEUED)]
    for info in infos:
        info.wait_for_publish(10)
    _close(publisher)
    time.sleep(2.5)  # past the (test's 1 s) autosave interval
    own_mosquitto.process.send_signal(signal.SIGKILL)  # a crash: no save on the way out
    own_mosquitto.process.wait(10)
    own_mosquitto.start()

    received: list[bytes] = []
    subscriber = _session(own_mosquitto.url, ingest_id, received)
    try:
        deadline = time.monotonic() + 30
        while len(received) < QUEUED and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        _close(subscriber)
    assert [int.from_bytes(p, "little") for p in received] == list(range(QUEUED))


def test_the_shipped_redis_config_persists_and_the_store_tells_when_it_does_not(own_redis):
    """infra/redis/redis.conf runs with an append-only file; without one (snapshots only, or
    nothing) the store says so, and what the operator then reads names the risk and the fix."""
    store = CloudStore(own_redis.url, "test:persist:")
    assert store.persistence() == "aof"
    store.r.config_set("appendonly", "no")
    assert store.persistence() == "rdb"  # the config's save points are still there
    store.r.config_set("save", "")
    assert store.persistence() == "none"
    assert "forgets every device's last seq" in persistence_warning("none")
    assert "appendonly yes" in persistence_warning("rdb")

