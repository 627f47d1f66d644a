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


@pytest.fixture(scope="module")
def shared_app(cloud_app, mqtt_url, redis_url, remove_app):
    """The cloud app again, with two ingest replicas in a fresh shared-subscription group."""
    from ray import serve

    from cloud.app import build_app
    from cloud.store import CloudStore
    from soundfleet.config import CloudConfig

    config = CloudConfig(broker_url=mqtt_url, redis_url=redis_url, ingest_replicas=2,
                         ingest_share_group=f"test-{uuid.uuid4().hex[:6]}",
                         key_prefix=f"test:shared:{uuid.uuid4().hex[:8]}:", archive_sites="*")
    serve.run(build_app(config), name="sf-shared", route_prefix="/shared")
    store = CloudStore(redis_url, config.key_prefix)
    yield config, store
    remove_app("sf-shared", config)


@pytest.mark.slow
def test_two_replicas_process_each_frame_once_in_device_order(shared_app, mqtt_client_factory, tmp_path):
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
    # the fleet archive (opt-in, here for every site) rolls into the Parquet layout training reads
    from cloud.archive import roll_archive
    from training.fleet_archive import read_fleet_archive

    # at least: the archive takes every site, and other agents may share the broker
    assert roll_archive(store, tmp_path) >= DEVICES * MESSAGES
    sequences = [s for s in read_fleet_archive(tmp_path, codebook_id=codebook_id) if s.site == site]
    assert sorted(s.device for s in sequences) == [f"dev{d}" for d in range(DEVICES)]
    for sequence in sequences:  # one unbroken sequence per device, every code once, in order
        assert sequence.seq_first == 0
        np.testing.assert_array_equal(sequence.codes, expected)
    assert store.r.xlen(store.key("archive")) == 0  # rolled means trimmed

    metrics = store.metrics()
    assert metrics.get("duplicates", 0) >= duplicates  # the repeats, plus any redelivery
    received = {k: v for k, v in metrics.items() if k.startswith("received_by:")}
    assert len(received) == 2 and all(v > 0 for v in received.values()), received  # the broker split the stream
    assert sum(received.values()) >= len(plan)
    # whichever replica received a frame, the one holding the device's lease processed it, once
    processed = {k: v for k, v in metrics.items() if k.startswith("processed_by:")}
    assert sum(processed.values()) == DEVICES * MESSAGES, processed


def _replica_actors(app: str, deployment: str) -> list[str]:
    """Names of the live Serve replica actors of ``deployment`` (no dashboard needed)."""
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and f"{app}#{deployment}" in a["name"]]


@pytest.mark.slow
def test_killing_a_model_replica_mid_stream_loses_no_frames(shared_app, mqtt_client_factory):
    import ray

    config, store = shared_app
    codebook_id = bundle.load_manifest(bundle.default_bundle_dir())["codebook_id"]
    site, device, total = f"kill{uuid.uuid4().hex[:4]}", "dev0", 60
    client = mqtt_client_factory()
    (victim,) = _replica_actors("sf-shared", "CodeLM")
    for seq in range(total):
        if seq == 20:  # classification is running (a window needs 10 messages): kill the code LM
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        client.publish(wire.frames_topic(site, device), _message(codebook_id, seq), qos=1)
        time.sleep(0.05)
    dev = store.key("dev", site, device)
    deadline = time.monotonic() + 180  # Serve restarts the replica: model loading on a busy box
    while time.monotonic() < deadline and int(store.r.hget(dev, "processed") or 0) < total:
        time.sleep(0.5)
    assert int(store.r.hget(dev, "processed") or 0) == total, store.r.hgetall(dev)
    assert int(store.r.hget(dev, "lost") or 0) == 0
    context = np.frombuffer(store.r.get(store.key("ctx", site, device)), "<u2")
    expected = np.arange(total * FRAMES, dtype=np.uint16)[-len(context):]
    np.testing.assert_array_equal(context, expected)  # nothing skipped, nothing twice
    # the only CodeLM replica died after 20 messages, so the windows after it were classified by
    # the one Serve started in its place (a call that was in flight is retried: "model_retries")
    assert _replica_actors("sf-shared", "CodeLM") not in ([], [victim])


@pytest.mark.slow
def test_event_thresholds_change_live_through_reconfigure_without_a_restart(cloud_app):
    """`serve deploy` with a changed user_config calls Ingest.reconfigure on the running replica
    (Serve's lightweight update); this drives that method on the session app's one replica."""
    from ray import serve

    ingest = serve.get_deployment_handle("Ingest", app_name="soundfleet")
    replica = ingest.stats.remote().result()["replica"]
    before = ingest.event_policies.remote().result()
    try:
        ingest.reconfigure.remote({"on_threshold": {"siren": 0.95}}).result()
        after = ingest.event_policies.remote().result()
        assert after["siren"]["on_threshold"] == 0.95 and after["doorbell"] == before["doorbell"]
        with pytest.raises(Exception, match="unknown event-logic settings"):
            ingest.reconfigure.remote({"on_treshold": 0.9}).result()
        assert ingest.event_policies.remote().result() == after  # a bad setting changes nothing
        assert ingest.stats.remote().result()["replica"] == replica  # the same replica throughout
    finally:
        ingest.reconfigure.remote({}).result()
    assert ingest.event_policies.remote().result() == before
