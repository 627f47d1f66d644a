"""MQTT ingest: frames and status from the fleet into Redis, the models and events.

Ray Serve has no MQTT ingress, so this deployment runs its own paho client.
With ``ingest_replicas`` > 1 every replica joins one MQTT shared subscription
(``$share/<group>/...``) and the broker splits the fleet's messages between
them; `cloud.device_log` puts each device's frames back in order, exactly
once, whichever replica received them. paho's network thread only parses the
topic and hands the message to one of ``ingest_workers`` threads, chosen by
device; the queues are bounded, so a burst blocks paho (and with it TCP reads
from the broker) instead of growing memory.

Each worker: decode (bad payloads -> dead letter, counted) -> accept into the
device log (duplicates dropped, late frames reordered; frames the edge's
loudness gate sent as silent enter as the bundle's silence code) -> under the
device's lease: code LM -> classifier -> event logic -> one atomic commit
(context, event state, events) -> events on MQTT. A model call that fails (a
replica died) is retried: the item stays at the head of the device's work
list until it is committed.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
import uuid
import zlib
from dataclasses import dataclass

import numpy as np
import paho.mqtt.client as mqtt
from ray import serve

from cloud import events as event_logic
from cloud.archive import ArchiveWriter
from cloud.device_log import DeviceLog, Lease, WorkItem
from cloud.homeassistant import DiscoveryPublisher
from cloud.store import CloudStore
from shared_models import bundle
from shared_models.constants import FRAME_DURATION_NS
from shared_models.wire import (
    FRAMES_SUBSCRIPTION,
    STATUS_SUBSCRIPTION,
    FramesMessage,
    SoundEvent,
    StatusMessage,
    WireError,
    events_topic,
    parse_device_topic,
)
from soundfleet.config import CloudConfig
from soundfleet.services import mqtt_client

log = logging.getLogger(__name__)

STOP = object()
PEEK_ITEMS = 8  # work items read per round trip while draining a device
SWEEP_S = 1.0  # how often a replica looks for work a dead replica left behind
MODEL_RETRY_S = 0.5  # wait before retrying a failed model call (Serve is restarting a replica)


@dataclass
class Inbound:
    topic: str
    payload: bytes
    received_ns: int


@dataclass
class Drain:
    """Work on a device's log that no message of this replica will trigger (the sweeper's)."""

    site: str
    device: str


def context_codes(message: FramesMessage, silence_code: int) -> np.ndarray:
    """(N,) codes for the device context and the code LM: the bundle's own code for digital
    silence where the edge's loudness gate sent no code (wire.SILENT_CODE never goes further)."""
    if message.silent is None:
        return message.codes
    return np.where(message.silent, silence_code, message.codes).astype(np.uint16)  # (N,)


EVENT_KNOBS = ("on_threshold", "off_threshold", "min_windows", "hold_windows", "cooldown_s")


def label_policies(config: CloudConfig, manifest: dict, live: dict | None = None) -> dict[str, event_logic.EventPolicy]:
    """One policy per label of the bundle.

    Precedence: the bundle's calibrated per-label thresholds, then the config's, then ``live``
    (the deployment's Serve ``user_config``, changeable at runtime), whose ``on_threshold`` may
    be one number or ``{label: number}``. Unknown knobs or labels are a ValueError."""
    live = dict(live or {})
    unknown = sorted(set(live) - set(EVENT_KNOBS))
    if unknown:
        raise ValueError(f"unknown event-logic settings {unknown}; known: {', '.join(EVENT_KNOBS)}")
    live_on = live.get("on_threshold")
    if isinstance(live_on, dict) and (bad := sorted(set(live_on) - set(manifest["labels"]))):
        raise ValueError(f"on_threshold for unknown labels {bad}; the bundle's labels: {manifest['labels']}")
    policies = {}
    for label in manifest["labels"]:
        on = config.on_threshold if config.on_threshold is not None else manifest.get("thresholds", {}).get(label, 0.5)
        if live_on is not None:
            on = live_on.get(label, on) if isinstance(live_on, dict) else live_on
        off = live.get("off_threshold", config.off_threshold)
        policy = event_logic.EventPolicy(
            on_threshold=float(on),
            off_threshold=min(float(off), float(on)),
            min_windows=int(live.get("min_windows", config.min_windows)),
            hold_windows=int(live.get("hold_windows", config.hold_windows)),
            cooldown_ns=int(float(live.get("cooldown_s", config.cooldown_s)) * 1e9),
        )
        if not 0 < policy.off_threshold <= policy.on_threshold < 1 or policy.min_windows < 1 or policy.hold_windows < 0:
            raise ValueError(f"bad event-logic settings for {label}: {policy}")
        policies[label] = policy
    return policies


@serve.deployment(num_replicas=1)
class Ingest:
    def __init__(self, config: CloudConfig, bundle_dir: str, code_lm, classifier):
        self.config = config
        self.manifest = bundle.verify_bundle(bundle_dir)
        self.silence_code = bundle.silence_code(bundle_dir)
        self.store = CloudStore(config.redis_url, config.key_prefix, config.events_maxlen)
        self.log = DeviceLog(self.store.r, self.store.key, config.events_maxlen,
                             reorder_window_ms=int(config.reorder_window_s * 1000), max_pending=config.max_pending)
        self.code_lm, self.classifier = code_lm, classifier
        self.window = self.manifest["classifier_config"]["window_frames"]
        self.context = self.manifest["code_lm_config"]["context_frames"]
        self.policies = label_policies(config, self.manifest)
        self.discovery = (DiscoveryPublisher(self.manifest["labels"], prefix=config.ha_discovery_prefix)
                          if config.ha_discovery_prefix else None)
        self.archive = ArchiveWriter(self.store, config.archive_sites, self.manifest["codebook_id"],
                                     config.archive_maxlen)
        self.replica = uuid.uuid4().hex[:8]
        self.client: mqtt.Client | None = None
        self.connected = threading.Event()
        per_worker = max(1, config.ingest_queue // config.ingest_workers)
        self.queues = [queue.Queue(maxsize=per_worker) for _ in range(config.ingest_workers)]
        self.workers = [
            threading.Thread(target=self._work, args=(q,), name=f"ingest-{i}", daemon=True)
            for i, q in enumerate(self.queues)
        ]
        for w in self.workers:
            w.start()
        threading.Thread(target=self._sweep, name="ingest-sweeper", daemon=True).start()
        self._connect()

    def _subscriptions(self) -> list[tuple[str, int]]:
        """Plain subscriptions for one replica (every broker, retained statuses included);
        a shared subscription group when there are several (the broker splits the messages)."""
        group = self.config.ingest_share_group
        if self.config.ingest_replicas > 1 and group:
            return [(f"$share/{group}/{FRAMES_SUBSCRIPTION}", 1), (f"$share/{group}/{STATUS_SUBSCRIPTION}", 1)]
        return [(FRAMES_SUBSCRIPTION, 1), (STATUS_SUBSCRIPTION, 1)]

    # --- MQTT ----------------------------------------------------------------
    def _connect(self) -> mqtt.Client:
        client, endpoint = mqtt_client(self.config.broker_url, f"sf-ingest-{self.replica}")
        self.client = client  # before any message: workers publish events and discovery with it
        client.on_connect = self._on_connect
        client.on_disconnect = lambda *a: self.connected.clear()
        client.on_message = self._on_message
        client.connect_async(endpoint.host, endpoint.port, keepalive=30)
        client.loop_start()
        if not self.connected.wait(15):
            raise ConnectionError(f"ingest cannot reach MQTT broker at {self.config.broker_url}")
        return client

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker refused the ingest: %s", reason_code)
            return
        client.subscribe(self._subscriptions())
        self.connected.set()
        log.info("ingest replica %s subscribed to %s", self.replica, [t for t, _ in self._subscriptions()])

    def _on_message(self, client, userdata, msg) -> None:
        item = Inbound(msg.topic, bytes(msg.payload), time.time_ns())
        try:
            site, device, _ = parse_device_topic(msg.topic)
            target = self._queue_for(site, device)
        except WireError:
            target = self.queues[0]  # the worker dead-letters it
        target.put(item)  # blocks when full: backpressure onto the broker

    # --- workers ---------------------------------------------------------------
    def _work(self, q: queue.Queue) -> None:
        while True:
            item = q.get()
            if item is STOP:
                return
            try:
                if isinstance(item, Drain):
                    self._drain(item.site, item.device)
                else:
                    self._handle(item)
            except Exception:  # never let one message kill the worker: count it and go on
                log.exception("ingest failed on %s", item)
                if isinstance(item, Inbound):
                    self.store.dead_letter("internal_error", item.topic, item.payload)

    def _sweep(self) -> None:
        """Pick up devices whose work nobody is draining (a replica died holding their lease)."""
        while True:
            time.sleep(SWEEP_S)
            try:
                for site, device in self.log.active_devices():
                    self._queue_for(site, device).put(Drain(site, device))
            except Exception:
                log.exception("ingest sweeper failed; retrying")

    def _queue_for(self, site: str, device: str) -> queue.Queue:
        return self.queues[zlib.crc32(f"{site}/{device}".encode()) % len(self.queues)]

    def _handle(self, item: Inbound) -> None:
        self.store.count("received", f"received_by:{self.replica}")
        try:
            site, device, kind = parse_device_topic(item.topic)
            if kind == "status":
                if not item.payload:  # an empty retained message deletes the retained status
                    return self.store.count("status_cleared")
                return self._handle_status(site, device, StatusMessage.from_bytes(item.payload))
            if kind != "frames":
                raise WireError(f"unexpected topic kind {kind!r}")
            message = FramesMessage.from_bytes(item.payload)
        except WireError as exc:
            self.store.dead_letter(type(exc).__name__, item.topic, item.payload, str(exc))
            return
        if message.codebook_id != self.manifest["codebook_id"]:
            self.store.dead_letter("WrongCodebook", item.topic, item.payload,
                                   f"codebook {message.codebook_id} != {self.manifest['codebook_id']}")
            return
        work = WorkItem(message.seq, message.t_end_ns, item.received_ns, context_codes(message, self.silence_code))
        accepted = self.log.accept(site, device, work, time.time_ns() // 1_000_000)
        if not accepted.new:
            return self.store.count("duplicates")
        self.store.count("accepted")
        if accepted.lost:
            self.store.count("lost", n=accepted.lost)
            log.warning("%s/%s: %d messages never arrived within the reorder window", site, device, accepted.lost)
        if accepted.released:
            self._drain(site, device)

    def _drain(self, site: str, device: str) -> None:
        """Process the device's ready items in order while holding its lease."""
        lease = self.log.lease(site, device)
        if lease is None:
            return  # another replica (or thread) is draining it and will see our items
        while True:
            items, context, states = self.log.peek(lease, PEEK_ITEMS)
            if not items:
                if self.log.release(lease):
                    return
                continue
            for work in items:
                result = self._process(lease, work, context, states)
                if result is None:
                    return  # the lease was lost: whoever took it goes on from the head
                context, states = result

    def _process(self, lease: Lease, work: WorkItem, context: np.ndarray, states: dict[str, dict]):
        context = np.concatenate([context, work.codes])[-self.context :]  # (T,) codes, oldest first
        events: list[SoundEvent] = []
        if len(context) >= self.window:  # a full window: classify it
            probs = self._classify(context)
            label_states = {label: event_logic.LabelState.from_dict(d) for label, d in states.items()}
            start_ns = work.t_end_ns - self.window * FRAME_DURATION_NS
            for label, p in zip(self.manifest["labels"], probs, strict=True):
                state = label_states.setdefault(label, event_logic.LabelState())
                closed = event_logic.step(state, self.policies[label], float(p), start_ns, work.t_end_ns, work.seq)
                if closed:
                    events.append(self._event(lease.site, lease.device, label, closed))
            states = {label: s.to_dict() for label, s in label_states.items()}
        if not self.log.commit(lease, work.seq, context, states, [self._event_fields(e) for e in events],
                               replica=self.replica):
            log.warning("%s/%s: lost the lease before seq %d was committed; another replica redoes it",
                        lease.site, lease.device, work.seq)
            return None
        self._publish(events)
        if self.archive.wants(lease.site):  # after the commit: a crash here misses it in the archive only
            self.archive.append(lease.site, lease.device, work)
        if len(context) >= self.window:
            # ingest-to-classification latency, from the capture time of the window's last sample
            # (or from receipt, for a file replayed faster than real time: its capture times lie ahead)
            since_ns = min(work.t_end_ns, work.received_ns)
            self.store.observe("latency_ms", [(time.time_ns() - since_ns) / 1e6])
        return context, states

    def _classify(self, context: np.ndarray) -> np.ndarray:
        """(L,) label probabilities of the context's last window; retried until the models answer
        (a dead model replica is restarted by Serve; the item waits at the head of the log)."""
        while True:
            try:
                states = self.code_lm.states.remote(context)
                return self.classifier.probs.remote(states, context[-self.window :]).result()
            except Exception as exc:  # RayActorError, a replica being replaced, ...
                self.store.count("model_retries")
                log.warning("model call failed (%s); retrying in %.1f s", type(exc).__name__, MODEL_RETRY_S)
                time.sleep(MODEL_RETRY_S)

    def _handle_status(self, site: str, device: str, status: StatusMessage) -> None:
        # an online status is a full heartbeat; an offline one (often the last will) only says so,
        # so the device keeps its last known versions, spool depth, CPU and memory
        fields = status.to_dict() if status.state == "online" else {"state": status.state, "t_ns": status.t_ns}
        self.store.set_status(site, device, fields)
        if self.discovery is not None:  # Home Assistant: one event entity per device, on first sight
            self.discovery.on_status(self.client, site, device, status)
        if status.state == "offline":
            self._close_events(site, device)

    def _close_events(self, site: str, device: str, timeout_s: float = 10.0) -> None:
        """The stream ended: close whatever is still active, under the device's lease."""
        deadline = time.monotonic() + timeout_s
        while (lease := self.log.lease(site, device)) is None:
            if time.monotonic() > deadline:
                log.warning("%s/%s went offline but its lease stayed busy; events close later", site, device)
                return
            time.sleep(0.05)
        try:
            _, _, raw = self.log.peek(lease, 0)
            states = {label: event_logic.LabelState.from_dict(d) for label, d in raw.items()}
            events = []
            for label, state in states.items():
                closed = event_logic.close(state, self.policies[label])
                if closed:
                    events.append(self._event(site, device, label, closed))
            if self.log.commit(lease, None, None, {k: s.to_dict() for k, s in states.items()},
                               [self._event_fields(e) for e in events]):
                self._publish(events)
        finally:
            self.log.release(lease)

    def _event(self, site: str, device: str, label: str, closed: event_logic.ClosedEvent) -> SoundEvent:
        return SoundEvent(
            event_id=uuid.uuid4().hex,
            site=site,
            device=device,
            label=label,
            score=round(closed.score, 4),
            start_ns=closed.start_ns,
            end_ns=closed.end_ns,
            model_version=self.manifest["model_version"],
            codebook_id=self.manifest["codebook_id"],
            seq_first=closed.seq_first,
            seq_last=closed.seq_last,
        )

    @staticmethod
    def _event_fields(event: SoundEvent) -> tuple[str, str, str, bytes]:
        return event.site, event.device, event.label, event.to_bytes()

    def _publish(self, events: list[SoundEvent]) -> None:
        """Events on MQTT after they are committed to the Redis stream (the record of truth)."""
        for event in events:
            self.client.publish(events_topic(event.site, event.device), event.to_bytes(), qos=1)
            log.info("event %s on %s/%s score %.2f", event.label, event.site, event.device, event.score)

    # --- runtime settings -------------------------------------------------------------
    def reconfigure(self, user_config: dict) -> None:
        """Serve calls this with the deployment's ``user_config`` at start and whenever it changes
        (``serve deploy`` / ``serve.run`` with a new one), without restarting the replica: the
        event-logic thresholds. A bad one raises, and Serve keeps the replica on the old one."""
        self.policies = label_policies(self.config, self.manifest, user_config)
        log.info("ingest replica %s: event logic now %s", self.replica, user_config or "from the bundle and config")

    def event_policies(self) -> dict[str, dict]:
        return {label: dataclasses.asdict(p) for label, p in self.policies.items()}

    # --- health ------------------------------------------------------------------
    def stats(self) -> dict:
        return {
            "mqtt_connected": self.connected.is_set(),
            "workers_alive": sum(w.is_alive() for w in self.workers),
            "queued": sum(q.qsize() for q in self.queues),
            "replica": self.replica,
            "metrics": self.store.metrics(),
        }

    def check_health(self) -> None:
        """Serve calls this periodically; raising restarts the replica."""
        if not all(w.is_alive() for w in self.workers):
            raise RuntimeError("an ingest worker thread died")
        self.store.ping()
