"""Where the agent's frames messages go: the disk spool and the broker, or stdout (--dry-run).

`SpoolingPublisher` is write-ahead: `submit` appends the payload to the
`Spool` and returns at once (the audio thread never waits on the network). A
sender thread owns the `BrokerLink`: it connects with backoff and jitter,
publishes spooled records in sequence order with at most ``max_inflight``
unacknowledged, and acks each record in the spool when its PUBACK arrives.
After a reconnect or a restart it replays from the first unacked record, so
the broker sees every frame in order; a frame is only repeated if its PUBACK
was lost, and the cloud drops repeated sequence numbers. The same thread
publishes the retained status: "online" with each session, a heartbeat every
``heartbeat_s``, "offline" on a clean stop (the MQTT will covers a crash).

`DryRunPublisher` prints what would be sent, one JSON line per message.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol, TextIO

from edge.link import BrokerLink, LinkSettings
from edge.spool import Spool
from shared_models.callbacks import CallbackGuard
from shared_models.wire import FramesMessage
from soundfleet.services.urls import redact_url

log = logging.getLogger(__name__)

SEND_POLL_S = 0.2  # the sender wakes at least this often (acks and appends wake it sooner)
OFFLINE_ACK_TIMEOUT_S = 5.0


class Publisher(Protocol):
    def start(self) -> None: ...
    def submit(self, seq: int, payload: bytes) -> bool: ...
    def drain(self, timeout_s: float) -> int: ...
    def request_status(self) -> None: ...
    def close(self) -> None: ...


class SpoolingPublisher:
    def __init__(
        self,
        spool: Spool,
        link_settings: LinkSettings,
        *,
        frames_topic: str,
        status_topic: str,
        status: Callable[[str], bytes],
        heartbeat_s: float,
        subscriptions: dict[str, Callable[[bytes], None]] | None = None,
        callback_guard: CallbackGuard | None = None,
    ):
        self.spool = spool
        self.frames_topic = frames_topic
        self.status_topic = status_topic
        self._status = status
        self.heartbeat_s = heartbeat_s
        self.link = BrokerLink(
            link_settings,
            will=lambda: (status_topic, status("will")),  # per session: names the model running then
            on_ack=self._on_ack,
            subscriptions=subscriptions,
            callback_guard=callback_guard,
        )
        self._max_inflight = link_settings.max_inflight
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._status_due = threading.Event()
        self._offline_acked = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-sender", daemon=True)
        self._cursor: int | None = None  # next seq to hand to the session; None = replay from first unacked
        self._last_heartbeat = 0.0
        self.published = 0  # records handed to a session (replays included)
        self.acked = 0

    # --- called by the agent ----------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, seq: int, payload: bytes) -> bool:
        """Append to the spool (the write-ahead step) and wake the sender; False if the spool
        could not keep it (disk full and nothing left to drop: counted as dropped)."""
        kept = self.spool.append(seq, payload)
        self._wake.set()
        return kept

    def request_status(self) -> None:
        """Publish the status at the next chance (e.g. after a model swap)."""
        self._status_due.set()
        self._wake.set()

    def drain(self, timeout_s: float) -> int:
        """Wait until the broker acked everything spooled; returns how many are still unacked."""
        deadline = time.monotonic() + timeout_s
        while self.spool.stats().depth and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.spool.stats().depth

    def close(self) -> None:
        """Stop the sender; retained "offline" if connected (so the will does not fire); keep
        whatever is unacked in the spool for the next start."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        if self.link.connected:
            self._offline_acked.clear()
            if self.link.publish(self.status_topic, self._status("offline"), retain=True, token="offline"):
                self._offline_acked.wait(OFFLINE_ACK_TIMEOUT_S)
        self.link.close()
        self.spool.close()

    # --- the sender thread ------------------------------------------------------------
    def _run(self) -> None:
        """Keep the sender alive whatever happens: a bug here must not silently stop delivery
        while the audio thread keeps spooling."""
        while not self._stop.is_set():
            try:
                self._send_loop()
            except Exception:
                log.exception("edge sender failed; restarting it with a fresh session")
                self.link.close()
                self._stop.wait(self.link.next_delay())

    def _send_loop(self) -> None:
        outage_logged = False
        while not self._stop.is_set():
            if not self.link.connected:
                if self.link.connect():
                    log.info("connected to %s; %d spooled messages to send",
                             redact_url(self.link.settings.broker_url), self.spool.stats().depth)
                    outage_logged = False
                    self._cursor = None
                    self._publish_status("online")
                    continue
                delay = self.link.next_delay()
                if not outage_logged:
                    log.warning("%s; spooling to disk, retrying with backoff", self.link.last_error)
                    outage_logged = True
                log.debug("reconnect in %.1f s (%s)", delay, self.link.last_error)
                self._stop.wait(delay)
                continue
            self._send_window()
            now = time.monotonic()
            if self._status_due.is_set() or now - self._last_heartbeat >= self.heartbeat_s:
                self._publish_status("online")
            self._wake.wait(SEND_POLL_S)
            self._wake.clear()

    def _send_window(self) -> None:
        if self._cursor is None:
            self._cursor = self.spool.first_unacked()
            if self._cursor is None:
                return
        room = self._max_inflight - self.link.in_flight()
        if room <= 0:
            return
        for seq, payload in self.spool.read_from(self._cursor, room):
            if not self.link.publish(self.frames_topic, payload, token=seq):
                return  # the session just dropped; the next one replays from the spool
            self._cursor = seq + 1
            self.published += 1

    def _publish_status(self, state: str) -> None:
        self._status_due.clear()
        self._last_heartbeat = time.monotonic()
        self.link.publish(self.status_topic, self._status(state), retain=True, token="status")

    def _on_ack(self, token: object) -> None:  # paho's network thread
        if isinstance(token, int):
            self.spool.ack(token)
            self.acked += 1
            self._wake.set()
        elif token == "offline":
            self._offline_acked.set()


class DryRunPublisher:
    """Prints each message as a JSON line instead of sending it; touches no broker and no spool."""

    def __init__(self, out: TextIO, frames_topic: str):
        self.out = out
        self.frames_topic = frames_topic

    def start(self) -> None:
        pass

    def submit(self, seq: int, payload: bytes) -> bool:
        message = FramesMessage.from_bytes(payload)
        silent = message.silent
        line = {
            "topic": self.frames_topic,
            "seq": message.seq,
            "t_start_ns": message.t_start_ns,
            "codebook_id": message.codebook_id,
            "frames": message.frame_count,
            "silent_frames": int(silent.sum()) if silent is not None else 0,
            "payload_bytes": len(payload),
            "loudness": message.loudness_dbfs is not None,
            "embeddings": message.embeddings is not None,
            "codes": [int(c) for c in message.codes],
        }
        self.out.write(json.dumps(line) + "\n")
        self.out.flush()
        return True

    def drain(self, timeout_s: float) -> int:
        return 0

    def request_status(self) -> None:
        pass

    def close(self) -> None:
        pass
