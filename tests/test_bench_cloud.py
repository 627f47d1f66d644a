"""`soundfleet bench cloud`: a small fleet through the real app, its report's fields and figures.

The benchmark runs as a subprocess on the session's broker and Redis (passed through the
environment, as an operator would) and starts its own local Ray cluster (``address="local"``:
never this session's cluster, whose Serve app it must not touch). At 10 devices nothing may
be lost or duplicated, including a 10 s backlog every device flushes at once after an outage
(``--burst``: 10x and more the real-time rate); the latency figures are reported, not held to
the target (a unit test on a busy 2-core machine cannot promise p99 <= 250 ms)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from cloud.bench import TARGETS
from shared_models.constants import FRAMES_PER_SECOND

DEVICES, SECONDS, BURST = 10, 5, 10


@pytest.fixture(scope="module")
def report(mqtt_url, redis_url) -> dict:
    env = {**os.environ, "SOUNDFLEET_CLOUD__BROKER_URL": mqtt_url, "SOUNDFLEET_CLOUD__REDIS_URL": redis_url}
    env.pop("RAY_ADDRESS", None)  # its own cluster
    cmd = [sys.executable, "-m", "soundfleet.cli", "bench", "cloud", "--json",
           "--devices", str(DEVICES), "--seconds", str(SECONDS), "--burst", str(BURST)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout)  # the whole of stdout is one JSON object


def test_nothing_is_lost_or_duplicated_with_and_without_batching(report):
    sent = DEVICES * (SECONDS + BURST) * FRAMES_PER_SECOND
    assert report["frames_sent"] == sent
    assert report["frames_processed"] == sent
    assert report["frames_lost"] == 0 and report["frames_duplicated"] == 0
    for mode, batch in (("batched", (256, 32)), ("unbatched", (1, 1))):
        run = report[mode]
        assert (run["ingest_batch_size"], run["max_batch_size"]) == batch and run["devices"] == DEVICES
        assert run["frames_sent"] == run["frames_processed"] == sent
        assert run["frames_lost"] == run["frames_duplicated"] == run["devices_incomplete"] == 0
        assert run["messages_processed"] == run["messages_sent"] == DEVICES * (SECONDS + BURST)
        assert run["burst"]["messages"] == DEVICES * BURST and run["burst"]["speed_x_realtime"] >= 10
        assert run["drained"] is True and run["fleet_errors"] == []
        assert run["counters"]["accepted"] >= DEVICES * (SECONDS + BURST)


def test_latencies_are_positive_ordered_and_one_per_message(report):
    for mode in ("batched", "unbatched"):
        run = report[mode]
        assert run["latency_samples"] >= DEVICES * (SECONDS + BURST)  # one per classified message
        assert 0 < run["p50_ms"] <= run["p95_ms"] <= run["p99_ms"] <= run["max_ms"] < 60_000
    assert report["p99_ms"] == report["batched"]["p99_ms"]
    assert report["batched"]["mean_batch_size"]["code_lm"] >= 1
    assert report["unbatched"]["mean_batch_size"]["code_lm"] == 1


def test_streams_targets_and_machine_are_reported(report):
    assert report["benchmark"] == "cloud"
    assert report["devices"] == DEVICES and report["seconds"] == SECONDS
    kept_up = report["batched"]["kept_up"]
    assert report["streams"] == (DEVICES if kept_up else 0) and report["streams_definition"]
    assert report["targets"] == TARGETS
    assert set(report["meets_targets"]) == set(TARGETS)
    assert report["meets_targets"]["streams"] is False  # 10 devices are not the 500 of the target
    assert report["all_targets_met"] is False
    assert report["find_max"] is None
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["cpu_model"] and machine["ray"] and machine["torch"]
    assert "local Ray" in report["services"]["ray"]


def test_the_bench_leaves_no_redis_keys_and_no_retained_status(report, redis_url, mqtt_client_factory):
    import redis

    client = redis.Redis.from_url(redis_url)
    for mode in ("batched", "unbatched"):
        assert list(client.scan_iter(match=f"{report[mode]['key_prefix']}*", count=1000)) == []
    retained, done = [], threading.Event()
    mqtt = mqtt_client_factory(on_message=lambda c, u, msg: retained.append(msg.topic))
    mqtt.on_subscribe = lambda *a: done.set()
    mqtt.subscribe(f"soundfleet/v1/{report['batched']['site']}/+/status", qos=1)
    assert done.wait(5)
    threading.Event().wait(0.5)  # retained messages arrive right after the SUBACK
    assert retained == []
