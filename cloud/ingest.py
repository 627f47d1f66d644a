"""MQTT ingest: frames and status from the fleet into Redis, the models and events.

Ray Serve has no MQTT ingress, so this deployment runs its own paho client.
With ``ingest_replicas`` > 1 every replica joins one MQTT shared subscription
(``$share/<group>/...``) and the broker splits the fleet's messages between
them; `cloud.device_log` puts each device's frames back in order, exactly
once, whichever replica received them.

paho's network thread only parses the topic and hands the message to one of
``ingest_workers`` threads, chosen by device. Each worker runs rounds of the hot
path (`cloud.pipeline`): it takes everything waiting in its queue (up to
``ingest_batch_size`` messages) and handles it with one pipelined Redis round
trip per step and one model request, so batches grow with the load by
themselves and an idle fleet waits for nothing. The queues are bounded, so a
burst blocks paho (and with it TCP reads from the broker) instead of growing
memory. A Redis error retries the same round until Redis answers.

A frame is acknowledged to the broker only once its round is in Redis, on a
persistent session whose client id a Redis slot lease keeps stable across replica
restarts (`cloud.mqtt_session`): until then the broker holds it, so a crash means
redelivery, never loss.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
import uuid
import zlib

import paho.mqtt.client as mqtt
import redis
from ray import serve

from cloud.archive import ArchiveWriter
from cloud.device_log import DeviceLog, Lease
from cloud.events import label_policies
from cloud.homeassistant import DiscoveryPublisher
from cloud.mqtt_session import SLOT_TTL_MS, AckSequencer, SessionSlot, acknowledge
from cloud.pipeline import DeviceKey, Drain, Inbound, Pipeline
from cloud.store import CloudStore, persistence_warning
from shared_models import bundle
from shared_models.callbacks import CallbackGuard
from shared_models.wire import (
    FRAMES_SUBSCRIPTION,
    STATUS_SUBSCRIPTION,
    WireError,
    parse_device_topic,
)
from soundfleet.config import CloudConfig
from soundfleet.services import mqtt_client

log = logging.getLogger(__name__)

SWEEP_S = 1.0  # how often a replica looks for work a dead replica left behind
REDIS_RETRY_S = 1.0  # wait before running a round again after a Redis error


LAG_FRESH_S = 5.0  # an idle worker whose last round ended longer ago than this has no lag


@dataclasses.dataclass
class WorkerProgress:
    """How far one worker thread has got: for the lag gauge and /readyz's stuck check.

    ``lag_s`` is capture-to-classification time of the slowest frame of its last round: in
    real time a fraction of a second; when the fleet outruns the models the frames wait (in
    the broker's session, unacknowledged) and it grows; it falls back by itself once the
    backlog is worked off. An idle worker (empty queue, nothing for ``LAG_FRESH_S``) has none."""

    busy_since: float | None = None  # monotonic start of the round in progress; None while it waits
    done_at: float = 0.0  # monotonic end of its last round
    lag_s: float = 0.0

    def started(self) -> None:
        self.busy_since = time.monotonic()

    def finished(self, lag_s: float) -> None:
        self.busy_since, self.done_at, self.lag_s = None, time.monotonic(), lag_s

    def lag(self, queued: int) -> float:
        idle = self.busy_since is None and not queued and time.monotonic() - self.done_at > LAG_FRESH_S
        return 0.0 if idle else self.lag_s

    def stuck_s(self) -> float:
        """How long its round in progress has run (retrying while Redis is away); 0 if none."""
        started = self.busy_since
        return 0.0 if started is None else time.monotonic() - started


def ingest_readiness(stats: dict, config: CloudConfig) -> tuple[bool | str, list[str]]:
    """/readyz's ingest check from one replica's ``stats``: (True or why not, warnings)."""
    warnings = []
    if stats["lag_seconds"] > config.ingest_lag_warn_s:
        warnings.append(f"ingest lag {stats['lag_seconds']:.1f} s: frames are classified that long after capture "
                        "(the fleet outruns the models, or a device replays its spool); they wait, none is lost")
    if stats["stuck_seconds"] > config.ingest_stuck_after_s:
        return (f"an ingest round has not finished for {stats['stuck_seconds']:.0f} s "
                f"({stats['queued']} messages waiting, {stats['redis_errors']} Redis errors)"), warnings
    if stats["workers_alive"] < config.ingest_workers:
        return f"{config.ingest_workers - stats['workers_alive']} ingest worker threads died", warnings
    return True, warnings


def device_readiness(longest: tuple[str, str, object, float] | None, config: CloudConfig) -> bool | str:
    """/readyz's devices check from ``DeviceLog.waiting_longest``: True, or which device's ready
    work has waited past ``ingest_stuck_after_s`` (nobody is processing it)."""
    if longest is None or longest[3] <= config.ingest_stuck_after_s:
        return True
    site, device, item, waited_s = longest
    return f"{site}/{device}: seq {item.seq} has waited {waited_s:.0f} s for processing"


@serve.deployment(num_replicas=1)
class Ingest:
    def __init__(self, config: CloudConfig, bundle_dir: str, code_lm, classifier):
        self.config = config
        manifest = bundle.verify_bundle(bundle_dir)
        self.manifest = manifest
        self.store = CloudStore(config.redis_url, config.key_prefix, config.events_maxlen)
        device_log = DeviceLog(self.store.r, self.store.key, config.events_maxlen,
                               reorder_window_ms=int(config.reorder_window_s * 1000), max_pending=config.max_pending)
        self.log = device_log
        self.replica = uuid.uuid4().hex[:8]
        self.client: mqtt.Client | None = None
        self.client_id: str | None = None
        self.connected = threading.Event()
        self.slot: SessionSlot | None = None  # the persistent session's identity (manual ack)
        self.acks: AckSequencer | None = None  # this connection's PUBACKs (manual ack)
        self.acks_sent = 0
        if config.ingest_manual_ack:
            self.slot = SessionSlot(self.store.r, self.store.key, config.key_prefix, config.ingest_share_group,
                                    config.ingest_replicas)
            slot = self.slot.claim(timeout_s=3 * SLOT_TTL_MS / 1000)
            log.info("ingest replica %s holds session slot %d (%s)", self.replica, slot, self.slot.client_id)
        discovery = (DiscoveryPublisher(manifest["labels"], prefix=config.ha_discovery_prefix)
                     if config.ha_discovery_prefix else None)
        self.pipeline = Pipeline(
            manifest, bundle.silence_code(bundle_dir), self.store, device_log, code_lm, classifier,
            mqtt=lambda: self.client,
            archive=ArchiveWriter(self.store, config.archive_sites, manifest["codebook_id"], config.archive_maxlen),
            discovery=discovery, policies=label_policies(config, manifest), replica=self.replica,
            acknowledge=acknowledge,  # the round's frames, once accepted; the rest after the round
        )
        self.redis_errors = 0
        self.callback_guard = CallbackGuard(log)  # .errors: exceptions paho's thread was spared
        self.redis_persistence = self.store.persistence()
        if self.redis_persistence in ("none", "rdb"):
            log.warning("%s", persistence_warning(self.redis_persistence))
        per_worker = max(1, config.ingest_queue // config.ingest_workers)
        self.queues = [queue.Queue(maxsize=per_worker) for _ in range(config.ingest_workers)]
        self.progress = [WorkerProgress() for _ in self.queues]
        self.workers = [
            threading.Thread(target=self._work, args=(q, p), name=f"ingest-{i}", daemon=True)
            for i, (q, p) in enumerate(zip(self.queues, self.progress, strict=True))
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
        manual = self.slot is not None
        client_id = self.slot.client_id if manual else f"sf-ingest-{self.replica}"
        client, endpoint = mqtt_client(self.config.broker_url, client_id, persistent=manual, manual_ack=manual)
        self.client_id = client_id
        self.client = client  # before any message: workers publish events and discovery with it
        guard = self.callback_guard.wrap
        client.on_connect = guard(self._on_connect)
        client.on_disconnect = guard(self._on_disconnect)
        client.on_message = guard(self._on_message)
        client.connect_async(endpoint.host, endpoint.port, keepalive=30)
        client.loop_start()
        if not self.connected.wait(15):
            raise ConnectionError(f"ingest cannot reach MQTT broker at {self.config.broker_url}")
        return client

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker refused the ingest: %s", reason_code)
            return
        if self.slot is not None:  # acks of the previous connection never go out on this one
            self.acks = AckSequencer(client.ack)
        client.subscribe(self._subscriptions())
        self.connected.set()
        log.info("ingest replica %s subscribed to %s", self.replica, [t for t, _ in self._subscriptions()])

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if self.acks is not None:  # the broker redelivers what was not acknowledged
            self.acks_sent += self.acks.sent
            self.acks.close()

    def _on_message(self, client, userdata, msg) -> None:
        ticket = self.acks.receive(msg.mid, msg.qos) if self.acks is not None else None
        item = Inbound(msg.topic, bytes(msg.payload), time.time_ns(), ticket)
        try:
            site, device, _ = parse_device_topic(msg.topic)
            target = self._queue_for(site, device)
        except WireError:
            target = self.queues[0]  # the worker dead-letters it
        target.put(item)  # blocks when full: backpressure onto the broker

    # --- workers ---------------------------------------------------------------
    def _work(self, q: queue.Queue, progress: WorkerProgress) -> None:
        held: dict[DeviceKey, Lease] = {}  # devices this worker is draining
        while True:
            batch = self._take(q, wait=not held)
            progress.started()
            while True:
                try:
                    record = self.pipeline.run(batch, held)
                    acknowledge([item.ack for item in batch if isinstance(item, Inbound)])
                    # a round that classified nothing (a drain, statuses) says nothing about lag
                    progress.finished(max(record.latencies_ms) / 1e3 if record.latencies_ms else progress.lag_s)
                    break
                except redis.RedisError as exc:  # Redis restarting: the same round again, nothing dropped
                    self.redis_errors += 1
                    log.warning("ingest round of %d messages hit a Redis error (%s); again in %.0f s",
                                len(batch), exc, REDIS_RETRY_S)
                    time.sleep(REDIS_RETRY_S)
                except Exception:  # never let a bug kill the worker: keep the messages and go on
                    log.exception("ingest round of %d messages failed", len(batch))
                    self.pipeline.dead_letter_round(batch)
                    acknowledge([item.ack for item in batch if isinstance(item, Inbound)])
                    held.clear()  # the leases expire; the sweeper hands their work out again
                    progress.finished(progress.lag_s)
                    break

    def _take(self, q: queue.Queue, wait: bool) -> list:
        """Everything waiting in ``q``, up to ``ingest_batch_size``; with ``wait``, at least one."""
        items = [q.get()] if wait else []
        while len(items) < self.config.ingest_batch_size:
            try:
                items.append(q.get_nowait())
            except queue.Empty:
                break
        return items

    def _sweep(self) -> None:
        """Pick up devices whose work nobody is draining (a replica died holding their lease)."""
        while True:
            time.sleep(SWEEP_S)
            try:
                self._keep_slot()
                for site, device in self.log.active_devices():
                    self._queue_for(site, device).put(Drain(site, device))
            except Exception:
                log.exception("ingest sweeper failed; retrying")

    def _keep_slot(self) -> None:
        """Renew the session slot; if another replica took it (ours expired while Redis was
        away), stop using its client id and connect again under a free one."""
        if self.slot is None or self.slot.renew():
            return
        log.error("ingest replica %s lost session slot %d to another replica; reconnecting under a free one",
                  self.replica, self.slot.slot)
        old = self.client
        old.disconnect()
        old.loop_stop()
        self.slot.claim(timeout_s=3 * SLOT_TTL_MS / 1000)
        self._connect()

    def _queue_for(self, site: str, device: str) -> queue.Queue:
        return self.queues[zlib.crc32(f"{site}/{device}".encode()) % len(self.queues)]

    # --- runtime settings -------------------------------------------------------------
    def reconfigure(self, user_config: dict) -> None:
        """Serve calls this with the deployment's ``user_config`` at start and whenever it changes
        (``serve deploy`` / ``serve.run`` with a new one), without restarting the replica: the
        event-logic thresholds. A bad one raises, and Serve keeps the replica on the old one."""
        self.pipeline.policies = label_policies(self.config, self.manifest, user_config)
        log.info("ingest replica %s: event logic now %s", self.replica, user_config or "from the bundle and config")

    def event_policies(self) -> dict[str, dict]:
        return {label: dataclasses.asdict(p) for label, p in self.pipeline.policies.items()}

    # --- health ------------------------------------------------------------------
    def stats(self) -> dict:
        """The replica's state; answers with Redis away too (its counters are then empty), so
        /healthz and /readyz can say what is wrong instead of failing themselves."""
        try:
            metrics, redis_reachable = self.store.metrics(), True
        except redis.RedisError:
            metrics, redis_reachable = {}, False
        return {
            "mqtt_connected": self.connected.is_set(),
            "workers_alive": sum(w.is_alive() for w in self.workers),
            "queued": sum(q.qsize() for q in self.queues),
            "lag_seconds": round(max(p.lag(q.qsize()) for p, q in zip(self.progress, self.queues, strict=True)), 3),
            "stuck_seconds": round(max(p.stuck_s() for p in self.progress), 3),
            "redis_errors": self.redis_errors,
            "callback_errors": self.callback_guard.errors,
            "manual_ack": self.slot is not None,
            "acks_waiting": self.acks.waiting if self.acks is not None else 0,
            "acks_sent": self.acks_sent + (self.acks.sent if self.acks is not None else 0),
            "mqtt_client_id": self.client_id,
            "redis_persistence": self.redis_persistence,
            "replica": self.replica,
            "redis_reachable": redis_reachable,
            "metrics": metrics,
        }

    def check_health(self) -> None:
        """Serve calls this periodically; raising restarts the replica. Not Redis: a restart
        cannot bring Redis back and would drop the messages waiting in this replica's queues
        (its rounds wait for Redis instead; /readyz reports it)."""
        if not all(w.is_alive() for w in self.workers):
            raise RuntimeError("an ingest worker thread died")

    def __del__(self) -> None:
        """Serve shuts the replica down: leave the session (what is not acknowledged stays in
        it for the replica that takes the slot next) and free the slot for it at once."""
        try:
            if self.client is not None:
                self.client.disconnect()
                self.client.loop_stop()
            if self.slot is not None:
                self.slot.release()
        except Exception:  # shutting down: Redis or the broker may be gone already
            log.warning("ingest replica %s: could not leave its session cleanly", self.replica, exc_info=True)
