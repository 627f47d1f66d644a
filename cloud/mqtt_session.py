"""The ingest's MQTT session: acknowledge a frame only once it is durable.

paho acknowledges a QoS 1 message when ``on_message`` returns, and a clean session
forgets everything the broker had not delivered yet, so an ingest that crashed, stalled
on Redis or fell behind lost frames the edge had already deleted from its spool. Here:

- **Manual acknowledgement in receive order** (`AckSequencer`). ``on_message`` takes a
  ticket for each QoS 1 message; a worker hands a frame's ticket back as soon as the round
  has accepted it into the device log (or dead-lettered it), before the models run, and a
  status's once the round has registered it: each is in Redis by then (a copy the broker
  sends again is dropped as a duplicate).
  The PUBACKs go out in the order the PUBLISHes came in (MQTT 3.1.1 §4.6), so a round
  still in progress holds back the acks of rounds after it, never the other way round.
- **A persistent session under a stable client id** (``clean_session=False``): whatever
  the broker has not had acknowledged (queued or in flight) is kept for the ingest while
  it is down and redelivered when it comes back; `cloud.device_log` drops the copies it
  already has, so redelivery costs a duplicate count, never a second event.
- **The client id comes from a Redis slot lease** (`SessionSlot`): replica k of n holds
  ``ingest:slot:k`` (renewed every second, expiring after ``SLOT_TTL_MS``) and connects as
  that slot's client id. A replica Serve starts in place of a dead one takes the free slot
  and with it the dead replica's session, so the frames the broker queued for it (Mosquitto
  hands shared-subscription messages to offline members too) are processed, not stranded;
  two live replicas never share an id (the broker would throw them off in turn).

A session outlives its cloud on purpose: frames published while the cloud is down wait in
it. `forget_sessions` ends them where a deployment is gone for good (a test, the demo).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis

if TYPE_CHECKING:
    from soundfleet.config import CloudConfig

log = logging.getLogger(__name__)

SLOT_TTL_MS = 10_000  # a dead replica's slot frees after this; its replacement waits at most as long
SLOT_WAIT_S = 0.5  # between attempts to find a free slot

# SET the slot to this replica if it is free or already ours; refresh the expiry. 1 = held.
_CLAIM = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def client_id(key_prefix: str, share_group: str, slot: int) -> str:
    """The MQTT client id of ingest slot ``slot`` of the deployment under ``key_prefix``
    (23 characters at most, the longest MQTT 3.1.1 promises every broker accepts)."""
    digest = hashlib.sha256(f"{key_prefix}\0{share_group}".encode()).hexdigest()[:8]
    return f"sf-ingest-{digest}-{slot}"


class SessionSlot:
    """Which of the deployment's ``replicas`` MQTT identities this replica holds."""

    def __init__(self, r: redis.Redis, key: Callable[..., str], key_prefix: str, share_group: str,
                 replicas: int):
        self.r, self.replicas = r, replicas
        self._key, self._ids = key, (key_prefix, share_group)
        self.owner = uuid.uuid4().hex
        self.slot: int | None = None
        self._claim, self._release = r.register_script(_CLAIM), r.register_script(_RELEASE)

    @property
    def client_id(self) -> str:
        assert self.slot is not None, "claim a slot first"
        return client_id(*self._ids, self.slot)

    def claim(self, timeout_s: float) -> int:
        """Take the lowest free slot, waiting for one to free (a replaced replica's expires)."""
        deadline = time.monotonic() + timeout_s
        while True:
            for slot in range(self.replicas):
                if self._claim(keys=[self._key("ingest", "slot", str(slot))], args=[self.owner, SLOT_TTL_MS]):
                    self.slot = slot
                    return slot
            if time.monotonic() > deadline:
                raise TimeoutError(f"all {self.replicas} ingest session slots stayed taken for {timeout_s:.0f} s "
                                   "(another deployment under the same key prefix?)")
            time.sleep(SLOT_WAIT_S)

    def renew(self) -> bool:
        """Refresh the lease; False if another replica holds the slot now (ours expired)."""
        assert self.slot is not None
        return bool(self._claim(keys=[self._key("ingest", "slot", str(self.slot))], args=[self.owner, SLOT_TTL_MS]))

    def release(self) -> None:
        if self.slot is not None:
            self._release(keys=[self._key("ingest", "slot", str(self.slot))], args=[self.owner])


@dataclass(frozen=True)
class Ticket:
    """One received QoS 1 message waiting for its PUBACK."""

    sequencer: AckSequencer
    index: int


class AckSequencer:
    """PUBACKs in receive order, each sent once its message is durable.

    One per MQTT connection: ``receive`` runs on paho's network thread, ``done`` on the
    workers. Acks of a connection that dropped are never sent on the next one (the
    broker redelivers those messages and they are acknowledged as the copies they are)."""

    def __init__(self, send: Callable[[int, int], object]):
        self._send = send  # (mid, qos) -> paho's Client.ack
        self._lock = threading.Lock()
        self._pending: deque[tuple[int, int, int]] = deque()  # (index, mid, qos), oldest first
        self._durable: set[int] = set()  # indices handed back, not yet acknowledged
        self._next = 0
        self._closed = False
        self.sent = 0

    def receive(self, mid: int, qos: int) -> Ticket | None:
        if qos == 0:
            return None  # nothing to acknowledge
        with self._lock:
            self._pending.append((self._next, mid, qos))
            self._next += 1
            return Ticket(self, self._next - 1)

    def done(self, tickets: list[Ticket]) -> None:
        """These messages are durable: acknowledge them, and everything received before them
        that is durable too."""
        with self._lock:
            head = self._pending[0][0] if self._pending else self._next
            self._durable.update(t.index for t in tickets if t.index >= head)  # not acknowledged yet
            while self._pending and self._pending[0][0] in self._durable and not self._closed:
                index, mid, qos = self._pending.popleft()
                self._durable.discard(index)
                self._send(mid, qos)
                self.sent += 1

    def close(self) -> None:
        """The connection dropped: nothing more goes out on it."""
        with self._lock:
            self._closed = True

    @property
    def waiting(self) -> int:
        """Messages received and not acknowledged yet."""
        with self._lock:
            return len(self._pending)


def acknowledge(tickets: list[Ticket | None]) -> None:
    """Hand each ticket back to its own connection's sequencer."""
    by_sequencer: dict[int, tuple[AckSequencer, list[Ticket]]] = {}
    for ticket in tickets:
        if ticket is not None:
            by_sequencer.setdefault(id(ticket.sequencer), (ticket.sequencer, []))[1].append(ticket)
    for sequencer, own in by_sequencer.values():
        sequencer.done(own)


def forget_sessions(config: CloudConfig) -> None:
    """End a deployment's persistent ingest sessions on the broker (connect as each slot's
    client id with a clean session): for a deployment gone for good, after its app is
    deleted. Frames queued in them are dropped; a session left behind would collect every
    frame on the broker (up to Mosquitto's max_queued_messages) for nobody."""
    from soundfleet.services import mqtt_client

    broker_url = config.broker_url
    for slot in range(config.ingest_replicas):
        client, endpoint = mqtt_client(broker_url, client_id(config.key_prefix, config.ingest_share_group, slot))
        connected = threading.Event()
        client.on_connect = lambda *_, done=connected: done.set()
        client.connect_async(endpoint.host, endpoint.port, keepalive=10)
        client.loop_start()
        try:
            if not connected.wait(10):
                raise ConnectionError(f"cannot reach {broker_url} to end ingest session {slot}")
            client.disconnect()
        finally:
            client.loop_stop()
