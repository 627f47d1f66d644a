"""Free loopback ports, waiting for a port, and MQTT / Redis reachability probes.

Stdlib only at import time; redis-py is imported when `probe_redis` first runs.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
import uuid
from collections.abc import Callable

from .urls import parse_mqtt_url

LOOPBACK_HOST = "127.0.0.1"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 1.0

_CONNACK_REASONS = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}


# -------------------------------------------------------------------------- ports


def free_port(host: str = LOOPBACK_HOST) -> int:
    """A TCP port nobody listens on right now (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    """True if a server could bind `host:port` now (SO_REUSEADDR, as servers set it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def wait_for_port(host: str, port: int, timeout_s: float, alive: Callable[[], bool] = bool) -> None:
    """Block until `host:port` accepts TCP connections; TimeoutError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"server for {host}:{port} exited before it accepted connections")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing accepted connections on {host}:{port} within {timeout_s:.1f} s")


# ------------------------------------------------------------------------- probes


def _mqtt_string(value: str) -> bytes:
    data = value.encode()
    return len(data).to_bytes(2, "big") + data


def _mqtt_connect_packet(client_id: str, username: str | None, password: str | None) -> bytes:
    """An MQTT 3.1.1 CONNECT with a clean session and a 10 s keep-alive."""
    flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = _mqtt_string("MQTT") + bytes([4, flags]) + (10).to_bytes(2, "big")
    body += _mqtt_string(client_id)
    body += _mqtt_string(username) if username is not None else b""
    body += _mqtt_string(password) if password is not None else b""
    remaining, length = b"", len(body)
    while True:  # the MQTT variable-length integer
        byte, length = length % 128, length // 128
        remaining += bytes([byte | (0x80 if length else 0)])
        if not length:
            break
    return b"\x10" + remaining + body


def probe_mqtt(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """None if the broker at `url` accepts an MQTT CONNECT, else why not."""
    endpoint = parse_mqtt_url(url)
    packet = _mqtt_connect_packet(
        f"soundfleet-probe-{uuid.uuid4().hex[:12]}", endpoint.username, endpoint.password
    )
    try:
        with contextlib.ExitStack() as stack:
            sock = stack.enter_context(
                socket.create_connection((endpoint.host, endpoint.port), timeout=timeout_s)
            )
            if endpoint.tls:
                context = ssl.create_default_context()
                sock = stack.enter_context(
                    context.wrap_socket(sock, server_hostname=endpoint.host)
                )
            sock.sendall(packet)
            connack = b""
            while len(connack) < 4:
                chunk = sock.recv(4 - len(connack))
                if not chunk:
                    return "connection closed before CONNACK"
                connack += chunk
            if connack[0] != 0x20:
                return f"expected CONNACK, got packet type 0x{connack[0]:02x}"
            if connack[3] != 0:
                return _CONNACK_REASONS.get(connack[3], f"CONNACK return code {connack[3]}")
            sock.sendall(b"\xe0\x00")  # DISCONNECT, so the broker logs a clean goodbye
            return None
    except OSError as exc:  # refused, timed out, reset, TLS errors
        return f"{type(exc).__name__}: {exc}"


def probe_redis(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """None if the Redis at `url` answers PING, else why not."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client = redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        client.ping()
        return None
    except redis.RedisError as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        client.close()


def broker_reachable(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """True if an MQTT broker at `url` answers CONNECT with CONNACK 0."""
    return probe_mqtt(url, timeout_s) is None


def redis_reachable(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """True if a Redis at `url` answers PING."""
    return probe_redis(url, timeout_s) is None
