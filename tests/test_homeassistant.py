"""Home Assistant discovery: what the cloud announces for each device, read back from the broker.

Every test runs against the shared real broker under a site id no other test uses and
clears the retained messages it leaves. Home Assistant's own Jinja cannot run here, so
the templates are rendered with jinja2's sandbox, given the variables Home Assistant's
MQTT templates get (`value`: the payload text, `value_json`: the payload parsed as JSON).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import pytest

from cloud.homeassistant import (
    DEFAULT_PREFIX,
    DiscoveryPublisher,
    discovery_config,
    removal,
    validate_discovery,
)
from shared_models import wire

MANIFEST = json.loads(
    (Path(wire.__file__).parent / "default_bundle" / "manifest.json").read_text()
)
LABELS: list[str] = MANIFEST["labels"]
DEVICE = "kitchen"


@pytest.fixture
def site() -> str:
    return f"hatest{uuid.uuid4().hex[:10]}"


class Collector:
    """Every message on one subscription, in arrival order: (topic, payload, retain, qos)."""

    def __init__(self, make_client, subscription: str):
        self.messages: list[tuple[str, bytes, bool, int]] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = make_client(on_message=self._on_message)
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.subscribe(subscription, qos=1)
        assert subscribed.wait(5), "no SUBACK"

    def _on_message(self, client, userdata, message) -> None:
        with self._lock:
            self.messages.append((message.topic, bytes(message.payload), bool(message.retain),
                                  int(message.qos)))

    def on(self, topic: str) -> list[tuple[bytes, bool, int]]:
        with self._lock:
            return [(payload, retain, qos) for t, payload, retain, qos in self.messages if t == topic]

    def wait_for(self, topic: str, count: int = 1, timeout_s: float = 10.0):
        deadline = time.monotonic() + timeout_s
        while len(self.on(topic)) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        got = self.on(topic)
        assert len(got) >= count, f"{len(got)} of {count} messages on {topic} in {timeout_s} s"
        return got


def _node_subtree(topic: str) -> str:
    """What a late reader of one node's configs subscribes to: that node's subtree under the
    discovery prefix, e.g. ``homeassistant/event/soundfleet_<site>/#``. Not the whole prefix: a
    shared broker may hold more retained configs than it queues for one subscriber (Mosquitto's
    ``max_queued_messages``, 1000), and the one a test looks for could be left out."""
    assert topic.startswith(f"{DEFAULT_PREFIX}/event/") and topic.endswith("/config"), topic
    return topic.rsplit("/", 2)[0] + "/#"


def _render(template: str, payload: bytes) -> str:
    """`template` as Home Assistant's MQTT integration renders it for one received payload."""
    sandbox = pytest.importorskip("jinja2.sandbox")
    env = sandbox.ImmutableSandboxedEnvironment()
    text = payload.decode()
    return env.from_string(template).render(value=text, value_json=json.loads(text))


def _announce(make_client, publisher: DiscoveryPublisher, site: str,
              status: wire.StatusMessage) -> tuple[str, dict]:
    """Announce via `publisher`, wait until the broker has it, return what a late subscriber
    of the node's subtree reads: (topic, config), after checking it was retained, QoS 1."""
    topic, _ = removal(site, DEVICE)
    watcher = Collector(make_client, topic)
    assert publisher.on_status(make_client(), site, DEVICE, status.to_dict()) is True
    sent = publisher.announced()[(site, DEVICE)]
    deadline = time.monotonic() + 10
    while sent not in [payload for payload, _, _ in watcher.on(topic)]:  # the broker has it
        assert time.monotonic() < deadline, "the config never reached the broker"
        time.sleep(0.05)
    late = Collector(make_client, _node_subtree(topic))
    ((payload, retained, qos),) = late.wait_for(topic)
    assert payload == sent and retained and qos == 1
    return topic, json.loads(payload)


def test_publisher_announces_a_valid_event_entity_that_the_broker_retains(
    mqtt_client_factory, clear_retained, site
):
    clear_retained(removal(site, DEVICE)[0])
    publisher = DiscoveryPublisher(LABELS)
    online = wire.StatusMessage("online", agent_version="0.2.0",
                                model_version=MANIFEST["model_version"])
    topic, config = _announce(mqtt_client_factory, publisher, site, online)

    assert validate_discovery(config, topic=topic) == []
    assert topic == f"homeassistant/event/soundfleet_{site}/{DEVICE}/config"
    assert config["event_types"] == LABELS
    assert config["state_topic"] == wire.events_topic(site, DEVICE) == \
        f"soundfleet/v1/{site}/{DEVICE}/events"
    (availability,) = config["availability"]
    assert availability["topic"] == wire.status_topic(site, DEVICE)
    assert config["qos"] == 1
    assert config["unique_id"] and config["device"]["identifiers"]
    assert config["default_entity_id"] == f"event.soundfleet_{site}_{DEVICE}"
    assert MANIFEST["model_version"] in config["device"]["sw_version"]
    assert "object_id" not in config and "platform" not in config

    # once per process: a heartbeat or an offline status publishes nothing more ...
    client = mqtt_client_factory()
    assert publisher.on_status(client, site, DEVICE, online) is False
    assert publisher.on_status(client, site, DEVICE, {"state": "offline"}) is False
    # ... a new edge model does
    swapped = wire.StatusMessage("online", agent_version="0.2.0", model_version="sf1-new")
    _, updated = _announce(mqtt_client_factory, publisher, site, swapped)
    assert "sf1-new" in updated["device"]["sw_version"]
    assert validate_discovery(updated) == []


def test_a_device_seen_only_offline_is_not_announced(mqtt_client_factory, site):
    publisher = DiscoveryPublisher(LABELS)
    offline = wire.StatusMessage("offline")
    assert publisher.on_status(mqtt_client_factory(), site, DEVICE, offline) is False
    assert publisher.announced() == {}


def test_value_template_turns_a_published_sound_event_into_a_home_assistant_event(
    mqtt_client_factory, site
):
    _, payload = discovery_config(site, DEVICE, LABELS)
    config = json.loads(payload)
    events = Collector(mqtt_client_factory, config["state_topic"])
    publisher = mqtt_client_factory()
    sent = [
        wire.SoundEvent(event_id=uuid.uuid4().hex, site=site, device=DEVICE, label=label,
                        score=0.5 + i / 100, start_ns=1_700_000_000_125_000_000 + i,
                        end_ns=1_700_000_003_250_000_000, model_version=MANIFEST["model_version"],
                        codebook_id=MANIFEST["codebook_id"], seq_first=10, seq_last=12 + i)
        for i, label in enumerate(LABELS)
    ]
    for event in sent:
        publisher.publish(config["state_topic"], event.to_bytes(), qos=1).wait_for_publish(5)
    received = events.wait_for(config["state_topic"], len(sent))

    for event, (raw, _retained, _qos) in zip(sent, received, strict=True):
        rendered = json.loads(_render(config["value_template"], raw))
        assert rendered["event_type"] == event.label
        assert rendered["event_type"] in config["event_types"]
        assert "event_types" not in rendered  # Home Assistant reserves it
        assert rendered["score"] == event.score
        assert rendered["event_id"] == event.event_id
        assert rendered["start"] == wire.iso8601_ms(event.start_ns)
        assert rendered["end"] == "2023-11-14T22:13:23.250Z"


def test_availability_follows_the_retained_status_message(
    mqtt_client_factory, clear_retained, site
):
    _, payload = discovery_config(site, DEVICE, LABELS)
    (availability,) = json.loads(payload)["availability"]
    status_topic = availability["topic"]
    clear_retained(status_topic)
    agent = mqtt_client_factory()
    for state, expected in (("online", availability["payload_available"]),
                            ("offline", availability["payload_not_available"])):
        status = wire.StatusMessage(state, agent_version="0.2.0", t_ns=time.time_ns())
        agent.publish(status_topic, status.to_bytes(), qos=1, retain=True).wait_for_publish(5)
        late = Collector(mqtt_client_factory, status_topic)
        ((retained_payload, retained, _qos),) = late.wait_for(status_topic)
        assert retained
        assert _render(availability["value_template"], retained_payload).strip() == expected
    assert (availability["payload_available"], availability["payload_not_available"]) == \
        ("online", "offline")


def test_removal_deletes_the_retained_config(mqtt_client_factory, clear_retained, site):
    topic, empty = removal(site, DEVICE)
    assert topic == discovery_config(site, DEVICE, LABELS)[0] and empty == b""
    clear_retained(topic)
    publisher = DiscoveryPublisher(LABELS)
    online = wire.StatusMessage("online", agent_version="0.2.0")
    _announce(mqtt_client_factory, publisher, site, online)

    watcher = Collector(mqtt_client_factory, topic)
    watcher.wait_for(topic)  # the retained config
    assert publisher.remove(mqtt_client_factory(), site, DEVICE) is True
    ((payload, _retained, _qos),) = watcher.wait_for(topic, 2)[1:]
    assert payload == b""
    late = Collector(mqtt_client_factory, _node_subtree(topic))
    time.sleep(1.0)  # long enough for a retained message to arrive, if there were one
    assert late.on(topic) == []
    assert publisher.announced() == {}  # forgotten: the next online status announces again


def test_discovery_config_is_compact_deterministic_and_unique_per_device(site):
    topic, payload = discovery_config(site, DEVICE, LABELS, model_version="m", agent_version="a")
    assert (topic, payload) == discovery_config(site, DEVICE, LABELS, model_version="m",
                                                agent_version="a")
    config = json.loads(payload)
    assert payload == json.dumps(config, separators=(",", ":"), ensure_ascii=False).encode()
    other_topic, other = discovery_config(site, "hallway", LABELS)
    assert other_topic != topic
    assert validate_discovery(json.loads(other), topic=other_topic, others=[config]) == []
    assert validate_discovery(config, others=[config]) != []  # the same entity twice
    with pytest.raises(ValueError):
        discovery_config(site, DEVICE, [])
    with pytest.raises(ValueError):
        discovery_config(site, DEVICE, ["siren", "siren"])
    with pytest.raises(wire.InvalidField):
        discovery_config("bad/site", DEVICE, LABELS)


def test_an_abbreviated_config_is_valid_too(site):
    config = json.loads(discovery_config(site, DEVICE, LABELS)[1])
    short = {"uniq_id": config["unique_id"], "stat_t": config["state_topic"],
             "evt_typ": config["event_types"], "val_tpl": config["value_template"],
             "def_ent_id": config["default_entity_id"], "name": config["name"],
             "avty": [{"t": config["availability"][0]["topic"], "val_tpl": "{{ value_json.state }}"}],
             "dev": {"ids": config["device"]["identifiers"], "mf": "soundfleet"}}
    assert validate_discovery(short) == []


def _broken(change):
    def build(site: str) -> dict:
        config = json.loads(discovery_config(site, DEVICE, LABELS)[1])
        change(config)
        return config
    return build


BROKEN = {
    "missing event_types": (_broken(lambda c: c.pop("event_types")), "event_types"),
    "empty event_types": (_broken(lambda c: c.update(event_types=[])), "event_types"),
    "event_types not strings": (_broken(lambda c: c.update(event_types=["siren", 3])),
                                "event_types"),
    "duplicate event_types": (_broken(lambda c: c.update(event_types=["siren", "siren"])),
                              "duplicates"),
    "missing state_topic": (_broken(lambda c: c.pop("state_topic")), "state_topic"),
    "wildcard state_topic": (_broken(lambda c: c.update(state_topic="soundfleet/v1/+/+/events")),
                             "wildcard"),
    "wildcard availability": (_broken(lambda c: c["availability"][0].update(topic="a/#")),
                              "wildcard"),
    "availability without topic": (_broken(lambda c: c["availability"][0].pop("topic")),
                                   "topic"),
    "availability and availability_topic": (
        _broken(lambda c: c.update(availability_topic="a/b")), "together"),
    "missing unique_id": (_broken(lambda c: c.pop("unique_id")), "unique_id"),
    "device without identifiers": (_broken(lambda c: c["device"].pop("identifiers")),
                                   "identifiers"),
    "unknown device key": (_broken(lambda c: c["device"].update(colour="red")), "colour"),
    "both forms of a key": (_broken(lambda c: c.update(stat_t=c["state_topic"])), "both"),
    "mixed abbreviations": (_broken(lambda c: c.update(uniq_id=c.pop("unique_id"))), "mixed"),
    "deprecated object_id": (_broken(lambda c: c.update(object_id="kitchen")), "object_id"),
    "platform in a single-entity config": (_broken(lambda c: c.update(platform="mqtt")),
                                           "platform"),
    "bad qos": (_broken(lambda c: c.update(qos=3)), "qos"),
    "default_entity_id of another domain": (
        _broken(lambda c: c.update(default_entity_id="sensor.kitchen")), "default_entity_id"),
    "unbalanced template": (_broken(lambda c: c.update(value_template="{{ value_json.label")),
                            "value_template"),
    "typo in a key": (_broken(lambda c: c.update(event_type=c.pop("event_types"))), "event_type"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_validate_discovery_reports_a_broken_config(case, site):
    build, expected = BROKEN[case]
    problems = validate_discovery(build(site))
    assert problems, f"{case}: no problem reported"
    assert any(expected in problem for problem in problems), problems


@pytest.mark.parametrize("topic", [
    "homeassistant/event/soundfleet_x/+/config",  # wildcard
    "homeassistant/sensor/soundfleet_x/kitchen/config",  # not the event component
    "homeassistant/event/soundfleet_x/kitchen",  # no /config
    "homeassistant/event/soundfleet x/kitchen/config",  # space in the node id
])
def test_validate_discovery_reports_a_bad_discovery_topic(topic, site):
    config = json.loads(discovery_config(site, DEVICE, LABELS)[1])
    assert validate_discovery(config, topic=topic) != []
    assert validate_discovery("not a dict") != []


@pytest.mark.slow
def test_the_running_cloud_announces_each_device_and_its_events_fit_the_entity(
    cloud_app, mqtt_url, mqtt_client_factory, clear_retained, site, tmp_path
):
    """End to end: a real edge agent streams a siren; the cloud's ingest announces the device to
    Home Assistant on its first status, and the siren event on the entity's state topic renders,
    through the entity's own template, to an event type the entity declares."""
    from edge.agent import EdgeAgent
    from edge.sources import file_source
    from shared_models.constants import HOP_SAMPLES
    from soundfleet.config import EdgeConfig

    topic, _ = removal(site, DEVICE)
    clear_retained(topic)
    clear_retained(wire.status_topic(site, DEVICE))
    events = Collector(mqtt_client_factory, wire.events_topic(site, DEVICE))
    config = EdgeConfig(broker_url=mqtt_url, site=site, device=DEVICE, realtime=False, follow_models=False)
    agent = EdgeAgent(config, state_dir=tmp_path)
    agent.run(file_source(str(Path(__file__).parent / "fixtures" / "siren_street.wav"),
                          config.frames_per_message * HOP_SAMPLES))

    late = Collector(mqtt_client_factory, _node_subtree(topic))
    ((payload, retained, _),) = late.wait_for(topic, timeout_s=30)
    entity = json.loads(payload)
    assert retained and validate_discovery(entity, topic=topic) == []
    assert entity["event_types"] == LABELS and entity["state_topic"] == wire.events_topic(site, DEVICE)
    deadline = time.monotonic() + 60
    while not any(json.loads(p)["label"] == "siren" for p, _, _ in events.on(wire.events_topic(site, DEVICE))):
        assert time.monotonic() < deadline, "no siren event on the entity's state topic"
        time.sleep(0.2)
    for event_payload, _, _ in events.on(wire.events_topic(site, DEVICE)):
        rendered = json.loads(_render(entity["value_template"], event_payload))
        assert rendered["event_type"] in entity["event_types"]
