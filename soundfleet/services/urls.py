"""MQTT URLs: `parse_mqtt_url` into an `MqttEndpoint`, and `redact_url` for logs.

Stdlib only: the edge agent and cloud ingest import this without the dev extras.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

MQTT_DEFAULT_PORT = 1883
MQTTS_DEFAULT_PORT = 8883


@dataclass(frozen=True)
class MqttEndpoint:
    """Where an MQTT broker listens and how to log in."""

    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None


def parse_mqtt_url(url: str) -> MqttEndpoint:
    """Parse `mqtt://[user[:pass]@]host[:port]` or `mqtts://...` (ports 1883 / 8883)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"MQTT URL {redact_url(url)!r} must start with mqtt:// or mqtts://")
    if not parts.hostname:
        raise ValueError(f"MQTT URL {redact_url(url)!r} has no host")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"MQTT URL {redact_url(url)!r} has a bad port: {exc}") from exc
    tls = scheme == "mqtts"
    return MqttEndpoint(
        host=parts.hostname,
        port=port or (MQTTS_DEFAULT_PORT if tls else MQTT_DEFAULT_PORT),
        tls=tls,
        username=unquote(parts.username) if parts.username is not None else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


def redact_url(url: str) -> str:
    """The URL with its password replaced by `***`, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()
