"""A fleet of virtual edge agents on real MQTT (``soundfleet fleet simulate``).

Each virtual device speaks the real wire format: ``FramesMessage`` payloads at QoS 1 on its
own ``soundfleet/v1/{site}/{device}/frames`` topic, seq from 0 with no gap, ``t_start_ns`` the
capture time of the message's first sample, and a retained ``StatusMessage`` (online at the
start, offline at the end, then cleared). What it does not run is the encoder per device:
a few synthetic scenes are encoded once with the edge ONNX model (:class:`EdgeEncoder`) and
every device reads those codes from its own offset, so 500 devices cost almost nothing.

Timeline. Device ``k`` of ``N`` starts capturing at ``O_k = start + k/N`` s (the fleet is
spread over each second, not synchronised); its message ``t`` covers ``[O_k + t, O_k + t + 1)``
and, in real time, is sent at ``O_k + t + 1`` (so ``t_end_ns`` is the send time and the
cloud's ``now - t_end_ns`` is the end-to-end latency). Not in real time, every capture time
lies in the past and everything is sent as fast as possible. ``burst_s = X`` (meant with real
time) adds an outage after the normal phase: the devices keep capturing X more seconds but
send nothing until the outage ends, then flush that backlog as fast as possible (SPEC §3's
burst), interleaved across devices as reconnecting agents would.

Devices are shared out round-robin over a few processes; each process has ONE paho client
for all its devices (a real fleet has one connection per device: the broker's per-client
work is not simulated, its per-message work is).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shared_models.constants import DEFAULT_FRAMES_PER_MESSAGE, NS_PER_SECOND, PATCH_SAMPLES
from shared_models.wire import (
    FramesMessage,
    StatusMessage,
    frames_topic,
    status_topic,
    validate_name,
)

log = logging.getLogger(__name__)

TRACKS = 4  # synthetic scenes encoded once, shared by every device
TRACK_SECONDS = 60.0  # of audio per scene; a device that runs longer wraps around
AGENT_VERSION = "fleet-sim"
CONNECT_TIMEOUT_S = 15.0
DRAIN_TIMEOUT_S = 30.0  # at the end, wait this long for the broker to acknowledge everything
MAX_INFLIGHT = 256  # unacknowledged QoS 1 messages per client
OFFSET_STEP_FRAMES = 7919  # prime: devices on one track start at different frames


@dataclass
class FleetSettings:
    devices: int = 10
    """Virtual devices (>= 1)."""
    seconds: float = 60.0
    """Seconds of audio each device streams in the normal phase (one message per second)."""
    realtime: bool = True
    """Send each message when its last sample would have been captured; else as fast as possible."""
    site: str = "fleet"
    """Site id of every virtual device."""
    broker_url: str = "mqtt://127.0.0.1:1883"
    """MQTT broker URL."""
    processes: int = 0
    """Publishing processes; 0 = min(4, CPU count), never more than devices."""
    burst_s: float = 0.0
    """Seconds of backlog each device flushes as fast as possible after an outage (0 = none)."""
    bundle_dir: str | None = None
    """Model bundle whose edge model encodes the scenes (None = the shipped bundle)."""
    seed: int = 0
    """Seed of the synthetic scenes."""
    clear_status: bool = True
    """Clear the retained status topics at the end (after publishing "offline")."""
    progress_s: float = 5.0
    """Seconds between progress log lines."""
    device_prefix: str = "sim"
    """Device ids are ``{device_prefix}-{k:04d}``."""

    def validate(self) -> None:
        validate_name(self.site)
        if self.devices < 1 or self.seconds < 1 or self.burst_s < 0 or self.processes < 0:
            raise ValueError("fleet needs devices >= 1, seconds >= 1, burst_s >= 0 and processes >= 0")

    @property
    def messages_per_device(self) -> int:
        return int(self.seconds) + int(self.burst_s)


@dataclass(frozen=True)
class Tracks:
    """Codes of the synthetic scenes: (TRACKS, T) uint16, one frame per 25 ms."""

    codes: np.ndarray  # (n_tracks, T) uint16
    codebook_id: int
    codebook_size: int
    model_version: str


def encode_tracks(bundle_dir: str | Path | None = None, n_tracks: int = TRACKS,
                  seconds: float = TRACK_SECONDS, seed: int = 0) -> Tracks:
    """Synthesise ``n_tracks`` random scenes of ``seconds`` and encode each once."""
    from edge.encoder import EdgeEncoder
    from shared_models.synth import random_scene

    encoder = EdgeEncoder(bundle_dir)
    rng = np.random.default_rng(seed)
    codes = []
    for _ in range(n_tracks):
        audio = random_scene(rng, duration_s=seconds).audio
        patches = audio[: len(audio) // PATCH_SAMPLES * PATCH_SAMPLES].reshape(-1, PATCH_SAMPLES)
        codes.append(encoder.encode(patches).codes)  # (T,)
    return Tracks(np.stack(codes), encoder.codebook_id,  # (n_tracks, T)
                  int(encoder.manifest["codebook_size"]), encoder.model_version)


def device_name(prefix: str, k: int) -> str:
    return f"{prefix}-{k:04d}"


@dataclass
class _Plan:
    """What one publishing process does (pickled to it)."""

    index: int
    devices: list[int]  # k of each device this process runs, ascending
    settings: FleetSettings
    tracks: Tracks
    frames: int = DEFAULT_FRAMES_PER_MESSAGE  # per message


@dataclass
class _Result:
    index: int
    last_seq: dict[str, int] = field(default_factory=dict)
    messages: int = 0
    acked: int = 0
    frames: int = 0
    lateness_ms: list[float] = field(default_factory=list)  # real-time sends: actual - planned
    burst_started: float = 0.0  # unix time
    burst_ended: float = 0.0  # unix time of the last publish of the burst
    burst_acked: float = 0.0  # unix time the broker had acknowledged the whole burst
    error: str = ""


def _worker(plan: _Plan, counters: Any, ready: Any, go: Any, start: Any, stop: Any, out: Any) -> None:
    """One publishing process: connect, say online, wait for ``go``, stream, say offline."""
    from soundfleet.services import mqtt_client

    s, result = plan.settings, _Result(plan.index)
    client, endpoint = mqtt_client(s.broker_url, f"sf-fleet-{s.site}-{plan.index}-{uuid.uuid4().hex[:6]}")
    client.max_inflight_messages_set(MAX_INFLIGHT)
    acked = [0]  # every publish the broker acknowledged, frames and statuses

    def on_publish(_client, _userdata, _mid, _reason, _properties) -> None:
        acked[0] += 1  # paho's network thread is the only writer
        counters[2 * plan.index + 1] = acked[0]

    client.on_publish = on_publish
    names = {k: device_name(s.device_prefix, k) for k in plan.devices}
    statuses = []  # MessageInfo of every status publish

    def publish_status(payload: bytes) -> None:
        for name in names.values():
            statuses.append(client.publish(status_topic(s.site, name), payload, qos=1, retain=True))

    try:
        client.connect(endpoint.host, endpoint.port, keepalive=30)
        client.loop_start()
        if not _wait(client.is_connected, CONNECT_TIMEOUT_S):
            raise ConnectionError(f"no CONNACK from the broker within {CONNECT_TIMEOUT_S:.0f} s")
        publish_status(_status(plan, "online"))
        _wait(lambda: all(m.is_published() for m in statuses), CONNECT_TIMEOUT_S)
        ready.release()
        go.wait()
        _stream(plan, client, names, float(start.value), stop, counters, result)
        if result.burst_started:  # the burst ends when the broker has acknowledged all of it
            _wait(lambda: acked[0] >= result.messages + len(statuses), DRAIN_TIMEOUT_S)
            result.burst_acked = time.time()
        publish_status(_status(plan, "offline"))
        if s.clear_status:
            publish_status(b"")  # an empty retained message deletes the retained status
        total = result.messages + len(statuses)
        if not _wait(lambda: acked[0] >= total, DRAIN_TIMEOUT_S):
            log.warning("fleet process %d: %d of %d publishes not acknowledged after %.0f s",
                        plan.index, total - acked[0], total, DRAIN_TIMEOUT_S)
        result.acked = acked[0] - sum(m.is_published() for m in statuses)
    except OSError as exc:  # ConnectionError included
        result.error = f"{type(exc).__name__}: {exc}"
    except KeyboardInterrupt:
        result.error = "interrupted"
    finally:
        ready.release()  # (again) so that the parent never waits on a process that failed
        client.disconnect()
        client.loop_stop()
        out.put(result)


def _stream(plan: _Plan, client: Any, names: dict[int, str], start: float, stop: Any,
            counters: Any, result: _Result) -> None:
    s, n_dev, frames = plan.settings, plan.settings.devices, plan.frames
    normal, total = int(s.seconds), s.messages_per_device
    start_ns = int(start * NS_PER_SECOND)
    if s.realtime:
        origin_ns = {k: start_ns + k * NS_PER_SECOND // n_dev for k in plan.devices}
    else:  # everything captured already: the last message of the last device ends at `start`
        origin_ns = {k: start_ns - total * NS_PER_SECOND + (k - n_dev) * NS_PER_SECOND // n_dev
                     for k in plan.devices}
    topics = {k: frames_topic(s.site, names[k]) for k in plan.devices}
    n_tracks, track_len = plan.tracks.codes.shape
    # a frame offset per device: a step coprime with the track length makes every offset differ
    offsets = {k: (k // n_tracks) * OFFSET_STEP_FRAMES % track_len for k in plan.devices}
    mono0 = time.monotonic() - (time.time() - start)  # the shared start on this process's clock

    def send(k: int, t: int) -> None:
        idx = np.arange(offsets[k] + t * frames, offsets[k] + (t + 1) * frames) % track_len
        message = FramesMessage(codebook_id=plan.tracks.codebook_id, seq=t,
                                t_start_ns=origin_ns[k] + t * NS_PER_SECOND,
                                codes=plan.tracks.codes[k % n_tracks, idx])
        client.publish(topics[k], message.to_bytes(), qos=1)
        result.messages += 1
        result.frames += frames
        result.last_seq[names[k]] = t
        counters[2 * plan.index] = result.messages

    time.sleep(max(0.0, mono0 - time.monotonic()))  # every process starts together
    for t in range(normal):
        for k in plan.devices:
            if stop.is_set():
                return
            if s.realtime:
                due = mono0 + (origin_ns[k] - start_ns) / NS_PER_SECOND + t + 1
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                result.lateness_ms.append(max(0.0, time.monotonic() - due) * 1000)
            send(k, t)
    if total > normal and s.realtime:  # the outage: capture the backlog, send nothing
        outage_end = mono0 + total + 1
        while time.monotonic() < outage_end and not stop.is_set():
            time.sleep(min(0.1, max(0.0, outage_end - time.monotonic())))
    if total == normal:
        return
    result.burst_started = time.time()
    for t in range(normal, total):
        for k in plan.devices:
            if stop.is_set():
                return
            send(k, t)
    result.burst_ended = time.time()


def _status(plan: _Plan, state: str) -> bytes:
    return StatusMessage(state=state, agent_version=AGENT_VERSION,
                         model_version=plan.tracks.model_version,
                         codebook_id=plan.tracks.codebook_id, t_ns=time.time_ns()).to_bytes()


def _wait(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def simulate_fleet(settings: FleetSettings, tracks: Tracks | None = None) -> dict[str, Any]:
    """Run the fleet to the end; returns the JSON-able summary (see docs/BENCH_CLOUD.md)."""
    import os

    from soundfleet.services import redact_url

    settings.validate()
    tracks = tracks or encode_tracks(settings.bundle_dir, seed=settings.seed)
    n_proc = min(settings.devices, settings.processes or min(4, os.cpu_count() or 1))
    plans = [_Plan(i, list(range(i, settings.devices, n_proc)), settings, tracks) for i in range(n_proc)]
    ctx = mp.get_context("spawn")  # no fork of a process with threads (Ray, paho, onnxruntime)
    counters = ctx.RawArray("q", 2 * n_proc)
    ready, go, stop = ctx.Semaphore(0), ctx.Event(), ctx.Event()
    start, out = ctx.RawValue("d", 0.0), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(p, counters, ready, go, start, stop, out),
                         name=f"fleet-{p.index}", daemon=True) for p in plans]
    log.info("fleet: %d devices on %s (site %s) from %d processes, %.0f s%s%s",
             settings.devices, redact_url(settings.broker_url), settings.site, n_proc, settings.seconds,
             " at real time" if settings.realtime else " as fast as possible",
             f" + {settings.burst_s:.0f} s burst" if settings.burst_s else "")
    for p in procs:
        p.start()
    try:
        for _ in procs:
            if not ready.acquire(timeout=60):
                raise TimeoutError("a fleet process did not connect within 60 s")
        start.value = time.time() + 0.2
        go.set()
        results = _collect(settings, procs, counters, out, start.value)
    except KeyboardInterrupt:
        stop.set()
        raise
    finally:
        go.set()  # release workers still waiting if we failed before the start
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
    return _summary(settings, tracks, results, start.value, n_proc)


def _collect(settings: FleetSettings, procs: list, counters: Any, out: Any, start: float) -> list[_Result]:
    """Every worker's result; logs sent / acknowledged messages every ``progress_s`` meanwhile."""
    results: list[_Result] = []
    last_t, last_sent, n_proc = start, 0, len(procs)
    while len(results) < n_proc:
        try:
            results.append(out.get(timeout=min(1.0, settings.progress_s)))
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                raise RuntimeError("a fleet process exited without a result") from None
        now = time.time()
        if now - last_t >= settings.progress_s:
            sent = sum(counters[2 * i] for i in range(n_proc))
            acked = sum(counters[2 * i + 1] for i in range(n_proc))
            log.info("fleet: %.0f s, %d messages sent (%.0f/s), %d publishes acknowledged",
                     now - start, sent, (sent - last_sent) / (now - last_t), acked)
            last_t, last_sent = now, sent
    return results


def _summary(settings: FleetSettings, tracks: Tracks, results: list[_Result], start: float,
             n_proc: int) -> dict[str, Any]:
    from soundfleet.services import redact_url

    errors = [r.error for r in results if r.error]
    last_seq = dict(sorted(kv for r in results for kv in r.last_seq.items()))
    lateness = np.array([x for r in results for x in r.lateness_ms], dtype=np.float64)
    bursts = [r for r in results if r.burst_acked]
    burst = None
    if bursts:  # from the first publish of the backlog until the broker acknowledged all of it
        began = min(r.burst_started for r in bursts)
        seconds = max(r.burst_acked for r in bursts) - began
        burst = {"seconds_of_audio": int(settings.burst_s),
                 "messages": settings.devices * int(settings.burst_s),
                 "publish_s": round(max(r.burst_ended for r in bursts) - began, 3),
                 "duration_s": round(seconds, 3),
                 "speed_x_realtime": round(int(settings.burst_s) / max(seconds, 1e-9), 1)}
    return {
        "devices": settings.devices,
        "site": settings.site,
        "broker": redact_url(settings.broker_url),
        "realtime": settings.realtime,
        "seconds": int(settings.seconds),
        "processes": n_proc,
        "messages_sent": sum(r.messages for r in results),
        "messages_acked": sum(r.acked for r in results),
        "frames_sent": sum(r.frames for r in results),
        "frames_per_message": DEFAULT_FRAMES_PER_MESSAGE,
        "duration_s": round(time.time() - start, 3),
        "started_ns": int(start * NS_PER_SECOND),
        "send_lateness_ms": _percentiles(lateness),
        "burst": burst,
        "codebook_id": tracks.codebook_id,
        "codebook_size": tracks.codebook_size,
        "model_version": tracks.model_version,
        "last_seq": last_seq,
        "errors": errors,
    }


def _percentiles(values: np.ndarray) -> dict[str, float] | None:
    """p50 / p95 / p99 / max of ``values`` (None when empty), rounded to 0.1."""
    if values.size == 0:
        return None
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50": round(float(p50), 1), "p95": round(float(p95), 1), "p99": round(float(p99), 1),
            "max": round(float(values.max()), 1)}
