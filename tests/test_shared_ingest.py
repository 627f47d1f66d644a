"""Two ingest replicas on one MQTT shared subscription: every frame processed once, in order.

A second Serve app with ``ingest_replicas=2`` joins its own ``$share`` group on the
real broker. The test plays a fleet that misbehaves: frames out of order and
repeated, from two publishing connections. Each message carries codes that encode
its (seq, frame), so the device context in Redis, which holds every code in
arrival-at-the-model order, shows exactly what was processed, in which order and
how often.
"""

from __future__ import annotations

import random
import time
import uuid

import numpy as np
import pytest

from shared_models import bundle, wire

FRAMES = 4  # per message: 30 messages = 120 frames, all within the 160-frame context
MESSAGES = 30
DEVICES = 6


def _message(codebook_id: int, seq: int) -> bytes:
    codes = (np.arange(FRAMES) + seq * FRAMES).astype(np.uint16)  # unique per (seq, frame)
    return wire.FramesMessage(codebook_id=codebook_id, seq=seq, t_start_ns=time.time_ns() - 10**8,
                              codes=codes).to_bytes()


@pytest.fixture
def shared_app(cloud_app, mqtt_url, redis_url):
    """The cloud app again, with two ingest replicas in a fresh shared-subscription group."""
    from ray import serve

    from cloud.app import build_app
    from cloud.store import CloudStore
    from soundfleet.config import CloudConfig

    config = CloudConfig(broker_url=mqtt_url, redis_url=redis_url, ingest_replicas=2,
                         ingest_share_group=f"test-{uuid.uuid4().hex[:6]}",
                         key_prefix=f"test:shared:{uuid.uuid4().hex[:8]}:")
    serve.run(build_app(config), name="sf-shared", route_prefix="/shared")
    store = CloudStore(redis_url, config.key_prefix)
    yield config, store
    serve.delete("sf-shared")
    keys = list(store.r.scan_iter(match=f"{config.key_prefix}*", count=500))
    if keys:
        store.r.delete(*keys)


@pytest.mark.slow
def test_two_replicas_process_each_frame_once_in_device_order(shared_app, mqtt_client_factory):
    config, store = shared_app
    codebook_id = bundle.load_manifest(bundle.default_bundle_dir())["codebook_id"]
    site = f"shared{uuid.uuid4().hex[:4]}"
    rng = random.Random(7)
    per_device: list[list[int]] = []
    duplicates = 0
    for _ in range(DEVICES):
        order = list(range(MESSAGES))
        for i in range(1, MESSAGES - 1, 3):  # swap neighbours: late frames
            order[i], order[i + 1] = order[i + 1], order[i]
        repeats = rng.sample(range(MESSAGES), 6)  # sent again, later
        duplicates += len(repeats)
        per_device.append(order + repeats)
    # devices interleaved round robin, each device's own (misbehaving) order kept
    plan = [(f"dev{d}", seqs[i]) for i in range(MESSAGES + 6) for d, seqs in enumerate(per_device)]
    publishers = [mqtt_client_factory(), mqtt_client_factory()]
    for i, (device, seq) in enumerate(plan):
        publishers[i % 2].publish(wire.frames_topic(site, device), _message(codebook_id, seq), qos=1)
        time.sleep(0.002)

    deadline = time.monotonic() + 90
    def processed(device: str) -> int:
        return int(store.r.hget(store.key("dev", site, device), "processed") or 0)
    while time.monotonic() < deadline and any(processed(f"dev{d}") < MESSAGES for d in range(DEVICES)):
        time.sleep(0.25)
    time.sleep(1.0)  # a duplicate processing would show now

    expected = np.arange(MESSAGES * FRAMES, dtype=np.uint16)
    for d in range(DEVICES):
        dev = store.key("dev", site, f"dev{d}")
        assert processed(f"dev{d}") == MESSAGES, f"dev{d}: {store.r.hgetall(dev)}"
        context = np.frombuffer(store.r.get(store.key("ctx", site, f"dev{d}")), "<u2")
        np.testing.assert_array_equal(context, expected)  # each frame once, in seq order
        assert int(store.r.hget(dev, "lost") or 0) == 0
    metrics = store.metrics()
    assert metrics.get("duplicates", 0) >= duplicates  # the repeats, plus any redelivery
    by_replica = {k: v for k, v in metrics.items() if k.startswith("processed_by:")}
    assert len(by_replica) == 2 and all(v > 0 for v in by_replica.values()), by_replica  # both shared the work
    assert sum(by_replica.values()) == DEVICES * MESSAGES
