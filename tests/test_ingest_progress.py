"""The ingest's lag gauge and /readyz's ingest and devices checks (issue 14: overload is lag,
not loss, and health reflects progress). The ingest check against a real stalled ingest, with
Redis stopped under it, is in test_redis_restart.py."""

from __future__ import annotations

import re
import time

import pytest


def _stats(**overrides) -> dict:
    return {"lag_seconds": 0.4, "stuck_seconds": 0.0, "queued": 0, "redis_errors": 0, "workers_alive": 2,
            **overrides}


def test_lag_is_the_last_rounds_and_falls_to_zero_once_the_worker_is_idle(monkeypatch):
    import cloud.ingest
    from cloud.ingest import WorkerProgress

    monkeypatch.setattr(cloud.ingest, "LAG_FRESH_S", 0.2)
    progress = WorkerProgress()
    assert progress.lag(queued=0) == 0.0 and progress.stuck_s() == 0.0  # never worked: no lag
    progress.started()
    time.sleep(0.05)
    assert progress.stuck_s() >= 0.05  # a round in progress counts its time
    progress.finished(42.0)  # its slowest frame was classified 42 s after capture: a backlog
    assert progress.stuck_s() == 0.0
    assert progress.lag(queued=0) == 42.0  # just finished: still the lag
    time.sleep(0.25)
    assert progress.lag(queued=3) == 42.0  # more waiting: it still lags
    assert progress.lag(queued=0) == 0.0  # idle and caught up: no lag


def test_readiness_fails_on_a_stuck_round_or_a_dead_worker_and_warns_on_lag():
    from cloud.ingest import ingest_readiness
    from soundfleet.config import CloudConfig

    config = CloudConfig(ingest_stuck_after_s=30.0, ingest_lag_warn_s=10.0)
    assert ingest_readiness(_stats(), config) == (True, [])
    ready, warnings = ingest_readiness(_stats(lag_seconds=95.0), config)
    assert ready is True and len(warnings) == 1 and warnings[0].startswith("ingest lag 95.0 s")
    ready, _ = ingest_readiness(_stats(stuck_seconds=31.0, queued=212, redis_errors=40), config)
    assert ready == "an ingest round has not finished for 31 s (212 messages waiting, 40 Redis errors)"
    ready, _ = ingest_readiness(_stats(workers_alive=1), config)
    assert ready == "1 ingest worker threads died"


def test_the_thresholds_must_be_positive():
    from soundfleet.config import CloudConfig, ConfigError

    with pytest.raises(ConfigError, match="ingest_stuck_after_s"):
        CloudConfig(ingest_stuck_after_s=0).validate()


def test_readyz_fails_while_a_devices_work_waits_unprocessed_and_recovers_after(cloud_app):
    """A device whose ready work nobody processes (here: the test holds its lease, as a replica
    that hung would) makes /readyz 503 with the device named; committed, it is ready again."""
    import httpx
    import numpy as np

    from cloud.device_log import DeviceLog, WorkItem

    log = DeviceLog(cloud_app.store.r, cloud_app.store.key, 100, lease_ms=60_000)
    site, device = "itest", f"stuck-{time.time_ns() % 10**6}"
    lease = log.lease(site, device)  # before any work: the ingest's sweeper cannot take it
    try:
        received_ns = time.time_ns() - 3600 * 10**9  # an hour ago
        log.accept(site, device, WorkItem(0, received_ns, received_ns, np.zeros(40, np.uint16)), now_ms=0)
        response = httpx.get(f"{cloud_app.http_url}/readyz", timeout=30)
        body = response.json()
        assert response.status_code == 503 and body["checks"]["devices"] is False, body
        assert re.search(rf"devices: {site}/{device}: seq 0 has waited 36\d\d s for processing", body["reason"]), body
    finally:
        items, _, _ = log.peek(lease, 10)
        log.commit(lease, items, None, {}, [])
        log.release(lease)
    body = httpx.get(f"{cloud_app.http_url}/readyz", timeout=30).json()
    assert body["checks"]["devices"] is True, body


def test_device_readiness_names_the_device_past_the_threshold():
    from cloud.device_log import WorkItem
    from cloud.ingest import device_readiness
    from soundfleet.config import CloudConfig

    config = CloudConfig(ingest_stuck_after_s=30.0)
    item = WorkItem(7, 0, 0, None)
    assert device_readiness(None, config) is True
    assert device_readiness(("s", "d", item, 29.0), config) is True
    assert device_readiness(("s", "d", item, 31.4), config) == "s/d: seq 7 has waited 31 s for processing"
