"""The ingest's hot path: one round turns a batch of MQTT messages into events.

A round belongs to one ingest worker and covers many devices at once. Each step
is one pipelined Redis round trip or one model request, whatever the number of
messages, so the per-message cost is the work itself, not the trips:

1. decode: frames become work items (frames the edge's loudness gate sent as
   silent enter as the bundle's silence code); bad payloads go to the
   dead-letter stream with their reason, counted;
2. accept every frame into its device's log (`cloud.device_log`): duplicates
   dropped, late frames parked, ready ones released in seq order;
3. lease the devices with ready work this worker does not hold yet (a device
   leased elsewhere is drained there: its holder cannot let go while work waits);
4. peek at each held device's work, context and event state;
5. classify every full window of the round: one code LM request chained into
   one classifier request (Serve passes the states between the replicas); a
   failed call (a replica died) is retried, the items wait at their heads;
6. event logic per device in seq order, then one commit per device (items
   popped, context, event state, events, counters: all or nothing), then the
   events on MQTT, the fleet archive and the latency samples;
7. statuses: the device registry, Home Assistant discovery, and on offline the
   device's events still active are closed;
8. release the leases whose work list is empty; the rest stay held and the next
   round drains them without waiting for new messages.

A Redis error raises out of the round and the ingest runs the same round again:
accept is idempotent (what got in the first time comes back as a duplicate) and
commits are fenced, so a Redis outage delays frames and loses none.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cloud import events as event_logic
from cloud.archive import ArchiveWriter
from cloud.device_log import Commit, DeviceLog, Lease, Peek, WorkItem
from cloud.homeassistant import DiscoveryPublisher
from cloud.model_calls import ModelCalls
from cloud.store import CloudStore
from shared_models.constants import FRAME_DURATION_NS
from shared_models.wire import (
    FramesMessage,
    SoundEvent,
    StatusMessage,
    WireError,
    events_topic,
    frames_topic,
    parse_device_topic,
)

log = logging.getLogger(__name__)

PEEK_ITEMS = 16  # work items per held device and round (a backlog drains over several rounds)
CLOSE_WAIT_S = 10.0  # how long an offline status waits for a device another worker is draining

DeviceKey = tuple[str, str]  # (site, device)


@dataclass
class Inbound:
    topic: str
    payload: bytes
    received_ns: int
    ack: Any = None  # cloud.mqtt_session.Ticket: handed back once the round made this message durable


@dataclass
class Drain:
    """Work on a device's log that no message of this replica will trigger (the sweeper's)."""

    site: str
    device: str


class RoundRecord:
    """What one round counts and measures, written to Redis in one round trip at its end:
    counters, the latency of each classified message, and the wall time of each stage
    (``lap(stage)`` closes the stage that ran since the previous lap)."""

    def __init__(self, messages: int):
        self.counts: Counter[str] = Counter()
        self.latencies_ms: list[float] = []
        self.stage_ms: dict[str, float] = {}
        self.messages = messages
        self._start = self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.stage_ms[stage] = self.stage_ms.get(stage, 0.0) + (now - self._last) * 1e3
        self._last = now

    def flush(self, store: CloudStore) -> None:
        self.stage_ms["round"] = (time.perf_counter() - self._start) * 1e3
        store.record(self.counts, {"latency_ms": self.latencies_ms, "round_messages": [self.messages],
                                   **{f"stage_ms_{stage}": [ms] for stage, ms in self.stage_ms.items()}})


@dataclass
class Decoded:
    frames: list[tuple[str, str, WorkItem]]
    sources: list[Inbound]  # the message each of ``frames`` came from
    statuses: list[tuple[str, str, StatusMessage | None]]  # None: a retained status was cleared
    status_sources: list[Inbound]  # the message each of ``statuses`` came from
    drains: set[DeviceKey]


def context_codes(message: FramesMessage, silence_code: int) -> np.ndarray:
    """(N,) codes for the device context and the code LM: the bundle's own code for digital
    silence where the edge's loudness gate sent no code (wire.SILENT_CODE never goes further)."""
    if message.silent is None:
        return message.codes
    return np.where(message.silent, silence_code, message.codes).astype(np.uint16)  # (N,)


class Pipeline:
    """Rounds of the hot path for one ingest replica (shared by its worker threads)."""

    def __init__(self, manifest: dict, silence_code: int, store: CloudStore, device_log: DeviceLog,
                 code_lm: Any, classifier: Any, mqtt: Callable[[], Any], archive: ArchiveWriter,
                 discovery: DiscoveryPublisher | None, policies: dict[str, event_logic.EventPolicy], replica: str,
                 acknowledge: Callable[[list], None] = lambda tickets: None):
        self.manifest, self.silence_code = manifest, silence_code
        self.store, self.log = store, device_log
        self.models = ModelCalls(code_lm, classifier, manifest["classifier_config"]["window_frames"],
                                 len(manifest["labels"]))
        self.mqtt, self.archive, self.discovery = mqtt, archive, discovery
        self.policies = policies  # replaced whole by Ingest.reconfigure: a round sees one version
        self.replica = replica
        self.acknowledge = acknowledge  # cloud.mqtt_session.acknowledge: the tickets of durable messages
        self.labels: list[str] = manifest["labels"]
        self.window = manifest["classifier_config"]["window_frames"]
        self.context = manifest["code_lm_config"]["context_frames"]

    def run(self, inbound: list[Inbound | Drain], held: dict[DeviceKey, Lease]) -> RoundRecord:
        """One round over ``inbound``; ``held`` (this worker's leases) is updated in place.
        Returns what the round counted and measured (already written to Redis)."""
        record = RoundRecord(len(inbound))
        decoded = self._decode(inbound, record)
        ready = self._accept(decoded, record) | decoded.drains
        # every frame of the round is in Redis now (accepted, a duplicate or dead-lettered): the
        # broker may forget them while the models run; the statuses' turn comes after step 7
        statuses = {id(item) for item in decoded.status_sources}
        self.acknowledge([item.ack for item in inbound
                          if isinstance(item, Inbound) and item.ack is not None and id(item) not in statuses])
        wanted = sorted(ready - held.keys())
        for key, lease in zip(wanted, self.log.lease_many(wanted), strict=True):
            if lease is not None:
                held[key] = lease
        record.lap("lease")
        if held:
            self._process(held, record)
        for site, device, status in decoded.statuses:
            self._status(site, device, status, held, record)
        record.lap("statuses")
        if held:
            leases = list(held.values())
            for lease, done in zip(leases, self.log.release_many(leases), strict=True):
                if done:
                    del held[(lease.site, lease.device)]
        record.lap("release")
        record.flush(self.store)
        return record

    # --- 1-2: decode and accept --------------------------------------------------------
    def _decode(self, inbound: list[Inbound | Drain], record: RoundRecord) -> Decoded:
        decoded = Decoded([], [], [], [], set())
        received = 0
        for item in inbound:
            if isinstance(item, Drain):
                decoded.drains.add((item.site, item.device))
                continue
            received += 1
            try:
                site, device, kind = parse_device_topic(item.topic)
                if kind == "status":
                    status = StatusMessage.from_bytes(item.payload) if item.payload else None
                    decoded.statuses.append((site, device, status))
                    decoded.status_sources.append(item)
                    continue
                if kind != "frames":
                    raise WireError(f"unexpected topic kind {kind!r}")
                message = FramesMessage.from_bytes(item.payload)
            except WireError as exc:
                self.store.dead_letter(type(exc).__name__, item.topic, item.payload, str(exc))
                continue
            if message.codebook_id != self.manifest["codebook_id"]:
                self.store.dead_letter("WrongCodebook", item.topic, item.payload,
                                       f"codebook {message.codebook_id} != {self.manifest['codebook_id']}")
                continue
            sent = message.codes if message.silent is None else message.codes[~message.silent]
            if sent.size and int(sent.max()) >= self.manifest["codebook_size"]:
                # the right codebook id but a code the codebook does not have: the model would
                # index past its embedding table on every retry
                self.store.dead_letter("CodeOutOfRange", item.topic, item.payload,
                                       f"code {int(sent.max())} >= codebook size {self.manifest['codebook_size']}")
                continue
            codes = context_codes(message, self.silence_code)
            decoded.frames.append((site, device, WorkItem(message.seq, message.t_end_ns, item.received_ns, codes)))
            decoded.sources.append(item)
        record.counts.update({"received": received, f"received_by:{self.replica}": received})
        record.lap("decode")
        return decoded

    def _accept(self, decoded: Decoded, record: RoundRecord) -> set[DeviceKey]:
        """Devices with newly ready work."""
        frames = decoded.frames
        results = self.log.accept_many(frames, time.time_ns() // 1_000_000) if frames else []
        counts = record.counts
        ready = set()
        for (site, device, item), source, accepted in zip(frames, decoded.sources, results, strict=True):
            if accepted.seq_jump:
                self.store.dead_letter("SeqJump", source.topic, source.payload,
                                       f"seq {item.seq} runs further ahead of the device's newest than its time allows")
                continue
            counts["accepted" if accepted.new else "duplicates"] += 1
            if accepted.lost:
                counts["lost"] += accepted.lost
                log.warning("%s/%s: %d messages never arrived within the reorder window", site, device,
                            accepted.lost)
            if accepted.released:
                ready.add((site, device))
        record.lap("accept")
        return ready

    # --- 4-6: the held devices' work ----------------------------------------------------
    def _process(self, held: dict[DeviceKey, Lease], record: RoundRecord) -> None:
        peeks = [p for p in self.log.peek_many(list(held.values()), PEEK_ITEMS) if p.items]
        record.lap("peek")
        windows: list[np.ndarray] = []  # (T,) contexts whose last window gets classified
        slots: list[list[int]] = []  # per peek, per item: its index in windows, or -1 (no full window yet)
        contexts: list[np.ndarray] = []  # per peek: the context after its last item
        spans: list[tuple[int, int]] = []  # per peek: its windows, windows[start:end]
        for peek in peeks:
            context, item_slots, start = peek.context, [], len(windows)
            for item in peek.items:
                context = np.concatenate([context, item.codes])[-self.context :]  # (T,) codes, oldest first
                if len(context) >= self.window:
                    item_slots.append(len(windows))
                    windows.append(context)
                else:
                    item_slots.append(-1)
            slots.append(item_slots)
            contexts.append(context)
            spans.append((start, len(windows)))
        probs, refused = self.models.classify(windows, spans, record.counts)  # (N, L)
        for k, reason in refused.items():  # the models fail on this device's frames alone: set them aside
            slots[k] = [-1] * len(slots[k])  # committed as processed, no event logic on them
            self._dead_letter_items(peeks[k], reason)
        record.lap("models")
        commits, events = [], []
        for peek, item_slots, context in zip(peeks, slots, contexts, strict=True):
            states, closed = self._events(peek, item_slots, probs)
            events.append(closed)
            commits.append(Commit(peek.lease, peek.items, context, states, [self._event_fields(e) for e in closed]))
        record.lap("events")
        committed = self.log.commit_many(commits, self.replica)
        record.lap("commit")
        now_ns = time.time_ns()
        for peek, item_slots, closed, ok in zip(peeks, slots, events, committed, strict=True):
            lease = peek.lease
            if not ok:
                log.warning("%s/%s: lost the lease before seq %d..%d were committed; another replica redoes them",
                            lease.site, lease.device, peek.items[0].seq, peek.items[-1].seq)
                held.pop((lease.site, lease.device), None)
                continue
            self._publish(closed)
            if self.archive.wants(lease.site):  # after the commit: a crash here misses it in the archive only
                for item in peek.items:
                    self.archive.append(lease.site, lease.device, item)
            # ingest-to-classification latency, from the capture time of the window's last sample
            # (or from receipt, for a file replayed faster than real time: its capture times lie ahead)
            record.latencies_ms += [(now_ns - min(item.t_end_ns, item.received_ns)) / 1e6
                                    for item, slot in zip(peek.items, item_slots, strict=True) if slot >= 0]
        record.lap("outputs")

    def _events(self, peek: Peek, item_slots: list[int], probs: np.ndarray) -> tuple[dict, list[SoundEvent]]:
        """The event logic over one device's items, in seq order: its new state and closed events."""
        states = {label: event_logic.LabelState.from_dict(d) for label, d in peek.states.items()}
        closed_events = []
        for item, slot in zip(peek.items, item_slots, strict=True):
            if slot < 0:
                continue
            start_ns = item.t_end_ns - self.window * FRAME_DURATION_NS
            for label, p in zip(self.labels, probs[slot], strict=True):
                state = states.setdefault(label, event_logic.LabelState())
                closed = event_logic.step(state, self.policies[label], float(p), start_ns, item.t_end_ns, item.seq)
                if closed:
                    closed_events.append(self._event(peek.lease.site, peek.lease.device, label, closed))
        return {label: s.to_dict() for label, s in states.items()}, closed_events

    def _dead_letter_items(self, peek: Peek, reason: str) -> None:
        """A device's work items the models refuse: to the dead-letter stream (as device-log
        items: seq, capture end, receipt, codes; `WorkItem.from_bytes`), counted as model_error."""
        lease = peek.lease
        log.error("%s/%s: the models refuse seq %d..%d (%s): dead-lettered, processed without events",
                  lease.site, lease.device, peek.items[0].seq, peek.items[-1].seq, reason)
        for item in peek.items:
            self.store.dead_letter("model_error", frames_topic(lease.site, lease.device), item.to_bytes(),
                                   detail=f"seq {item.seq}: {reason}")

    # --- 7: statuses ----------------------------------------------------------------------
    def _status(self, site: str, device: str, status: StatusMessage | None, held: dict[DeviceKey, Lease],
                record: RoundRecord) -> None:
        if status is None:  # an empty retained message deletes the retained status
            record.counts["status_cleared"] += 1
            return
        # an online status is a full heartbeat; an offline one (often the last will) only says so,
        # so the device keeps its last known versions, spool depth, CPU and memory
        fields = status.to_dict() if status.state == "online" else {"state": status.state, "t_ns": status.t_ns}
        self.store.set_status(site, device, fields)
        if self.discovery is not None:  # Home Assistant: one event entity per device, on first sight
            self.discovery.on_status(self.mqtt(), site, device, status)
        if status.state == "offline":
            self._close_events(site, device, held)

    def _close_events(self, site: str, device: str, held: dict[DeviceKey, Lease]) -> None:
        """The stream ended: close whatever is still active, under the device's lease (this
        worker's, if it holds it; else taken, waiting up to CLOSE_WAIT_S for its holder)."""
        lease = held.get((site, device))
        own = lease is None
        deadline = time.monotonic() + CLOSE_WAIT_S
        while lease is None:
            lease = self.log.lease(site, device)
            if lease is None:
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
            if self.log.commit(lease, [], None, {k: s.to_dict() for k, s in states.items()},
                               [self._event_fields(e) for e in events]):
                self._publish(events)
        finally:
            if own:
                self.log.release(lease)

    # --- events ------------------------------------------------------------------------------
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
            self.mqtt().publish(events_topic(event.site, event.device), event.to_bytes(), qos=1)
            log.info("event %s on %s/%s score %.2f", event.label, event.site, event.device, event.score)

    def dead_letter_round(self, inbound: list[Inbound | Drain], reason: str = "internal_error") -> None:
        """A round failed on something other than Redis (a bug): keep its messages for a look."""
        for item in inbound:
            if isinstance(item, Inbound):
                self.store.dead_letter(reason, item.topic, item.payload)
