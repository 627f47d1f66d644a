"""Home Assistant MQTT discovery: one `event` entity per device, announced by the cloud.

For each device the cloud publishes one retained discovery config (QoS 1) so that Home
Assistant creates an `event` entity that fires on our SoundEvent JSON and follows the
device's retained status for availability. Nothing here touches our own wire payloads
(those are `shared_models/wire.py`'s); this module only writes Home Assistant's JSON.

Schema followed (the docs' source, home-assistant.io commit 172bcca, which already covers
device-based discovery, Home Assistant 2024.11+; plus the 2025.10 change below):
- MQTT event platform, https://www.home-assistant.io/integrations/event.mqtt/
  (`source/_integrations/event.mqtt.markdown`): `state_topic` and `event_types` required; the payload,
  after `value_template`, must be a JSON object with `event_type` in `event_types`; the
  other keys become the event's attributes; retained state messages are ignored.
- MQTT discovery, https://www.home-assistant.io/integrations/mqtt/#mqtt-discovery:
  single-component topic `<discovery_prefix>/<component>/[<node_id>/]<object_id>/config`,
  node and object ids of `[a-zA-Z0-9_-]`; an empty retained payload deletes the entity;
  `platform` only belongs in device-based discovery (`<prefix>/device/<id>/config`), which
  we do not use; abbreviations (`stat_t`, `uniq_id`, ...) are optional.
- `default_entity_id` ("event.<object>") replaces the deprecated `object_id` since Home
  Assistant 2025.10 (home-assistant/core PR #151775; `object_id` stops working in 2026.4).
  The stored event.mqtt page predates that change and still lists `object_id`.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from shared_models.wire import StatusMessage, events_topic, status_topic, validate_name

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "homeassistant"  # Home Assistant's default discovery prefix
COMPONENT = "event"
DISCOVERY_QOS = 1
MANUFACTURER = "soundfleet"
MODEL = "soundfleet edge agent"
ORIGIN_NAME = "soundfleet"
ICON = "mdi:ear-hearing"
PAYLOAD_AVAILABLE = "online"  # StatusMessage.state values
PAYLOAD_NOT_AVAILABLE = "offline"

# SoundEvent JSON -> the JSON object Home Assistant's event entity wants: `label` becomes
# `event_type`, the other keys become the event's attributes. HA parses the payload into
# `value_json`; `tojson` quotes each value as JSON.
EVENT_VALUE_TEMPLATE = (
    '{"event_type":{{ value_json.label | tojson }},'
    '"event_id":{{ value_json.event_id | tojson }},'
    '"score":{{ value_json.score | tojson }},'
    '"start":{{ value_json.start | tojson }},'
    '"end":{{ value_json.end | tojson }},'
    '"model_version":{{ value_json.model_version | tojson }}}'
)
# StatusMessage JSON -> "online" / "offline", compared with payload_(not_)available.
AVAILABILITY_VALUE_TEMPLATE = "{{ value_json.state }}"


# --- building the config ----------------------------------------------------------------
def _slug(text: str) -> str:
    """Lowercase [a-z0-9] words joined by single "_", as an entity id's object part must be."""
    return "_".join(re.findall(r"[a-z0-9]+", text.lower()))


def _checked_labels(labels: Sequence[str]) -> list[str]:
    labels = list(labels)
    if not labels or not all(isinstance(label, str) and label for label in labels):
        raise ValueError(f"labels must be a non-empty list of non-empty strings, got {labels!r}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels must be unique, got {labels!r}")
    return labels


def discovery_topic(site: str, device: str, prefix: str = DEFAULT_PREFIX) -> str:
    """`<prefix>/event/soundfleet_<site>/<device>/config`: node id per site, object id per
    device, so two (site, device) pairs never share a topic."""
    _check_prefix(prefix)
    return f"{prefix}/{COMPONENT}/soundfleet_{validate_name(site)}/{validate_name(device)}/config"


def device_identifier(site: str, device: str) -> str:
    """The Home Assistant device registry id of one agent (":" never occurs in our ids)."""
    return f"soundfleet:{validate_name(site)}:{validate_name(device)}"


def unique_id(site: str, device: str) -> str:
    """The entity's unique id: one sound-event entity per device."""
    return f"{device_identifier(site, device)}:events"


def discovery_config(
    site: str,
    device: str,
    labels: Sequence[str],
    *,
    prefix: str = DEFAULT_PREFIX,
    model_version: str = "",
    agent_version: str = "",
) -> tuple[str, bytes]:
    """(discovery topic, compact JSON config) of the device's `event` entity.

    `labels` are the cloud bundle's label names, in manifest order: they become
    `event_types`. `model_version` (the edge model in use) and `agent_version` go into the
    device's `sw_version`. Same arguments, same bytes (keys in a fixed order)."""
    labels = _checked_labels(labels)
    model = f"(model {model_version})" if model_version else ""
    sw_version = " ".join(part for part in (agent_version, model) if part)
    config: dict[str, Any] = {
        "name": "Sound event",
        "unique_id": unique_id(site, device),
        "default_entity_id": f"{COMPONENT}.{_slug(f'soundfleet {site} {device}')}",
        "state_topic": events_topic(site, device),
        "event_types": labels,
        "value_template": EVENT_VALUE_TEMPLATE,
        "availability": [{
            "topic": status_topic(site, device),
            "value_template": AVAILABILITY_VALUE_TEMPLATE,
            "payload_available": PAYLOAD_AVAILABLE,
            "payload_not_available": PAYLOAD_NOT_AVAILABLE,
        }],
        "qos": DISCOVERY_QOS,
        "icon": ICON,
        "device": {
            "identifiers": [device_identifier(site, device)],
            "name": f"{device} ({site})",
            "manufacturer": MANUFACTURER,
            "model": MODEL,
            **({"sw_version": sw_version} if sw_version else {}),
        },
        "origin": {"name": ORIGIN_NAME},
    }  # fmt: skip
    payload = json.dumps(config, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return discovery_topic(site, device, prefix), payload.encode()


def removal(site: str, device: str, prefix: str = DEFAULT_PREFIX) -> tuple[str, bytes]:
    """(discovery topic, b""): published retained, it deletes the entity and its config."""
    return discovery_topic(site, device, prefix), b""


def _check_prefix(prefix: str) -> None:
    if not isinstance(prefix, str) or not prefix or _topic_problem(prefix) or prefix.endswith("/"):
        raise ValueError(f"discovery prefix must be a topic without wildcards, got {prefix!r}")


# --- checking a config against the documented schema -------------------------------------
# The abbreviations Home Assistant expands, for the keys an event entity can use.
ABBREVIATIONS = {
    "avty": "availability", "avty_mode": "availability_mode", "avty_t": "availability_topic",
    "avty_tpl": "availability_template", "def_ent_id": "default_entity_id", "dev": "device",
    "dev_cla": "device_class", "e": "encoding", "en": "enabled_by_default",
    "ent_cat": "entity_category", "ent_pic": "entity_picture", "evt_typ": "event_types",
    "ic": "icon", "json_attr_t": "json_attributes_topic",
    "json_attr_tpl": "json_attributes_template",
    "o": "origin", "obj_id": "object_id", "p": "platform", "pl_avail": "payload_available",
    "pl_not_avail": "payload_not_available", "stat_t": "state_topic", "uniq_id": "unique_id",
    "val_tpl": "value_template",
}  # fmt: skip
AVAILABILITY_ABBREVIATIONS = {
    "t": "topic", "val_tpl": "value_template", "pl_avail": "payload_available",
    "pl_not_avail": "payload_not_available",
}  # fmt: skip
DEVICE_ABBREVIATIONS = {
    "cns": "connections", "cu": "configuration_url", "hw": "hw_version", "ids": "identifiers",
    "mf": "manufacturer", "mdl": "model", "mdl_id": "model_id", "sa": "suggested_area",
    "sn": "serial_number", "sw": "sw_version",
}  # fmt: skip
ORIGIN_ABBREVIATIONS = {"sw": "sw_version", "url": "support_url"}

EVENT_KEYS = frozenset(ABBREVIATIONS.values()) | {"~", "name", "qos"}
DEVICE_KEYS = frozenset(DEVICE_ABBREVIATIONS.values()) | {"name", "model", "via_device"}
ORIGIN_KEYS = frozenset({"name", "sw_version", "support_url"})
AVAILABILITY_KEYS = frozenset(AVAILABILITY_ABBREVIATIONS.values())
EVENT_DEVICE_CLASSES = frozenset({"button", "doorbell", "motion"})
ENTITY_CATEGORIES = frozenset({"config", "diagnostic"})
AVAILABILITY_MODES = frozenset({"all", "any", "latest"})
_ENTITY_ID_RE = re.compile(r"(?!.+__)(?!_)[\da-z_]+(?<!_)\.(?!_)[\da-z_]+(?<!_)")  # HA's rule
_DISCOVERY_ID_RE = re.compile(r"[a-zA-Z0-9_-]+")


def _topic_problem(topic: Any) -> str | None:
    """Why `topic` is not one exact MQTT topic (stricter than HA: no wildcards at all)."""
    if not isinstance(topic, str) or not topic:
        return f"must be a non-empty string, got {topic!r}"
    if "+" in topic or "#" in topic:
        return f"must not contain the MQTT wildcards + or #, got {topic!r}"
    if "\0" in topic or len(topic.encode()) > 65535:
        return "must have no NUL character and at most 65535 UTF-8 bytes"
    return None


def _discovery_topic_problems(topic: Any) -> list[str]:
    """Problems of a single-entity discovery topic <prefix>/event/[<node_id>/]<object_id>/config."""
    if problem := _topic_problem(topic):
        return [f"discovery topic {problem}"]
    parts = topic.split("/")
    if len(parts) >= 5 and parts[-4] == COMPONENT:
        ids = parts[-3:-1]  # node_id, object_id
    elif len(parts) >= 4 and parts[-3] == COMPONENT:
        ids = parts[-2:-1]  # object_id
    else:
        ids = []
    if not ids or parts[-1] != "config":
        return [f"discovery topic must be <prefix>/event/[<node_id>/]<object_id>/config, "
                f"got {topic!r}"]
    if not all(_DISCOVERY_ID_RE.fullmatch(i) for i in ids):
        return [f"discovery topic: node_id and object_id must be [a-zA-Z0-9_-]+, got {ids}"]
    return []


def _expand(block: Mapping[str, Any], abbreviations: Mapping[str, str], where: str,
            problems: list[str]) -> dict[str, Any]:
    """`block` with abbreviated keys written out; both forms of one key, or a mix of
    abbreviated and full names, are reported."""
    out: dict[str, Any] = {}
    short = sorted(k for k in block if k in abbreviations and abbreviations[k] != k)
    full = sorted(k for k in block if k in abbreviations.values() and k not in abbreviations)
    for key in short:
        if abbreviations[key] in block:
            problems.append(f"{where}: both {key!r} and {abbreviations[key]!r} are set")
    if short and full:
        problems.append(f"{where}: abbreviated keys {short} mixed with full keys {full}")
    for key, value in block.items():
        out[abbreviations.get(key, key)] = value
    return out


def _check_block(block: Any, name: str, abbreviations: Mapping[str, str],
                 known: frozenset[str], problems: list[str]) -> dict[str, Any] | None:
    if not isinstance(block, Mapping):
        problems.append(f"{name} must be a JSON object, got {type(block).__name__}")
        return None
    block = _expand(block, abbreviations, name, problems)
    unknown = sorted(set(block) - known)
    if unknown:
        problems.append(f"{name} has unknown keys {unknown}")
    for key in sorted(set(block) & known - {"identifiers", "connections"}):
        if not isinstance(block[key], str):
            problems.append(f"{name}.{key} must be a string, got {block[key]!r}")
    return block


def _check_device(device: Any, problems: list[str]) -> None:
    device = _check_block(device, "device", DEVICE_ABBREVIATIONS, DEVICE_KEYS, problems)
    if device is None:
        return
    ids, connections = device.get("identifiers"), device.get("connections")
    if not ids and not connections:
        problems.append("device needs at least one of identifiers and connections")
    if ids is not None and not (
        isinstance(ids, str) and ids
        or isinstance(ids, list) and all(isinstance(i, str) and i for i in ids)
    ):
        problems.append(f"device.identifiers must be a string or a list of strings, got {ids!r}")
    if connections is not None and not (isinstance(connections, list) and all(
        isinstance(c, list) and len(c) == 2 and all(isinstance(x, str) for x in c)
        for c in connections
    )):
        problems.append("device.connections must be a list of [type, id] string pairs")


def _check_availability(entries: Any, problems: list[str]) -> None:
    if not isinstance(entries, list) or not entries:
        problems.append(f"availability must be a non-empty list, got {entries!r}")
        return
    for i, entry in enumerate(entries):
        name = f"availability[{i}]"
        entry = _check_block(entry, name, AVAILABILITY_ABBREVIATIONS, AVAILABILITY_KEYS, problems)
        if entry is None:
            continue
        if "topic" not in entry:
            problems.append(f"{name} is missing its required topic")
        elif problem := _topic_problem(entry["topic"]):
            problems.append(f"{name}.topic {problem}")


def _template_problem(template: Any) -> str | None:
    if not isinstance(template, str) or not template.strip():
        return f"must be a non-empty template string, got {template!r}"
    if template.count("{{") != template.count("}}") or template.count("{%") != template.count("%}"):
        return f"has unbalanced {{{{ }}}} or {{% %}} delimiters: {template!r}"
    return None


def _expand_base_topic(config: dict[str, Any]) -> None:
    """Replace a "~" at either end of a `*_topic` value by the base topic `config["~"]`."""
    base = config.get("~")
    for key, value in config.items():
        if isinstance(base, str) and key.endswith("_topic") and isinstance(value, str):
            if value.startswith("~"):
                config[key] = base + value[1:]
            elif value.endswith("~"):
                config[key] = value[:-1] + base


def validate_discovery(config: Any, *, topic: str | None = None,
                       others: Iterable[Mapping[str, Any]] = ()) -> list[str]:
    """Problems of one `event` discovery config against Home Assistant's documented schema
    (see the module docstring), plus our own rules: a unique_id and a device are required
    and no topic may contain a wildcard. Empty list = valid.

    `topic`, if given, is the config's discovery topic and is checked too. `others` are
    the configs of other entities: a unique_id one of them already uses is a problem."""
    problems = [] if topic is None else _discovery_topic_problems(topic)
    if not isinstance(config, Mapping):
        return [*problems, f"config must be a JSON object, got {type(config).__name__}"]
    config = _expand(config, ABBREVIATIONS, "config", problems)
    _expand_base_topic(config)
    if unknown := sorted(set(config) - EVENT_KEYS):
        problems.append(f"unknown keys {unknown} (Home Assistant ignores them: a typo?)")
    problems += [f"missing required key {key!r}" for key in ("state_topic", "event_types", "device")
                 if key not in config]

    types = config.get("event_types", ["-"])
    if not (isinstance(types, list) and types and all(isinstance(t, str) and t for t in types)):
        problems.append(f"event_types must be a non-empty list of non-empty strings, got {types!r}")
    elif len(set(types)) != len(types):
        problems.append(f"event_types has duplicates: {types!r}")
    uid = config.get("unique_id")
    if not isinstance(uid, str) or not uid:
        problems.append(f"unique_id must be a non-empty string (the device registry needs it), "
                        f"got {uid!r}")
    elif any(isinstance(o, Mapping) and uid in (o.get("unique_id"), o.get("uniq_id"))
             for o in others):
        problems.append(f"unique_id {uid!r} is already used by another entity")
    if "device" in config:
        _check_device(config["device"], problems)
    if "origin" in config:
        origin = _check_block(config["origin"], "origin", ORIGIN_ABBREVIATIONS, ORIGIN_KEYS,
                              problems)
        if origin is not None and "name" not in origin:
            problems.append("origin is missing its required name")
    if "availability" in config:
        if "availability_topic" in config:
            problems.append("availability and availability_topic must not be used together")
        _check_availability(config["availability"], problems)

    for key in ("state_topic", "availability_topic", "json_attributes_topic"):
        if key in config and (problem := _topic_problem(config[key])):
            problems.append(f"{key} {problem}")
    for key in ("value_template", "availability_template", "json_attributes_template"):
        if key in config and (problem := _template_problem(config[key])):
            problems.append(f"{key} {problem}")
    for key in ("icon", "encoding", "entity_picture"):
        if key in config and not isinstance(config[key], str):
            problems.append(f"{key} must be a string, got {config[key]!r}")
    if not isinstance(config.get("name", ""), str | None):
        problems.append(f"name must be a string or null, got {config['name']!r}")
    if not isinstance(config.get("enabled_by_default", True), bool):
        problems.append("enabled_by_default must be true or false")
    qos = config.get("qos", 0)
    if isinstance(qos, bool) or qos not in (0, 1, 2):
        problems.append(f"qos must be 0, 1 or 2, got {qos!r}")
    for key, allowed in (("availability_mode", AVAILABILITY_MODES),
                         ("device_class", EVENT_DEVICE_CLASSES),
                         ("entity_category", ENTITY_CATEGORIES)):
        if config.get(key) is not None and config[key] not in allowed:
            problems.append(f"{key} must be one of {sorted(allowed)}, got {config[key]!r}")

    entity_id = config.get("default_entity_id", f"{COMPONENT}.ok")
    if not (isinstance(entity_id, str) and _ENTITY_ID_RE.fullmatch(entity_id)
            and entity_id.startswith(f"{COMPONENT}.")):
        problems.append(f"default_entity_id must be a valid entity id 'event.<object_id>', "
                        f"got {entity_id!r}")
    if "object_id" in config:
        problems.append("object_id is deprecated since Home Assistant 2025.10 (gone in 2026.4): "
                        "use default_entity_id")
    if "platform" in config:
        problems.append("platform only belongs in device-based discovery "
                        "(<prefix>/device/<id>/config), not in a single-entity config")
    return problems


# --- publishing ----------------------------------------------------------------------------
class DiscoveryPublisher:
    """Announces each device to Home Assistant once per process, and again when what the
    config says changes (the edge model or agent version, or the labels).

    Call `on_status` with every status message the cloud receives; the config goes out
    retained at QoS 1 the first time a device is seen online. Publishing does not wait for
    the broker's ack (safe inside paho callbacks); a publish paho refuses is retried on
    the next status (a heartbeat every 30 s). Thread-safe."""

    def __init__(self, labels: Sequence[str], *, prefix: str = DEFAULT_PREFIX) -> None:
        _check_prefix(prefix)
        self.prefix = prefix
        self.labels = _checked_labels(labels)  # fail now on bad labels, not per device
        self._announced: dict[tuple[str, str], bytes] = {}  # (site, device) -> payload sent
        self._lock = threading.Lock()

    def set_labels(self, labels: Sequence[str]) -> None:
        """A new cloud bundle: every device is re-announced on its next online status."""
        labels = _checked_labels(labels)
        with self._lock:
            self.labels = labels

    def announced(self) -> dict[tuple[str, str], bytes]:
        """(site, device) -> the config payload last published for it."""
        with self._lock:
            return dict(self._announced)

    def on_status(self, client: Any, site: str, device: str,
                  status: StatusMessage | Mapping[str, Any]) -> bool:
        """Publish the device's config if it is online and its config is new or changed;
        True when published. An offline status publishes nothing: Home Assistant reads
        availability from the retained status itself. A malformed status raises WireError."""
        if not isinstance(status, StatusMessage):
            status = StatusMessage.from_dict(dict(status))
        if status.state != "online":
            return False
        with self._lock:
            topic, payload = discovery_config(
                site, device, self.labels, prefix=self.prefix,
                model_version=status.model_version, agent_version=status.agent_version,
            )  # fmt: skip
            if self._announced.get((site, device)) == payload:
                return False
            info = client.publish(topic, payload, qos=DISCOVERY_QOS, retain=True)
            if info.rc != 0:  # MQTT_ERR_SUCCESS; e.g. not connected: try again next status
                log.warning("Home Assistant discovery for %s/%s not sent (rc %s)",
                            site, device, info.rc)
                return False
            self._announced[(site, device)] = payload
        log.info("announced %s/%s to Home Assistant on %s", site, device, topic)
        return True

    def remove(self, client: Any, site: str, device: str) -> bool:
        """Delete the device's entity from Home Assistant (empty retained config) and forget
        it; True when paho accepted the publish."""
        topic, payload = removal(site, device, self.prefix)
        with self._lock:
            info = client.publish(topic, payload, qos=DISCOVERY_QOS, retain=True)
            if info.rc != 0:
                log.warning("Home Assistant removal for %s/%s not sent (rc %s)",
                            site, device, info.rc)
                return False
            self._announced.pop((site, device), None)
        return True
