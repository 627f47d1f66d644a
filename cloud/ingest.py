"""MQTT ingest: frames and status from the fleet into Redis, the models and events.

Ray Serve has no MQTT ingress, so this deployment runs its own paho client.
paho's network thread only parses the topic and hands the message to one of
``ingest_workers`` threads, chosen by device so that a device's messages are
handled in order by a single thread; the queues are bounded, so a burst
blocks paho (and with it TCP reads from the broker) instead of growing memory.

Each worker: decode (bad payloads -> dead letter, counted) -> atomic Redis
accept (duplicates dropped, context appended; frames the edge's loudness gate
sent as silent enter the context as the bundle's silence code) -> code LM ->
classifier -> event logic -> events to Redis Stream and MQTT.
"""

from __future__ import annotations

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


@dataclass
class Inbound:
    topic: str
    payload: bytes
    received_ns: int


def context_codes(message: FramesMessage, silence_code: int) -> np.ndarray:
    """(N,) codes for the device context and the code LM: the bundle's own code for digital
    silence where the edge's loudness gate sent no code (wire.SILENT_CODE never goes further)."""
    if message.silent is None:
        return message.codes
    return np.where(message.silent, silence_code, message.codes).astype(np.uint16)  # (N,)


def label_policies(config: CloudConfig, manifest: dict) -> dict[str, event_logic.EventPolicy]:
    """One policy per label of the bundle: its calibrated threshold unless the config sets one for all."""
    policies = {}
    for label in manifest["labels"]:
        on = config.on_threshold if config.on_threshold is not None else manifest.get("thresholds", {}).get(label, 0.5)
        policies[label] = event_logic.EventPolicy(
            on_threshold=on,
            off_threshold=min(config.off_threshold, on),
            min_windows=config.min_windows,
            hold_windows=config.hold_windows,
            cooldown_ns=int(config.cooldown_s * 1e9),
        )
    return policies


@serve.deployment(num_replicas=1)
class Ingest:
    def __init__(self, config: CloudConfig, bundle_dir: str, code_lm, classifier):
        self.config = config
        self.manifest = bundle.verify_bundle(bundle_dir)
        self.silence_code = bundle.silence_code(bundle_dir)
        self.store = CloudStore(config.redis_url, config.key_prefix, config.events_maxlen)
        self.code_lm, self.classifier = code_lm, classifier
        self.window = self.manifest["classifier_config"]["window_frames"]
        self.context = self.manifest["code_lm_config"]["context_frames"]
        self.policies = label_policies(config, self.manifest)
        self.connected = threading.Event()
        per_worker = max(1, config.ingest_queue // config.ingest_workers)
        self.queues = [queue.Queue(maxsize=per_worker) for _ in range(config.ingest_workers)]
        self.workers = [
            threading.Thread(target=self._work, args=(q,), name=f"ingest-{i}", daemon=True)
            for i, q in enumerate(self.queues)
        ]
        for w in self.workers:
            w.start()
        self.client = self._connect()

    # --- MQTT ----------------------------------------------------------------
    def _connect(self) -> mqtt.Client:
        client, endpoint = mqtt_client(self.config.broker_url, f"sf-ingest-{uuid.uuid4().hex[:8]}")
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
        client.subscribe([(FRAMES_SUBSCRIPTION, 1), (STATUS_SUBSCRIPTION, 1)])
        self.connected.set()
        log.info("ingest subscribed to %s", FRAMES_SUBSCRIPTION)

    def _on_message(self, client, userdata, msg) -> None:
        item = Inbound(msg.topic, bytes(msg.payload), time.time_ns())
        try:
            site, device, _ = parse_device_topic(msg.topic)
            shard = zlib.crc32(f"{site}/{device}".encode()) % len(self.queues)
        except WireError:
            shard = 0  # the worker dead-letters it
        self.queues[shard].put(item)  # blocks when full: backpressure onto the broker

    # --- workers ---------------------------------------------------------------
    def _work(self, q: queue.Queue) -> None:
        while True:
            item = q.get()
            if item is STOP:
                return
            try:
                self._handle(item)
            except Exception:  # never let one message kill the worker: count it and go on
                log.exception("ingest failed on %s", item.topic)
                self.store.dead_letter("internal_error", item.topic, item.payload)

    def _handle(self, item: Inbound) -> None:
        self.store.count("received")
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
        codes = context_codes(message, self.silence_code)
        accepted = self.store.accept_frames(site, device, message.seq, codes, message.t_end_ns, self.context)
        if accepted is None:
            return
        self.store.count("accepted")
        if len(accepted.context) < self.window:
            return  # not a full window yet
        window_codes = accepted.context[-self.window :]
        states = self.code_lm.states.remote(accepted.context)
        probs = self.classifier.probs.remote(states, window_codes).result()
        self._update_events(site, device, message, probs)
        # ingest-to-classification latency, from the capture time of the window's last sample
        self.store.observe("latency_ms", [(time.time_ns() - message.t_end_ns) / 1e6])

    def _update_events(self, site: str, device: str, message: FramesMessage, probs: np.ndarray) -> None:
        end_ns = message.t_end_ns
        start_ns = end_ns - self.window * FRAME_DURATION_NS
        states = self.store.load_label_states(site, device)
        for label, p in zip(self.manifest["labels"], probs, strict=True):
            state = states.setdefault(label, event_logic.LabelState())
            closed = event_logic.step(state, self.policies[label], float(p), start_ns, end_ns, message.seq)
            if closed:
                self._emit(site, device, label, closed)
        self.store.save_label_states(site, device, states)

    def _handle_status(self, site: str, device: str, status: StatusMessage) -> None:
        # an online status is a full heartbeat; an offline one (often the last will) only says so,
        # so the device keeps its last known versions, spool depth, CPU and memory
        fields = status.to_dict() if status.state == "online" else {"state": status.state, "t_ns": status.t_ns}
        self.store.set_status(site, device, fields)
        if status.state == "offline":  # the stream ended: close whatever is still active
            states = self.store.load_label_states(site, device)
            for label, state in states.items():
                closed = event_logic.close(state, self.policies[label])
                if closed:
                    self._emit(site, device, label, closed)
            self.store.save_label_states(site, device, states)

    def _emit(self, site: str, device: str, label: str, closed: event_logic.ClosedEvent) -> None:
        event = SoundEvent(
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
        self.store.append_event(event)
        self.client.publish(events_topic(site, device), event.to_bytes(), qos=1)
        log.info("event %s on %s/%s score %.2f", label, site, device, closed.score)

    # --- health ------------------------------------------------------------------
    def stats(self) -> dict:
        return {
            "mqtt_connected": self.connected.is_set(),
            "workers_alive": sum(w.is_alive() for w in self.workers),
            "queued": sum(q.qsize() for q in self.queues),
            "metrics": self.store.metrics(),
        }

    def check_health(self) -> None:
        """Serve calls this periodically; raising restarts the replica."""
        if not all(w.is_alive() for w in self.workers):
            raise RuntimeError("an ingest worker thread died")
        self.store.ping()
