"""Everything the cloud keeps in Redis, behind one small class.

Keys (all under the configured prefix, default ``sf:``)::

    dev:{site}:{device}      hash   last_seq, status, model/codebook, counters
    ctx:{site}:{device}      string the latest codes (uint16 LE), the code LM's context
    evstate:{site}:{device}  hash   label -> JSON LabelState (event logic)
    pend/work/lease:{s}:{d}, active   the per-device ordered work queue (cloud/device_log.py)
    events                   stream one entry per event (JSON + filter fields)
    deadletter               stream rejected payloads with the reason
    metrics                  hash   counters: received, accepted, rejected:<reason>, ...
    hist:{name}              hash   histogram: bucket upper bound ("le") -> count, plus sum and count
    samples:{name}           list   the latest raw observations (newest first, capped), for benchmarks
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Mapping

import redis

from shared_models.wire import SoundEvent

log = logging.getLogger(__name__)

DEADLETTER_MAXLEN = 10_000
SAMPLES_MAXLEN = 200_000  # raw observations kept per histogram: a few minutes of a 500-device fleet
# histogram bucket upper bounds (Prometheus "le"), by metric name
HISTOGRAM_BUCKETS: dict[str, tuple[float, ...]] = {
    "latency_ms": (5, 10, 25, 50, 100, 150, 200, 250, 500, 1000, 2500, 5000, 10000),
    "batch_size_code_lm": (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),  # windows per forward pass, by model
    "batch_size_classifier": (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
}
INGEST_STAGES = ("decode", "accept", "lease", "peek", "models", "events", "commit", "outputs", "statuses",
                 "release", "round")
"""Steps of an ingest round (cloud/pipeline.py), each timed into histogram ``stage_ms_<stage>``;
"round" is the whole round."""
for _stage in INGEST_STAGES:
    HISTOGRAM_BUCKETS[f"stage_ms_{_stage}"] = (0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)
HISTOGRAM_BUCKETS["round_messages"] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
RAW_SAMPLES = frozenset({"latency_ms"})
"""Histograms whose raw values are kept too (``samples:{name}``), for benchmarks."""
DEADLETTER_PAYLOAD_BYTES = 64 * 1024


def persistence_warning(persistence: str) -> str:
    """What an operator reads (the ingest's log, /readyz) when Redis would lose data on a restart."""
    if persistence == "none":
        loss = "a restart forgets every device's last seq, context and unprocessed work"
    else:
        loss = "a crash loses every write since the last snapshot"
    return (f"Redis runs with persistence {persistence!r}: {loss}; "
            "run it with appendonly yes (infra/redis/redis.conf)")


class CloudStore:
    def __init__(self, url: str, prefix: str = "sf:", events_maxlen: int = 100_000):
        self.r = redis.Redis.from_url(url, socket_timeout=10)
        self.prefix = prefix
        self.events_maxlen = events_maxlen

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def ping(self) -> bool:
        return bool(self.r.ping())

    def persistence(self) -> str:
        """How Redis keeps its data across a restart: "aof" (append-only file), "rdb" (snapshots
        only: a crash loses the writes since the last one), "none", or "unknown" where CONFIG is
        not allowed (managed Redis services often rename it)."""
        try:
            config = self.r.config_get("appendonly") | self.r.config_get("save")
        except redis.ResponseError:
            return "unknown"
        if config.get("appendonly") == "yes":
            return "aof"
        return "rdb" if config.get("save") else "none"

    # --- device status ------------------------------------------------------
    def set_status(self, site: str, device: str, status: dict) -> None:
        self.r.hset(self.key("dev", site, device), mapping={f"status_{k}": str(v) for k, v in status.items()})

    def devices(self) -> list[dict]:
        out = []
        for key in self.r.scan_iter(match=self.key("dev", "*"), count=500):
            site, device = key.decode()[len(self.prefix) :].split(":")[1:3]
            fields = {k.decode(): v.decode() for k, v in self.r.hgetall(key).items()}
            out.append({"site": site, "device": device, **fields})
        return sorted(out, key=lambda d: (d["site"], d["device"]))

    # --- outputs --------------------------------------------------------------
    def append_event(self, event: SoundEvent) -> str:
        fields = {"site": event.site, "device": event.device, "label": event.label, "json": event.to_bytes()}
        entry_id = self.r.xadd(self.key("events"), fields, maxlen=self.events_maxlen, approximate=True)
        self.count("events")
        return entry_id.decode()

    def events(self, site: str | None = None, device: str | None = None, label: str | None = None,
               since_ns: int = 0, limit: int = 100) -> list[dict]:
        """Newest first, filtered; scans back at most 10x ``limit`` entries."""
        out = []
        for _, fields in self.r.xrevrange(self.key("events"), count=limit * 10):
            if (site and fields[b"site"].decode() != site) or (device and fields[b"device"].decode() != device):
                continue
            if label and fields[b"label"].decode() != label:
                continue
            event = json.loads(fields[b"json"])
            if event["end_ns"] < since_ns:
                continue
            out.append(event)
            if len(out) >= limit:
                break
        return out

    def dead_letter(self, reason: str, topic: str, payload: bytes, detail: str = "") -> None:
        self.r.xadd(
            self.key("deadletter"),
            {"reason": reason, "topic": topic, "detail": detail[:500], "t_ns": time.time_ns(),
             "payload": payload[:DEADLETTER_PAYLOAD_BYTES]},
            maxlen=DEADLETTER_MAXLEN,
            approximate=True,
        )
        self.count(f"rejected:{reason}")

    def count(self, *names: str, n: int = 1) -> None:
        """Add ``n`` to each counter named (one round trip)."""
        self.add(dict.fromkeys(names, n))

    def observe(self, name: str, values: list[float]) -> None:
        """Add observations to histogram ``name``: see `record`."""
        self.record({}, {name: values})

    def add(self, counts: Mapping[str, int]) -> None:
        """Add each amount to its counter: see `record`."""
        self.record(counts, {})

    def record(self, counts: Mapping[str, int], observations: Mapping[str, list[float]]) -> None:
        """Add to counters (zeros skipped) and to histograms (shared by every replica, as Redis
        is; those in RAW_SAMPLES also keep a capped list of raw values), in one round trip."""
        pipe, metrics = self.r.pipeline(transaction=False), self.key("metrics")
        for name, n in counts.items():
            if n:
                pipe.hincrby(metrics, name, n)
        for name, values in observations.items():
            if not values:
                continue
            hist, buckets = self.key("hist", name), Counter()
            for value in values:
                buckets[str(next((b for b in HISTOGRAM_BUCKETS[name] if value <= b), "+Inf"))] += 1
            for le, n in buckets.items():
                pipe.hincrby(hist, le, n)
            pipe.hincrbyfloat(hist, "sum", float(sum(values)))
            pipe.hincrby(hist, "count", len(values))
            if name in RAW_SAMPLES:
                pipe.lpush(self.key("samples", name), *[f"{v:.3f}" for v in values])
                pipe.ltrim(self.key("samples", name), 0, SAMPLES_MAXLEN - 1)
        if len(pipe):
            pipe.execute()

    def histogram(self, name: str) -> dict[str, float]:
        """Bucket upper bound -> count (not cumulative), plus "sum" and "count"."""
        return {k.decode(): float(v) for k, v in self.r.hgetall(self.key("hist", name)).items()}

    def samples(self, name: str, limit: int = SAMPLES_MAXLEN) -> list[float]:
        """The latest raw observations, newest first."""
        return [float(v) for v in self.r.lrange(self.key("samples", name), 0, limit - 1)]

    def metrics(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.r.hgetall(self.key("metrics")).items()}
