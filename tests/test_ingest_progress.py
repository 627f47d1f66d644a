"""The ingest's lag gauge and /readyz's ingest check (issue 14: overload is lag, not loss,
and health reflects progress). The same check against a real stalled ingest, with Redis
stopped under it, is in test_redis_restart.py."""

from __future__ import annotations

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
