"""A device whose frames the models cannot take costs only itself (issue 14: poison-proof).

Before, the ingest retried a failed model call forever, and ``@serve.batch`` failed every
request of a pass when one failed: one such device stalled its round, the other devices in it
and every other request batched with it, while /healthz stayed green. Now the model replicas
run a failed pass again request by request (`cloud.models.per_request`), and the ingest, after
``MODEL_ATTEMPTS`` refusals, sends each device's windows alone and dead-letters the device's
frames that the models still refuse (reason ``model_error``), processed without events.

No input the shipped models refuse is known (codes past the codebook are refused at decode),
so the integration test deploys the real models with a classifier that raises on one code
pattern, a fault injected the way a replica kill is injected elsewhere.
"""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

from shared_models import bundle, wire

FRAMES = 40  # one message, one classifier window
POISON_CODE = 13  # a window of only this code makes the injected classifier raise


def test_a_failed_batch_is_run_again_request_by_request_and_only_the_bad_one_fails():
    from cloud.models import per_request

    def double(values: list[int]) -> list[int]:  # refuses negative numbers, like a model its input
        if any(v < 0 for v in values):
            raise ValueError("negative")
        return [2 * v for v in values]

    assert per_request(double, [1, 2, 3]) == [2, 4, 6]
    out = per_request(double, [1, -2, 3])
    assert out[0] == 2 and out[2] == 6 and isinstance(out[1], ValueError)


def _poison_classifier():
    from ray import serve

    from cloud.models import Classifier

    class PoisonClassifier(Classifier.func_or_class):
        def _probs(self, states, codes):
            if any((c == POISON_CODE).all() for request in codes for c in request):
                raise ValueError(f"injected: a window of only code {POISON_CODE}")
            return super()._probs(states, codes)

    return serve.deployment(PoisonClassifier)


@pytest.mark.slow
def test_frames_the_models_refuse_are_dead_lettered_and_the_rest_flows(cloud_app, mqtt_url, redis_url,
                                                                      mqtt_client_factory, remove_app):
    from ray import serve

    from cloud.ingest import Ingest
    from cloud.models import CodeLM
    from cloud.store import CloudStore
    from soundfleet.config import CloudConfig

    config = CloudConfig(broker_url=mqtt_url, redis_url=redis_url, ha_discovery_prefix="",
                         key_prefix=f"test:refuse:{uuid.uuid4().hex[:8]}:")
    bundle_dir = str(bundle.default_bundle_dir())
    codebook_id = bundle.load_manifest(bundle.default_bundle_dir())["codebook_id"]
    args = (bundle_dir, config.max_batch_size, config.batch_wait_timeout_s, config.redis_url, config.key_prefix)
    app = f"sf-refuse-{uuid.uuid4().hex[:6]}"
    store = CloudStore(redis_url, config.key_prefix)
    site, messages = f"refuse{uuid.uuid4().hex[:4]}", 3
    try:
        ingest = serve.run(Ingest.bind(config, bundle_dir, CodeLM.bind(*args), _poison_classifier().bind(*args)),
                           name=app, route_prefix=None)
        deadline = time.monotonic() + 30
        while not ingest.stats.remote().result()["mqtt_connected"]:
            assert time.monotonic() < deadline, "the ingest never connected"
            time.sleep(0.2)
        publisher = mqtt_client_factory()
        for seq in range(messages):  # both devices in the same rounds
            for device, codes in (("good", np.arange(FRAMES) % 200 + 20), ("poison", np.full(FRAMES, POISON_CODE))):
                payload = wire.FramesMessage(codebook_id=codebook_id, seq=seq, t_start_ns=time.time_ns(),
                                             codes=codes.astype(np.uint16)).to_bytes()
                publisher.publish(wire.frames_topic(site, device), payload, qos=1).wait_for_publish(5)

        def processed(device: str) -> int:
            return int(store.r.hget(store.key("dev", site, device), "processed") or 0)

        deadline = time.monotonic() + 60
        while (processed("good") < messages or processed("poison") < messages) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert processed("good") == messages, "the good device's frames were held up by the poison"
        assert processed("poison") == messages, "the refused frames were neither processed nor set aside"
        letters = [fields for _, fields in store.r.xrange(store.key("deadletter"))]
        refused = [f for f in letters if f[b"reason"] == b"model_error"]
        assert [f[b"topic"].decode() for f in refused] == [wire.frames_topic(site, "poison")] * messages
        assert all(b"injected: a window of only code 13" in f[b"detail"] for f in refused)
        assert int(store.metrics().get("rejected:model_error", 0)) == messages
        assert ingest.stats.remote().result()["stuck_seconds"] == 0  # nothing left retrying
    finally:
        remove_app(app, config)
