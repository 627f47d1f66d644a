"""Where the cloud benchmark's time goes, measured from outside the app (``bench cloud --profile``).

The ingest exposes no per-stage timings, so this samples, once a second while the fleet
streams: the CPU use of every process of the benchmark by role (/proc: ingest, code LM and
classifier replicas, Serve and Ray daemons, the fleet simulator, the broker), Redis' own
CPU, commands per second and per-command cost (INFO), the ingest's queue depth (its
``stats()``), and the broker's transit time (a subscriber of its own that measures
``now - t_end_ns`` of every frames message: what the ingest cannot do better than).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from shared_models.wire import FramesMessage, WireError

log = logging.getLogger(__name__)

CLOCK_TICKS_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# what is in a process's command line -> its role; Ray names worker processes after their actor
ROLES = (
    (":Ingest", "ingest"), (":CodeLM", "code_lm"), (":Classifier", "classifier"), (":Api", "api"),
    ("ServeController", "serve_controller"), ("ProxyActor", "serve_proxy"), ("raylet", "raylet"),
    ("gcs_server", "ray_gcs"), ("multiprocessing", "fleet_simulator"),
)


def _stat(pid: str) -> tuple[int, int] | None:
    """(parent pid, CPU ticks used) of a process, None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[1]), int(fields[11]) + int(fields[12])  # ppid, utime + stime
    except (OSError, IndexError, ValueError):
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def listening_pid(port: int) -> int | None:
    """The process listening on TCP ``port`` on this machine (None if not found or not ours to see)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    inodes.add(f"socket:[{cols[9]}]")
        except (OSError, IndexError, ValueError):
            continue
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{pid}/fd")):
                return int(pid)
        except OSError:
            continue
    return None


class Profiler:
    """Samples every ``interval_s`` between :meth:`start` and :meth:`stop` (which returns the profile)."""

    def __init__(self, redis_client: Any, app_name: str, broker_pid: int | None,
                 ingest_stats: Callable[[], dict] | None, frames_topic_filter: str | None = None,
                 broker_url: str | None = None, interval_s: float = 1.0):
        self.r, self.app_name, self.broker_pid = redis_client, app_name, broker_pid
        self.ingest_stats, self.interval_s = ingest_stats, interval_s
        self.topic_filter, self.broker_url = frames_topic_filter, broker_url
        self.cpu_pct: dict[str, list[float]] = defaultdict(list)  # role -> % of one core per sample
        self.redis_cpu_pct: list[float] = []
        self.redis_ops: list[float] = []
        self.queued: list[int] = []
        self.transit_ms: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-profiler", daemon=True)
        self._client = None

    # --- sampling --------------------------------------------------------------------
    def _role(self, pid: int, ours: set[int]) -> str | None:
        cmd = _cmdline(pid)
        if pid == self.broker_pid:
            return "broker"
        if f"ServeReplica:{self.app_name}:" not in cmd and pid not in ours:
            return None  # another program's process (or another app's replica)
        if pid == os.getpid():
            return "bench_driver"
        return next((role for key, role in ROLES if key in cmd), "ray_other")

    def _ticks(self) -> dict[str, int]:
        stats = {int(p): s for p in filter(str.isdigit, os.listdir("/proc")) if (s := _stat(p))}
        children: dict[int, list[int]] = defaultdict(list)
        for pid, (ppid, _) in stats.items():
            children[ppid].append(pid)
        ours, todo = set(), [os.getpid()]
        while todo:  # this process and its descendants: a local Ray cluster, the simulator
            pid = todo.pop()
            ours.add(pid)
            todo += children.get(pid, [])
        ticks: dict[str, int] = defaultdict(int)
        for pid, (_, cpu) in stats.items():
            if (role := self._role(pid, ours)) is not None:
                ticks[f"{role}|{pid}"] = cpu
        return ticks

    def _redis(self) -> tuple[float, int]:
        info = self.r.info()
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"]), int(info["total_commands_processed"])

    def _run(self) -> None:
        prev_t, prev_ticks, prev_redis = time.monotonic(), self._ticks(), self._redis()
        while not self._stop.wait(self.interval_s):
            now, ticks, redis_now = time.monotonic(), self._ticks(), self._redis()
            dt = now - prev_t
            per_role: dict[str, float] = defaultdict(float)
            for key, cpu in ticks.items():  # a process new since the last sample counts from 0
                per_role[key.split("|")[0]] += (cpu - prev_ticks.get(key, cpu)) / CLOCK_TICKS_S / dt * 100
            for role, pct in per_role.items():
                self.cpu_pct[role].append(pct)
            self.redis_cpu_pct.append((redis_now[0] - prev_redis[0]) / dt * 100)
            self.redis_ops.append((redis_now[1] - prev_redis[1]) / dt)
            if self.ingest_stats is not None:
                try:
                    self.queued.append(int(self.ingest_stats()["queued"]))
                except Exception as exc:  # a busy replica may not answer in time: skip the sample
                    log.debug("ingest stats: %s", exc)
            prev_t, prev_ticks, prev_redis = now, ticks, redis_now

    def _on_frames(self, _client, _userdata, msg) -> None:
        try:
            message = FramesMessage.from_bytes(msg.payload)
        except WireError:
            return
        self.transit_ms.append((time.time_ns() - message.t_end_ns) / 1e6)

    def start(self) -> None:
        self._commandstats = self.r.info("commandstats")
        if self.topic_filter and self.broker_url:
            from soundfleet.services import mqtt_client

            client, endpoint = mqtt_client(self.broker_url, f"sf-bench-profile-{uuid.uuid4().hex[:6]}")
            client.on_connect = lambda c, *a: c.subscribe(self.topic_filter, qos=1)
            client.on_message = self._on_frames
            client.connect(endpoint.host, endpoint.port)
            client.loop_start()
            self._client = client
        self._thread.start()

    def stop(self, messages: int) -> dict[str, Any]:
        """The profile of the sampled period; ``messages``: frames messages processed in it."""
        self._stop.set()
        self._thread.join()
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
        commands = _command_costs(self._commandstats, self.r.info("commandstats"), messages)
        mean = {role: round(float(np.mean(v)), 1) for role, v in sorted(self.cpu_pct.items())}
        peak = {role: round(float(np.max(v)), 1) for role, v in sorted(self.cpu_pct.items())}
        mean["redis"] = round(float(np.mean(self.redis_cpu_pct or [0])), 1)
        peak["redis"] = round(float(np.max(self.redis_cpu_pct or [0])), 1)
        transit = np.array(self.transit_ms)
        return {
            "samples": len(self.redis_ops),
            "cpu_percent_mean": mean,  # percent of one core; the box has os.cpu_count() of them
            "cpu_percent_peak": peak,
            "cpu_percent_total_mean": round(sum(mean.values()), 1),
            "redis_ops_per_s_mean": round(float(np.mean(self.redis_ops or [0])), 1),
            "redis_commands_per_message": round(sum(c["calls"] for c in commands.values())
                                                / max(messages, 1), 2),
            "redis_top_commands": commands,
            "ingest_queue_depth": {"mean": round(float(np.mean(self.queued)), 1),
                                   "max": int(np.max(self.queued))} if self.queued else None,
            "broker_transit_ms": {q: round(float(np.percentile(transit, p)), 1)
                                  for q, p in (("p50", 50), ("p95", 95), ("p99", 99))}
            if transit.size else None,
        }


def _command_costs(before: dict, after: dict, messages: int, top: int = 8) -> dict[str, dict]:
    """The Redis commands that took the most server time between two INFO commandstats."""
    costs = {}
    for name, stat in after.items():
        old = before.get(name, {"calls": 0, "usec": 0})
        calls, usec = stat["calls"] - old["calls"], stat["usec"] - old["usec"]
        if calls > 0:
            costs[name.removeprefix("cmdstat_")] = {
                "calls": calls, "usec_per_call": round(usec / calls, 1),
                "calls_per_message": round(calls / max(messages, 1), 2), "total_s": round(usec / 1e6, 3)}
    ranked = sorted(costs.items(), key=lambda kv: -kv[1]["total_s"])[:top]
    return dict(ranked)
