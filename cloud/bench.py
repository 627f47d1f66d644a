"""Cloud benchmark: a simulated fleet through the real Serve app (``soundfleet bench cloud``).

One run: a local Ray cluster (or ``RAY_ADDRESS``), the cloud app deployed under a fresh Redis
key prefix on the configured broker and Redis (embedded ones when those do not answer), a
short warm-up, then :func:`soundfleet.fleet.simulate_fleet` streams N devices for S seconds
at real time; the benchmark waits (bounded) for the ingest to drain and reads back from Redis
what was accepted per device (``dev:{site}:{device}`` ``frames``), the counters and the
ingest-to-classification latency samples (``samples:latency_ms``: ``now - t_end_ns`` when a
message's window has been classified; the simulator sends each message at its ``t_end_ns``).
The same is measured again with batching off (the ingest's rounds of one message,
``ingest_batch_size=1``, and Serve's ``max_batch_size=1``), redeployed under a new prefix.
``find_max`` first steps the fleet size up until a step fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge.bench import machine_info
from shared_models.constants import DEFAULT_FRAMES_PER_MESSAGE
from shared_models.wire import FramesMessage, frames_topic
from soundfleet.config import CloudConfig
from soundfleet.fleet import FleetSettings, Tracks, device_name, encode_tracks, simulate_fleet

log = logging.getLogger(__name__)

APP_NAME = "soundfleet-bench"  # never the production app's name, even on a shared cluster
DEFAULT_DEVICES = 500
DEFAULT_SECONDS = 60.0
FIND_MAX_STEPS = (50, 100, 200, 300, 500)
DRAIN_TIMEOUT_S = 60.0  # at most this long after the fleet stops for the ingest to catch up
DRAIN_IDLE_S = 15.0  # ... and give up sooner when nothing was accepted for this long
WARMUP_MESSAGES = 3
SETTLE_S = 5.0  # longest wait, once every frame is processed, for the last rounds' latency samples
TARGETS: dict[str, float] = {  # SPEC section 3, cloud
    "streams": 500,  # at least, concurrent real-time device streams on 2 cores
    "p99_ms": 250,  # at most, ingest-to-classification latency
    "frames_lost": 0,
    "frames_duplicated": 0,
}
# the app's counters (metrics hash) worth reporting, besides rejected:<reason>
COUNTERS = ("accepted", "duplicates", "lost", "processed", "received", "model_retries", "gaps")
STREAMS_DEFINITION = (
    "the largest fleet size run here (with batching) whose every message was accepted exactly "
    "once and classified, with p99 latency <= 250 ms; 0 if no size run here did")


class BenchError(RuntimeError):
    """The benchmark cannot run: bad arguments, or a service or the app did not come up."""


@dataclass
class CloudBenchSettings:
    devices: int = DEFAULT_DEVICES
    seconds: float = DEFAULT_SECONDS
    find_max: bool = False
    steps: tuple[int, ...] = FIND_MAX_STEPS
    profile: bool = False
    processes: int = 0  # fleet simulator processes (0 = its default)
    drain_timeout_s: float = DRAIN_TIMEOUT_S
    burst_s: float = 0.0  # after the real-time phase, an outage of this long, then the backlog at once
    compare_auto_ack: bool = False  # also run batched with paho's ack on receipt: the cost of manual acks

    def validate(self) -> None:
        if self.devices < 1 or self.seconds < 1 or self.drain_timeout_s < 0 or self.burst_s < 0:
            raise BenchError("bench cloud needs --devices >= 1, --seconds >= 1, --drain-timeout-s >= 0 "
                             "and --burst >= 0")


def run_cloud_bench(cloud: CloudConfig, settings: CloudBenchSettings) -> dict[str, Any]:
    """Run the benchmark; returns the report (see docs/BENCH_CLOUD.md)."""
    settings.validate()
    machine = machine_info()  # load average before we add to it
    with contextlib.ExitStack() as stack:
        broker_url, broker_desc = stack.enter_context(_service("broker", cloud.broker_url))
        redis_url, redis_desc = stack.enter_context(_service("redis", cloud.redis_url))
        cloud = dataclasses.replace(cloud, broker_url=broker_url, redis_url=redis_url)
        tracks = encode_tracks(cloud.bundle_dir or None)
        ray_desc = _start_ray(stack)
        steps = []
        if settings.find_max:
            for n in sorted({s for s in settings.steps if s < settings.devices} | {settings.devices}):
                steps.append(measure(cloud, settings, tracks, n, batching=True))
                if not steps[-1]["kept_up"]:
                    break
        batched = next((s for s in steps if s["devices"] == settings.devices), None)
        batched = batched or measure(cloud, settings, tracks, settings.devices, batching=True)
        unbatched = measure(cloud, settings, tracks, settings.devices, batching=False)
        auto_ack = (measure(dataclasses.replace(cloud, ingest_manual_ack=not cloud.ingest_manual_ack), settings,
                            tracks, settings.devices, batching=True) if settings.compare_auto_ack else None)
    services = {"broker": broker_desc, "redis": redis_desc, "ray": ray_desc}
    report = build_report(settings, cloud, batched, unbatched, steps, services, machine)
    if auto_ack is not None:
        report["ack_comparison"] = _ack_comparison(batched, auto_ack, cloud.ingest_manual_ack)
    return report


def _ack_comparison(batched: dict, other: dict, manual: bool) -> dict[str, Any]:
    """The batched run beside the same run with the other acknowledgement mode."""
    runs = {"manual_ack": batched, "auto_ack": other} if manual else {"manual_ack": other, "auto_ack": batched}
    keys = ("p50_ms", "p99_ms", "max_ms", "frames_lost", "frames_duplicated", "drain_s")
    out: dict[str, Any] = {mode: {k: run[k] for k in keys} for mode, run in runs.items()}
    for k in ("p50_ms", "p99_ms"):
        a, b = runs["manual_ack"][k], runs["auto_ack"][k]
        out[f"{k}_ratio_manual_over_auto"] = round(a / b, 3) if a and b else None
    return out


@contextlib.contextmanager
def _service(kind: str, url: str):
    """The configured broker / Redis when it answers, else an embedded one."""
    from soundfleet.services import ensure_broker, ensure_redis, probe_mqtt, probe_redis, redact_url

    probe, ensure = (probe_mqtt, ensure_broker) if kind == "broker" else (probe_redis, ensure_redis)
    reason = probe(url)
    if reason is not None:
        log.warning("%s %s does not answer (%s): starting an embedded one", kind, redact_url(url), reason)
        url = None
    with ensure(url) as (url, description):
        yield url, description


def _start_ray(stack: contextlib.ExitStack) -> str:
    """Join RAY_ADDRESS, else start a new local cluster (never another session's cluster)."""
    import ray

    address = os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, include_dashboard=False, log_to_driver=False,
             namespace=f"soundfleet-bench-{uuid.uuid4().hex[:8]}")
    stack.callback(ray.shutdown)  # a local cluster goes with it, Serve included
    if address == "local":
        return f"local Ray {ray.__version__} cluster started for the benchmark"
    return f"Ray {ray.__version__} cluster at RAY_ADDRESS={address}"


@contextlib.contextmanager
def stdout_to_stderr():
    """Send everything written to file descriptor 1 to 2 meanwhile (Ray's daemons and its
    driver threads print there), so that stdout carries the report alone."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _delete_app(config: CloudConfig) -> None:
    from ray import serve

    from cloud.mqtt_session import forget_sessions

    with contextlib.suppress(Exception):  # already gone
        serve.delete(APP_NAME)
    forget_sessions(config)  # the run's ingest sessions would collect every later frame


def _deploy(config: CloudConfig) -> None:
    from ray import serve

    from cloud.app import build_app

    serve.start(http_options={"host": config.http_host, "port": config.http_port})
    serve.run(build_app(config), name=APP_NAME, route_prefix=f"/{APP_NAME}")


def measure(cloud: CloudConfig, settings: CloudBenchSettings, tracks: Tracks, devices: int,
            batching: bool) -> dict[str, Any]:
    """One fleet run against a freshly deployed app, batching as configured or all off; its
    figures (see :func:`build_report`)."""
    from cloud.store import CloudStore
    from soundfleet.services import free_port

    run_id = uuid.uuid4().hex[:8]
    # no Home Assistant discovery: it would announce hundreds of simulated devices, retained, to
    # whatever Home Assistant watches the broker (it runs on statuses only, off the frames' path)
    config = dataclasses.replace(cloud, key_prefix=f"sfbench:{run_id}:", http_port=free_port(),
                                 ha_discovery_prefix="")
    if not batching:
        config = dataclasses.replace(config, max_batch_size=1, ingest_batch_size=1)
    site = f"bench-{run_id}"
    log.info("bench: deploying the app (ingest_batch_size %d, max_batch_size %d) under Redis prefix %s",
             config.ingest_batch_size, config.max_batch_size, config.key_prefix)
    t0 = time.monotonic()
    _deploy(config)
    deploy_s = time.monotonic() - t0
    store = CloudStore(config.redis_url, config.key_prefix)
    try:
        warm = _warm_up(store, config.broker_url, tracks, site)
        profiler = _profiler(store, config, site) if settings.profile else None
        if profiler:
            profiler.start()
        fleet = simulate_fleet(FleetSettings(devices=devices, seconds=settings.seconds, realtime=True,
                                             site=site, broker_url=config.broker_url,
                                             processes=settings.processes, burst_s=settings.burst_s), tracks)
        drain_s, drained = _drain(store, site, fleet, settings.drain_timeout_s)
        if drained:
            _settle(store, warm + fleet["messages_sent"])
        figures = _figures(store, site, fleet, warm)
        figures["ingest_queued_at_end"] = _ingest_queued()  # messages of any kind, in memory
        if profiler:
            figures["profile"] = profiler.stop(figures["messages_processed"])
    finally:
        _delete_app(config)
        _delete_keys(store)
    figures.update(ingest_batch_size=config.ingest_batch_size, max_batch_size=config.max_batch_size,
                   manual_ack=config.ingest_manual_ack,
                   load_average_1m_after=round(os.getloadavg()[0], 2),
                   site=site, key_prefix=config.key_prefix,
                   deploy_s=round(deploy_s, 1),
                   drain_s=round(drain_s, 1), drained=drained)
    log.info("bench: %d devices, batching %s: p50 %.0f ms, p99 %.0f ms, %d frames lost, %d duplicated",
             devices, "on" if batching else "off", figures["p50_ms"] or -1, figures["p99_ms"] or -1,
             figures["frames_lost"], figures["frames_duplicated"])
    return figures


def _warm_up(store, broker_url: str, tracks: Tracks, site: str) -> int:
    """A few messages of one device through the whole path (the models' first calls are slow);
    returns how many latency samples they left, so the measurement skips them."""
    from soundfleet.services import mqtt_client

    client, endpoint = mqtt_client(broker_url, f"sf-bench-warmup-{uuid.uuid4().hex[:6]}")
    client.connect(endpoint.host, endpoint.port)
    client.loop_start()
    topic, frames = frames_topic(site, "warmup"), DEFAULT_FRAMES_PER_MESSAGE
    now = time.time_ns()
    try:
        for seq in range(WARMUP_MESSAGES):
            message = FramesMessage(codebook_id=tracks.codebook_id, seq=seq,
                                    t_start_ns=now - (WARMUP_MESSAGES - seq) * 1_000_000_000,
                                    codes=tracks.codes[0, seq * frames: (seq + 1) * frames])
            client.publish(topic, message.to_bytes(), qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()
    deadline = time.monotonic() + 60
    while len(store.samples("latency_ms")) < WARMUP_MESSAGES and time.monotonic() < deadline:
        time.sleep(0.2)
    warm = len(store.samples("latency_ms"))
    if warm < WARMUP_MESSAGES:
        log.warning("bench: only %d of %d warm-up messages were classified within 60 s", warm, WARMUP_MESSAGES)
    return warm


def _ingest_queued() -> int | None:
    """Messages waiting in the ingest's in-memory queues (None if it does not answer in time)."""
    from ray import serve

    try:
        return int(serve.get_deployment_handle("Ingest", app_name=APP_NAME).stats.remote()
                   .result(timeout_s=10)["queued"])
    except Exception as exc:  # a replica too busy to answer is itself a finding, not a failure
        log.warning("bench: the ingest did not report its queue: %s", exc)
        return None


def _profiler(store, config: CloudConfig, site: str):
    from ray import serve

    from cloud.bench_profile import Profiler, listening_pid
    from soundfleet.services import parse_mqtt_url

    ingest = serve.get_deployment_handle("Ingest", app_name=APP_NAME)
    endpoint = parse_mqtt_url(config.broker_url)
    broker_pid = listening_pid(endpoint.port) if endpoint.host in ("127.0.0.1", "localhost") else None
    return Profiler(store.r, APP_NAME, broker_pid, lambda: ingest.stats.remote().result(timeout_s=2),
                    f"soundfleet/v1/{site}/+/frames", config.broker_url)


DEVICE_FIELDS = ("frames", "processed", "lost", "duplicates", "restarts")  # of dev:{site}:{device}


def _device_counts(store, site: str, names: list[str]) -> list[dict[str, int]]:
    """Per device: frames processed (classified and committed), messages processed, messages
    given up as lost, duplicate deliveries dropped, restarts (seq 0 again)."""
    pipe = store.r.pipeline(transaction=False)
    for name in names:
        pipe.hmget(store.key("dev", site, name), *DEVICE_FIELDS)
    return [{f: int(v or 0) for f, v in zip(DEVICE_FIELDS, values, strict=True)} for values in pipe.execute()]


def _drain(store, site: str, fleet: dict, timeout_s: float) -> tuple[float, bool]:
    """Wait until every frame sent was processed, nothing moved for DRAIN_IDLE_S, or timeout_s."""
    names, t0 = list(fleet["last_seq"]), time.monotonic()
    last, last_change = -1, t0
    while True:
        accepted = sum(d["frames"] for d in _device_counts(store, site, names))
        now = time.monotonic()
        if accepted >= fleet["frames_sent"]:
            return now - t0, True
        if accepted != last:
            last, last_change = accepted, now
        if now - t0 >= timeout_s or now - last_change >= DRAIN_IDLE_S:
            log.warning("bench: %d of %d frames processed after %.0f s; not waiting longer",
                        accepted, fleet["frames_sent"], now - t0)
            return now - t0, False
        time.sleep(0.5)


def _settle(store, samples: int, timeout_s: float = SETTLE_S) -> None:
    """Wait (bounded) for the latency samples and counters of the last rounds: an ingest round
    writes them after its commits, so the frames count in Redis runs a few ms ahead of them."""
    from cloud.store import SAMPLES_MAXLEN

    key, deadline = store.key("samples", "latency_ms"), time.monotonic() + timeout_s
    while store.r.llen(key) < min(samples, SAMPLES_MAXLEN) and time.monotonic() < deadline:
        time.sleep(0.05)


def _figures(store, site: str, fleet: dict, warm_samples: int) -> dict[str, Any]:
    from cloud.store import INGEST_STAGES

    frames = fleet["frames_per_message"]
    names = [device_name("sim", k) for k in range(fleet["devices"])]
    per_device = _device_counts(store, site, names)
    sent = [(fleet["last_seq"].get(n, -1) + 1) * frames for n in names]
    got = [d["frames"] for d in per_device]  # processed exactly once, or more if duplicated
    lost = sum(max(0, s - g) for s, g in zip(sent, got, strict=True))
    duplicated = sum(max(0, g - s) for s, g in zip(sent, got, strict=True))
    # newest first: everything before the warm-up's samples is this run's
    all_samples = store.samples("latency_ms")
    latency = np.array(all_samples[: len(all_samples) - warm_samples])
    metrics = store.metrics()
    p50, p95, p99 = np.percentile(latency, [50, 95, 99]) if latency.size else (None, None, None)
    processed = sum(got)
    figures = {
        "devices": fleet["devices"],
        "p50_ms": _round(p50), "p95_ms": _round(p95), "p99_ms": _round(p99),
        "max_ms": _round(latency.max() if latency.size else None),
        "latency_samples": int(latency.size),
        "frames_sent": fleet["frames_sent"],
        "frames_processed": processed,
        "frames_lost": lost,  # sent, not processed when the bounded drain ended (see "drained")
        "frames_given_up": sum(d["lost"] for d in per_device) * frames,  # the app's reorder window
        "frames_duplicated": duplicated,
        "messages_sent": fleet["messages_sent"],
        "messages_acked": fleet["messages_acked"],  # by the broker (QoS 1 PUBACK)
        "messages_processed": processed // frames,
        "devices_incomplete": sum(g < s for s, g in zip(sent, got, strict=True)),
        "devices_restarted": sum(d["restarts"] > 0 for d in per_device),
        "counters": {k: v for k, v in sorted(metrics.items()) if k in COUNTERS or k.startswith("rejected:")},
        "mean_batch_size": {name: _mean(store.histogram(f"batch_size_{name}"))
                            for name in ("code_lm", "classifier")},
        "mean_round_messages": _mean(store.histogram("round_messages")),  # MQTT messages per ingest round
        "mean_stage_ms": {stage: _mean(store.histogram(f"stage_ms_{stage}")) for stage in INGEST_STAGES},
        "fleet_send_lateness_ms": fleet["send_lateness_ms"],
        "fleet_errors": fleet["errors"],
        "burst": fleet["burst"],  # with --burst: the backlog's size and how fast the broker took it
    }
    figures["kept_up"] = bool(lost == 0 and duplicated == 0 and p99 is not None and p99 <= TARGETS["p99_ms"]
                              and latency.size >= fleet["messages_sent"])
    return figures


def _mean(histogram: dict[str, float]) -> float | None:
    return round(histogram["sum"] / histogram["count"], 2) if histogram.get("count") else None


def _round(value: Any) -> float | None:
    return None if value is None else round(float(value), 1)


def _delete_keys(store) -> None:
    keys = list(store.r.scan_iter(match=f"{store.prefix}*", count=1000))
    for i in range(0, len(keys), 1000):
        store.r.delete(*keys[i: i + 1000])


def build_report(settings: CloudBenchSettings, cloud: CloudConfig, batched: dict, unbatched: dict,
                 steps: list[dict], services: dict, machine: dict) -> dict[str, Any]:
    import ray
    import torch

    passing = [s["devices"] for s in (steps or [batched]) if s["kept_up"]]
    streams = max(passing, default=0)
    main = {k: batched[k] for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms", "latency_samples",
                                    "frames_sent", "frames_processed", "frames_lost", "frames_duplicated")}
    report = {
        "benchmark": "cloud",
        "measured": "simulated fleet (real wire format, QoS 1, one message per device per second, "
        "sent at its t_end_ns) -> MQTT broker -> Serve app (ingest, code LM, classifier) -> Redis; "
        "latency = ingest's classification time - t_end_ns of the message",
        "devices": settings.devices,
        "seconds": int(settings.seconds),
        "streams": streams,
        "streams_definition": STREAMS_DEFINITION,
        **main,
        "batched": batched,
        "unbatched": unbatched,
        "batching": {"ingest_batch_size": cloud.ingest_batch_size, "max_batch_size": cloud.max_batch_size,
                     "batch_wait_timeout_s": cloud.batch_wait_timeout_s, "ingest_workers": cloud.ingest_workers},
        "find_max": [{k: s[k] for k in ("devices", "p50_ms", "p99_ms", "frames_lost", "frames_duplicated",
                                        "kept_up")} for s in steps] or None,
        "services": services,
        "machine": {**machine, "ray": ray.__version__, "torch": torch.__version__},
        "targets": dict(TARGETS),
    }
    p99 = batched["p99_ms"]
    report["meets_targets"] = {
        "streams": streams >= TARGETS["streams"],
        "p99_ms": p99 is not None and p99 <= TARGETS["p99_ms"],
        "frames_lost": batched["frames_lost"] == 0,
        "frames_duplicated": batched["frames_duplicated"] == 0,
    }
    report["all_targets_met"] = all(report["meets_targets"].values())
    return report


def _yes(met: bool) -> str:
    return "yes" if met else "NO"


def format_table(report: dict[str, Any]) -> str:
    """A short human-readable summary of a report."""
    r, t, ok = report, report["targets"], report["meets_targets"]
    rows = [("streams kept up", f"{r['streams']}", f">= {t['streams']}", _yes(ok["streams"]))]
    for mode in ("batched", "unbatched"):
        m = r[mode]
        tag = "batched" if mode == "batched" else "unbatched"
        rows += [
            (f"p50 / p99 latency, {tag}", f"{m['p50_ms']} / {m['p99_ms']} ms", f"p99 <= {t['p99_ms']} ms",
             _yes(ok["p99_ms"]) if mode == "batched" else ""),
            (f"frames lost, {tag}", f"{m['frames_lost']} of {m['frames_sent']}", "0",
             _yes(ok["frames_lost"]) if mode == "batched" else ""),
            (f"frames duplicated, {tag}", f"{m['frames_duplicated']}", "0",
             _yes(ok["frames_duplicated"]) if mode == "batched" else ""),
        ]
    for mode, m in (r.get("ack_comparison") or {}).items():
        if isinstance(m, dict):
            rows.append((f"p50 / p99, lost, {mode.replace('_', ' ')}",
                         f"{m['p50_ms']} / {m['p99_ms']} ms, {m['frames_lost']}", "", ""))
    head = (f"soundfleet bench cloud: {r['devices']} devices x {r['seconds']} s, "
            f"{r['machine']['cpu_model']} ({r['machine']['cores']} cores)")
    lines = [head, f"{'':34}{'measured':>22}  {'target':>14}  met"]
    lines += [f"{name:34}{value:>22}  {target:>14}  {met}" for name, value, target, met in rows]
    return "\n".join(lines)
