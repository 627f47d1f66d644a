"""A frame is acknowledged to the broker only once it is in Redis (issue 14, finding 1).

The ingest used paho's ack on receipt with a clean session under a random client id: frames
published while it was down were acknowledged by the broker and never delivered, and frames it
held in memory (a Redis stall, a full queue) died with it. Now (`cloud.mqtt_session`) PUBACKs go
out in receive order after the round that made them durable, on a persistent session whose
client id a Redis slot lease keeps across replica restarts. Both outage tests below lose every
frame on the code before that change.
"""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

from shared_models import bundle, wire

FRAMES = 4  # per message


def _message(codebook_id: int, seq: int) -> bytes:
    codes = (np.arange(FRAMES) + seq * FRAMES).astype(np.uint16)  # unique per (seq, frame)
    return wire.FramesMessage(codebook_id=codebook_id, seq=seq, t_start_ns=time.time_ns() - 10**8,
                              codes=codes).to_bytes()


# --- the ack order --------------------------------------------------------------------------
def test_acks_go_out_in_receive_order_once_each_message_is_durable():
    from cloud.mqtt_session import AckSequencer, acknowledge

    sent: list[tuple[int, int]] = []
    acks = AckSequencer(lambda mid, qos: sent.append((mid, qos)))
    tickets = [acks.receive(mid, 1) for mid in (11, 12, 13, 14)]
    assert acks.receive(99, 0) is None  # QoS 0: nothing to acknowledge
    acknowledge([tickets[2], tickets[1]])  # a later round finished first
    assert sent == [] and acks.waiting == 4  # 11 is not durable yet: nothing may overtake it
    acknowledge([tickets[0], None])
    assert sent == [(11, 1), (12, 1), (13, 1)] and acks.waiting == 1
    acknowledge([tickets[1]])  # the round ran again (a Redis error): acknowledged once only
    assert sent == [(11, 1), (12, 1), (13, 1)] and acks.waiting == 1
    acks.close()  # the connection dropped: the broker redelivers 14 on the next one
    acknowledge([tickets[3]])
    assert sent == [(11, 1), (12, 1), (13, 1)] and acks.sent == 3


def test_tickets_of_two_connections_go_to_their_own():
    from cloud.mqtt_session import AckSequencer, acknowledge

    old_sent, new_sent = [], []
    old, new = AckSequencer(lambda m, q: old_sent.append(m)), AckSequencer(lambda m, q: new_sent.append(m))
    batch = [old.receive(1, 1), new.receive(1, 1), new.receive(2, 1)]  # mids repeat across connections
    acknowledge(batch)
    assert old_sent == [1] and new_sent == [1, 2]


# --- the session slot -------------------------------------------------------------------------
def test_session_slots_give_each_replica_its_own_client_id(redis_url, redis_client, redis_prefix):
    from cloud.mqtt_session import SessionSlot, client_id
    from cloud.store import CloudStore

    store = CloudStore(redis_url, redis_prefix)  # redis_client deletes its keys afterwards
    slots = [SessionSlot(store.r, store.key, redis_prefix, "group", replicas=2) for _ in range(3)]
    assert [slots[0].claim(1), slots[1].claim(1)] == [0, 1]
    assert slots[0].client_id != slots[1].client_id
    assert len(slots[0].client_id) <= 23  # the longest id MQTT 3.1.1 promises every broker takes
    assert client_id(redis_prefix, "group", 0) == slots[0].client_id  # stable: a restart gets it back
    assert client_id(redis_prefix, "other", 0) != slots[0].client_id  # two deployments never share one
    with pytest.raises(TimeoutError, match="2 ingest session slots stayed taken"):
        slots[2].claim(0.6)
    assert slots[0].renew() and slots[1].renew()
    store.r.delete(store.key("ingest", "slot", "1"))  # replica 1's lease ran out (it died)
    assert slots[2].claim(1) == 1  # its replacement takes the slot, and with it the session
    assert not slots[1].renew()  # a replica back from a long pause learns it is not slot 1 any more
    slots[0].release()
    assert store.r.get(store.key("ingest", "slot", "0")) is None
    slots[2].release()


# --- outages --------------------------------------------------------------------------------
def _deploy(config, app: str):
    from ray import serve

    from cloud.app import build_app

    serve.run(build_app(config), name=app, route_prefix=f"/{app}")
    handle = serve.get_deployment_handle("Ingest", app_name=app)
    deadline = time.monotonic() + 30
    while not handle.stats.remote().result()["mqtt_connected"]:
        assert time.monotonic() < deadline, "the ingest never connected"
        time.sleep(0.2)
    return handle


def _wait_processed(store, site: str, device: str, total: int, timeout_s: float) -> int:
    dev = store.key("dev", site, device)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and int(store.r.hget(dev, "processed") or 0) < total:
        time.sleep(0.25)
    time.sleep(1.0)  # a second processing of anything would show now
    return int(store.r.hget(dev, "processed") or 0)


def _assert_each_frame_once(store, site: str, device: str, total: int) -> None:
    dev = store.key("dev", site, device)
    assert int(store.r.hget(dev, "processed") or 0) == total, store.r.hgetall(dev)
    assert int(store.r.hget(dev, "lost") or 0) == 0
    context = np.frombuffer(store.r.get(store.key("ctx", site, device)), "<u2")
    np.testing.assert_array_equal(context, np.arange(total * FRAMES, dtype=np.uint16)[-len(context):])


@pytest.mark.slow
def test_frames_published_while_the_ingest_is_down_are_processed_when_it_returns(
        cloud_app, mqtt_url, redis_url, mqtt_client_factory, remove_app):
    from ray import serve

    from cloud.store import CloudStore
    from soundfleet.config import CloudConfig

    config = CloudConfig(broker_url=mqtt_url, redis_url=redis_url, ha_discovery_prefix="",
                         key_prefix=f"test:down:{uuid.uuid4().hex[:8]}:")
    store, app = CloudStore(redis_url, config.key_prefix), f"sf-down-{uuid.uuid4().hex[:6]}"
    codebook_id = bundle.load_manifest(bundle.default_bundle_dir())["codebook_id"]
    site, device, total = f"down{uuid.uuid4().hex[:4]}", "dev0", 20
    try:
        _deploy(config, app)
        serve.delete(app)  # the cloud goes down (an upgrade, a crash): its session stays on the broker
        publisher = mqtt_client_factory()
        for seq in range(total):  # the broker acknowledges each to the device, which forgets it
            publisher.publish(wire.frames_topic(site, device), _message(codebook_id, seq),
                              qos=1).wait_for_publish(5)
        handle = _deploy(config, app)  # back under the same client id: the broker hands the 20 over
        assert _wait_processed(store, site, device, total, 60) == total, "frames sent while down were lost"
        _assert_each_frame_once(store, site, device, total)
        stats = handle.stats.remote().result()
        assert stats["manual_ack"] and stats["acks_waiting"] == 0 and stats["acks_sent"] >= total
    finally:
        remove_app(app, config)


@pytest.mark.slow
def test_a_killed_ingest_loses_none_of_the_frames_it_held_in_memory(
        cloud_app, mqtt_url, mqtt_client_factory, own_redis):
    import ray
    from ray import serve

    from cloud.mqtt_session import forget_sessions
    from cloud.store import CloudStore
    from soundfleet.config import CloudConfig

    config = CloudConfig(broker_url=mqtt_url, redis_url=own_redis.url, ha_discovery_prefix="",
                         key_prefix=f"test:kill:{uuid.uuid4().hex[:8]}:")
    store, app = CloudStore(own_redis.url, config.key_prefix), f"sf-kill-{uuid.uuid4().hex[:6]}"
    codebook_id = bundle.load_manifest(bundle.default_bundle_dir())["codebook_id"]
    site, device, total = f"kill{uuid.uuid4().hex[:4]}", "dev0", 30
    try:
        handle = _deploy(config, app)
        first_id = handle.stats.remote().result().get("mqtt_client_id")
        (victim,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                     if a["namespace"] == "serve" and f"{app}#Ingest" in a["name"]]
        own_redis.stop()  # Redis goes away: the ingest's rounds fail and wait (a stall; a SIGSTOPped
        # Redis would not do: the commands already written to its socket run when it resumes)
        publisher = mqtt_client_factory()
        for seq in range(total):
            publisher.publish(wire.frames_topic(site, device), _message(codebook_id, seq),
                              qos=1).wait_for_publish(5)
        time.sleep(1.5)  # every frame is in the ingest's memory now, none in Redis
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)  # and the ingest dies
        own_redis.start()  # same port and data (append-only file), before Serve starts a replacement
        # Serve starts a replica in its place; it takes the dead one's slot once the lease runs
        # out (SLOT_TTL_MS) and the broker redelivers what was never acknowledged
        assert _wait_processed(store, site, device, total, 90) == total, "frames held in memory were lost"
        _assert_each_frame_once(store, site, device, total)
        assert first_id and handle.stats.remote().result()["mqtt_client_id"] == first_id  # the same session
    finally:
        if own_redis.process is None:
            own_redis.start()
        serve.delete(app)
        forget_sessions(config)
