"""The cloud across a Redis restart: frames wait, none is lost or processed twice.

A redis-server owned by the test (`OwnRedis` in conftest: the shipped infra/redis/redis.conf,
append-only file on, so a restart keeps everything, as a production Redis for soundfleet is set up)
backs a second Serve app on the real broker. Frames stream in; Redis is stopped
mid-stream and started again on the same port and data. The ingest's rounds fail
meanwhile and are run again (accept is idempotent, the commit fenced), so every
frame is processed exactly once and in order, and the replica is never restarted
for it (its health check does not depend on Redis).
"""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

from shared_models import bundle, wire

FRAMES = 4  # per message; 36 messages = 144 frames, within the 160-frame context
MESSAGES = 36
DEVICES = 3
DOWN_AFTER = 12  # messages per device sent before Redis goes away
DOWN_S = 4.0


def _message(codebook_id: int, seq: int) -> bytes:
    codes = (np.arange(FRAMES) + seq * FRAMES).astype(np.uint16)  # unique per (seq, frame)
    return wire.FramesMessage(codebook_id=codebook_id, seq=seq, t_start_ns=time.time_ns() - 10**8,
                              codes=codes).to_bytes()


@pytest.mark.slow
def test_frames_wait_out_a_redis_restart_and_are_processed_once_in_order(cloud_app, mqtt_url,
                                                                        mqtt_client_factory, own_redis):
    from ray import serve

    from cloud.app import build_app
    from cloud.ingest import ingest_readiness
    from cloud.mqtt_session import forget_sessions
    from cloud.store import CloudStore
    from soundfleet.config import CloudConfig

    redis = own_redis
    config = CloudConfig(broker_url=mqtt_url, redis_url=redis.url, key_prefix="test:restart:",
                         ha_discovery_prefix="", ingest_stuck_after_s=2.0)
    app = f"sf-redis-restart-{uuid.uuid4().hex[:6]}"
    serve.run(build_app(config), name=app, route_prefix=f"/{app}")
    store = CloudStore(redis.url, config.key_prefix)
    try:
        codebook_id = bundle.load_manifest(bundle.default_bundle_dir())["codebook_id"]
        site = f"restart{uuid.uuid4().hex[:4]}"
        publisher = mqtt_client_factory()

        def send(seqs: range) -> None:
            for seq in seqs:
                for d in range(DEVICES):
                    publisher.publish(wire.frames_topic(site, f"dev{d}"), _message(codebook_id, seq), qos=1)
                time.sleep(0.02)

        def processed(device: str) -> int:
            return int(store.r.hget(store.key("dev", site, device), "processed") or 0)

        send(range(DOWN_AFTER))
        deadline = time.monotonic() + 30
        while any(processed(f"dev{d}") < DOWN_AFTER for d in range(DEVICES)) and time.monotonic() < deadline:
            time.sleep(0.1)
        redis.stop()
        send(range(DOWN_AFTER, MESSAGES))  # received by the ingest while Redis is away
        time.sleep(DOWN_S)
        ingest = serve.get_deployment_handle("Ingest", app_name=app)
        stalled = ingest.stats.remote().result()  # answers: the stats need no Redis
        ready, _ = ingest_readiness(stalled, config)  # what /readyz says about the ingest now
        assert stalled["stuck_seconds"] > config.ingest_stuck_after_s, stalled
        assert isinstance(ready, str) and "has not finished" in ready and "Redis errors" in ready
        redis.start()

        deadline = time.monotonic() + 60
        while any(processed(f"dev{d}") < MESSAGES for d in range(DEVICES)) and time.monotonic() < deadline:
            time.sleep(0.25)
        time.sleep(1.0)  # a second processing of anything would show now
        expected = np.arange(MESSAGES * FRAMES, dtype=np.uint16)
        for d in range(DEVICES):
            dev = store.key("dev", site, f"dev{d}")
            assert processed(f"dev{d}") == MESSAGES, store.r.hgetall(dev)
            context = np.frombuffer(store.r.get(store.key("ctx", site, f"dev{d}")), "<u2")
            np.testing.assert_array_equal(context, expected)  # each frame once, in seq order
            assert int(store.r.hget(dev, "lost") or 0) == 0
        stats = ingest.stats.remote().result()
        assert stats["redis_errors"] >= 1, "the ingest never noticed Redis was away"
        assert stats["workers_alive"] == config.ingest_workers
        assert stats["stuck_seconds"] == 0 and ingest_readiness(stats, config)[0] is True
        assert stats["lag_seconds"] >= DOWN_S / 2  # the backlog's frames waited out the outage
    finally:
        serve.delete(app)
        forget_sessions(config)

