"""The agent's MQTT connection: one paho session at a time, our own reconnect loop.

Why not paho's built-in reconnect: on reconnect paho re-sends every QoS 1
message it still holds, in its own order, racing the spool's ordered replay
(and a SIGKILLed process loses paho's memory anyway). Here each connection is
a fresh paho client; when it drops, the client and whatever it held are thrown
away and the spool, the single source of truth, replays from its first
unacknowledged record. Reconnects back off exponentially with jitter, so a
fleet that lost its broker does not reconnect in lock-step when it returns.

PUBACKs arrive on paho's network thread, possibly before ``publish`` has even
returned the message id to the sender. `publish` therefore never holds a lock
while calling paho (paho calls ``on_publish`` with its own mutex held, so that
would deadlock); an ack for a mid not yet mapped waits in ``_early_acks``.

Only the network thread writes to the socket. By default paho's ``publish`` writes
the packet itself, in the caller's thread, when no ``loop_start`` thread exists, while
``loop`` in our network thread writes too; both take packets off paho's one queue
without a lock, so a thread preempted between taking packet k and sending it lets the
other send k+1 first, and the broker gets frames out of order. A (no-op)
``on_socket_register_write`` makes ``publish`` only queue the packet and wake the
network thread through paho's socketpair.
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt

from shared_models.callbacks import CallbackGuard
from soundfleet.services.urls import parse_mqtt_url, redact_url

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0  # TCP + TLS + CONNACK
KEEPALIVE_S = 30


@dataclass(frozen=True)
class LinkSettings:
    """How to reach and log in to the broker (from EdgeConfig)."""

    broker_url: str
    client_id: str
    username: str = ""  # overrides the URL's user:pass@ when set
    password: str = ""
    tls_ca_file: str = ""  # CA bundle for mqtts:// (empty = the system's trust store)
    tls_cert_file: str = ""  # client certificate (mutual TLS), optional
    tls_key_file: str = ""
    tls_insecure: bool = False  # skip hostname verification (self-signed test brokers only)
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0
    max_inflight: int = 32


def backoff_delays(min_s: float, max_s: float, rng: random.Random | None = None):
    """Endless reconnect delays: exponential from ``min_s`` capped at ``max_s``, each with
    "equal jitter" (half fixed, half uniform), so clients spread out but never hammer."""
    rng = rng or random.Random()
    attempt = 0
    while True:
        ceiling = min(max_s, min_s * 2**attempt)
        yield ceiling / 2 + rng.uniform(0, ceiling / 2)
        attempt = min(attempt + 1, 32)


def _network_thread_writes(client, userdata, sock) -> None:
    """paho asks for the socket to be watched for writing: `BrokerLink._network_loop` always does
    (``loop`` selects on it while paho has data queued), so there is nothing to register."""


class BrokerLink:
    """Connect, publish with ack callbacks, subscribe, and report drops; never reconnects
    by itself: the owner calls `connect` again (after `next_delay`) when `connected` is False."""

    def __init__(
        self,
        settings: LinkSettings,
        *,
        will: Callable[[], tuple[str, bytes]],
        on_ack: Callable[[object], None],
        on_connect: Callable[[], None] | None = None,
        subscriptions: dict[str, Callable[[bytes], None]] | None = None,
        callback_guard: CallbackGuard | None = None,
    ):
        self.settings = settings
        self.endpoint = parse_mqtt_url(settings.broker_url)
        self._will = will
        self._on_ack = on_ack
        self._on_connect_hook = on_connect
        self._subscriptions = subscriptions or {}
        self._client: mqtt.Client | None = None
        self._connected = threading.Event()
        self._connack = threading.Event()  # any CONNACK (or a dead socket) ends a connect attempt
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pending: dict[int, object] = {}  # mid -> token given to publish
        self._early_acks: set[int] = set()
        self._delays = backoff_delays(settings.reconnect_min_s, settings.reconnect_max_s)
        self.connects = 0
        self.failures = 0
        # every paho callback goes through it; .errors counts the exceptions paho's thread was spared
        self.callback_guard = callback_guard or CallbackGuard(log)
        self.last_error = ""

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def next_delay(self) -> float:
        return next(self._delays)

    # --- connection -----------------------------------------------------------------
    def connect(self) -> bool:
        """One attempt: True once the broker accepted the session (CONNACK success)."""
        self._drop_client()
        client = self._new_client()
        self._connack.clear()
        try:
            client.connect(self.endpoint.host, self.endpoint.port, keepalive=KEEPALIVE_S)
        except (OSError, ValueError) as exc:  # refused, DNS, TLS handshake (ssl.SSLError), ...
            return self._failed(f"cannot reach MQTT broker at {redact_url(self.settings.broker_url)}: {exc}")
        self._client = client
        self._thread = threading.Thread(target=self._network_loop, args=(client,), name="mqtt-link", daemon=True)
        self._thread.start()
        if not self._connack.wait(CONNECT_TIMEOUT_S) or not self.connected:
            reason = self.last_error or f"no CONNACK from {redact_url(self.settings.broker_url)} within {CONNECT_TIMEOUT_S:.0f} s"
            self._drop_client()
            return self._failed(reason)
        self.connects += 1
        self.last_error = ""
        self._delays = backoff_delays(self.settings.reconnect_min_s, self.settings.reconnect_max_s)
        return True

    def _network_loop(self, client: mqtt.Client) -> None:
        """paho's I/O for one session; ends when the session drops (paho's own loop_forever
        would reconnect and re-send behind the spool's back)."""
        while self._client is client:
            if client.loop(timeout=0.2) != mqtt.MQTT_ERR_SUCCESS:
                self._connected.clear()
                self._connack.set()
                return

    def _failed(self, reason: str) -> bool:
        self.failures += 1
        self.last_error = reason
        return False

    def _new_client(self) -> mqtt.Client:
        s = self.settings
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=s.client_id, protocol=mqtt.MQTTv311)
        username = s.username or self.endpoint.username
        if username:
            client.username_pw_set(username, s.password or self.endpoint.password)
        if self.endpoint.tls:
            client.tls_set(
                ca_certs=s.tls_ca_file or None,
                certfile=s.tls_cert_file or None,
                keyfile=s.tls_key_file or None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
            client.tls_insecure_set(s.tls_insecure)
        client.max_inflight_messages_set(s.max_inflight)
        client.max_queued_messages_set(0)  # unbounded in paho; our window bounds it
        topic, payload = self._will()  # per session: it names the model running now
        client.will_set(topic, payload, qos=1, retain=True)
        guard = self.callback_guard.wrap
        client.on_connect = guard(self._handle_connect)
        client.on_disconnect = guard(self._handle_disconnect)
        client.on_publish = guard(self._handle_publish)
        client.on_message = guard(self._handle_message)
        # publish() only queues; _network_loop (woken by paho's socketpair) does every write
        client.on_socket_register_write = _network_thread_writes
        return client

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            # e.g. "Not authorized": wrong username/password; retried with backoff (it may be rotated)
            self.last_error = f"broker {redact_url(self.settings.broker_url)} refused the connection: {reason_code}"
            log.debug("%s", self.last_error)  # the sender logs it once per outage
            self._connack.set()
            return
        for topic in self._subscriptions:
            client.subscribe(topic, qos=1)
        self._connected.set()
        self._connack.set()
        if self._on_connect_hook:
            self._on_connect_hook()

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        if was_connected and reason_code != 0:
            log.warning("lost the broker (%s); frames go to the spool until it is back", reason_code)

    def _drop_client(self) -> None:
        """Forget the current session and every message it held (the spool still has them)."""
        client, self._client = self._client, None
        self._connected.clear()
        with self._lock:
            self._pending.clear()
            self._early_acks.clear()
        if client is None:
            return
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)  # its loop ends within one 0.2 s iteration
        client.disconnect()  # best effort: a DISCONNECT packet, so a clean stop does not fire the will
        client.loop(timeout=0.05)

    def close(self) -> None:
        self._drop_client()

    # --- messages -------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes, *, retain: bool = False, token: object = None) -> bool:
        """Hand one QoS 1 message to the session; ``on_ack(token)`` follows its PUBACK.
        False when there is no session (the caller keeps the message)."""
        client = self._client
        if client is None or not self.connected:
            return False
        info = client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return False
        with self._lock:
            if info.mid in self._early_acks:
                self._early_acks.discard(info.mid)
                acked = True
            else:
                self._pending[info.mid] = token
                acked = False
        if acked:
            self._on_ack(token)
        return True

    def in_flight(self) -> int:
        with self._lock:
            return len(self._pending)

    def _handle_publish(self, client, userdata, mid, reason_code, properties) -> None:
        if client is not self._client:
            return  # a PUBACK for a session we already dropped
        with self._lock:
            if mid not in self._pending:
                self._early_acks.add(mid)
                return
            token = self._pending.pop(mid)
        self._on_ack(token)

    def _handle_message(self, client, userdata, message) -> None:
        handler = self._subscriptions.get(message.topic)
        if handler is not None:
            handler(bytes(message.payload))
