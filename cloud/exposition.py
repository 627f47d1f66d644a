"""The cloud's metrics as Prometheus text exposition (format 0.0.4), from what is in Redis.

Counters come from the shared metrics hash (every replica counts there), gauges
from the ingest replica's live stats, histograms from ``hist:{name}`` hashes.
Those hashes hold per-bucket counts (keyed by the bucket's upper bound, plus
"+Inf", "sum" and "count"); Prometheus wants cumulative ``_bucket{le=...}``
lines ending at ``le="+Inf"`` equal to ``_count``, so ``_count`` is the sum of
the buckets read in the same HGETALL (the separate "count" field may be one
pipeline ahead of them).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from cloud.store import HISTOGRAM_BUCKETS, INGEST_STAGES

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
NAMESPACE = "soundfleet"

COUNTER_HELP: dict[str, str] = {
    "received": "MQTT messages the ingest received (frames and status)",
    "accepted": "frames messages accepted into a device context",
    "duplicates": "frames messages dropped as duplicates (seq already seen)",
    "gaps": "frames messages missing in a device's seq sequence",
    "events": "sound events emitted",
    "status_cleared": "retained status messages cleared (empty payload)",
    "rejected": "payloads rejected (and dead-lettered), by reason",
}
"""Counters always exported (as 0 before the first increment), in this order; any other key of
the metrics hash is exported too, with a generic help text."""
LABELLED_COUNTERS: dict[str, str] = {"rejected": "reason", "received_by": "replica", "processed_by": "replica"}
"""Hash keys ``name:value`` become ``soundfleet_<name>_total{<label>="value"}``; label "key" if not listed."""

GAUGE_HELP: dict[str, str] = {
    "queued": "MQTT messages waiting in the ingest queues",
    "mqtt_connected": "1 when the ingest is connected and subscribed to the broker",
    "workers_alive": "ingest worker threads alive",
    "redis_reachable": "1 when the ingest replica reached Redis for this scrape",
    "lag_seconds": "capture-to-classification seconds of the slowest frame of the replica's latest round (0 when idle): grows while frames wait in the broker",
    "stuck_seconds": "seconds the replica's oldest unfinished round has run (retrying while Redis is away); 0 when none",
}

HISTOGRAMS: dict[str, tuple[str, dict[str, str], str]] = {
    "latency_ms": ("latency_ms", {}, "capture-to-classification latency of each frames message, ms"),
    "batch_size_code_lm": ("batch_size", {"model": "code_lm"}, "windows per forward pass of a cloud model"),
    "batch_size_classifier": ("batch_size", {"model": "classifier"}, "windows per forward pass of a cloud model"),
    "round_messages": ("ingest_round_messages", {}, "MQTT messages per ingest round"),
    **{f"stage_ms_{stage}": ("ingest_stage_ms", {"stage": stage}, "time per ingest round and stage, ms")
       for stage in INGEST_STAGES},
}
"""Redis histogram name -> (metric name, labels, help). Several may share one metric name."""


def _name(raw: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", raw)


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    escape = lambda v: v.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")  # noqa: E731
    return "{" + ",".join(f'{k}="{escape(str(v))}"' for k, v in labels.items()) + "}"


def _value(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if isinstance(v, float) and not float(v).is_integer() else str(int(v))


def _family(lines: list[str], name: str, kind: str, help_text: str) -> None:
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} {kind}")


def counters(metrics: Mapping[str, int]) -> list[str]:
    families: dict[str, list[tuple[dict[str, str], int]]] = {k: [] for k in COUNTER_HELP}
    for key, value in metrics.items():
        name, sep, label_value = key.partition(":")
        labels = {LABELLED_COUNTERS.get(name, "key"): label_value} if sep else {}
        families.setdefault(name, []).append((labels, value))
    lines: list[str] = []
    for name, samples in families.items():
        metric = f"{NAMESPACE}_{_name(name)}_total"
        _family(lines, metric, "counter", COUNTER_HELP.get(name, f"the {name!r} counter"))
        if not samples and name not in LABELLED_COUNTERS:
            samples = [({}, 0)]
        for labels, value in sorted(samples, key=lambda s: sorted(s[0].items())):
            lines.append(f"{metric}{_labels(labels)} {value}")
    return lines


def gauges(stats: Mapping[str, object] | None) -> list[str]:
    """The numbers in the ingest stats of the replica that answered (labelled with its id when the
    stats name it); ``stats`` None when no ingest answered (``ingest_up`` 0)."""
    lines: list[str] = []
    _family(lines, f"{NAMESPACE}_ingest_up", "gauge", "1 when the ingest replica answered this scrape")
    lines.append(f"{NAMESPACE}_ingest_up {int(stats is not None)}")
    replica = (stats or {}).get("replica")
    labels = _labels({"replica": replica} if isinstance(replica, str) else {})
    for key, value in (stats or {}).items():
        if isinstance(value, bool | int | float):  # numbers only: not "metrics" (the counters) or ids
            name = f"{NAMESPACE}_ingest_{_name(key)}"
            _family(lines, name, "gauge", GAUGE_HELP.get(key, f"ingest {key!r}"))
            lines.append(f"{name}{labels} {_value(float(value))}")
    return lines


def histogram_lines(name: str, labels: Mapping[str, str], buckets: tuple[float, ...],
                    counts: Mapping[str, float]) -> list[str]:
    """Cumulative ``_bucket`` lines, ``_sum`` and ``_count`` of one labelled histogram."""
    lines, total = [], 0.0
    for bound in buckets:
        total += counts.get(str(bound), 0.0)
        lines.append(f"{name}_bucket{_labels({**labels, 'le': _value(float(bound))})} {_value(total)}")
    total += counts.get("+Inf", 0.0)
    lines.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {_value(total)}")
    lines.append(f"{name}_sum{_labels(labels)} {_value(counts.get('sum', 0.0))}")
    lines.append(f"{name}_count{_labels(labels)} {_value(total)}")
    return lines


def histograms(stored: Mapping[str, Mapping[str, float]]) -> list[str]:
    """``stored``: Redis histogram name -> its hash (``CloudStore.histogram``)."""
    lines: list[str] = []
    families: dict[str, list[str]] = {}
    for key, (metric, labels, help_text) in HISTOGRAMS.items():
        name = f"{NAMESPACE}_{metric}"
        if name not in families:
            families[name] = []
            _family(families[name], name, "histogram", help_text)
        families[name] += histogram_lines(name, labels, HISTOGRAM_BUCKETS[key], stored.get(key, {}))
    for family in families.values():
        lines += family
    return lines


def render(metrics: Mapping[str, int], stats: Mapping[str, object] | None,
           stored_histograms: Mapping[str, Mapping[str, float]]) -> str:
    return "\n".join([*counters(metrics), *gauges(stats), *histograms(stored_histograms)]) + "\n"
