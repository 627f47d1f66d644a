"""The agent against a broker that demands TLS and a password: what gets through, what is refused.

The module owns one Mosquitto with a TLS-only listener, a certificate for
127.0.0.1 signed by a throwaway CA made here with `openssl`, anonymous
clients refused and one user in a `mosquitto_passwd` file. A subscriber that
trusts the same CA and logs in as that user sees what the agent delivered.
"""

from __future__ import annotations

import getpass
import os
import shutil
import ssl
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edge.spool import Spool
from shared_models import wire
from soundfleet.services import find_server_binary, free_port, wait_for_port

FIXTURE = Path(__file__).parent / "fixtures" / "quiet_room.wav"
FIXTURE_MESSAGES = 4  # quiet_room.wav: 4 s, one 40-frame message per second
SITE = "tlstest"
USERNAME = "edge-sensor"
PASSWORD = "Zq7-tls-s3cret-4711"  # distinctive, so a leak into the logs cannot hide


@dataclass(frozen=True)
class TlsBroker:
    port: int
    ca_file: Path

    def url(self, credentials: str = "") -> str:
        return f"mqtts://{credentials}127.0.0.1:{self.port}"


def _run(cmd: list[str], cwd: Path) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"{' '.join(cmd)} failed: {result.stderr}"


def _make_certificates(workdir: Path) -> None:
    """ca.pem (self-signed CA) and server.pem/server.key for 127.0.0.1 (CN localhost) signed by it."""
    _run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
          "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=soundfleet test CA",
          "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
         workdir)
    _run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
          "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"], workdir)
    (workdir / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    _run(["openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
          "-out", "server.pem", "-days", "2", "-extfile", "server.ext"], workdir)


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory):
    mosquitto = find_server_binary("mosquitto")
    for name, found in (("mosquitto", mosquitto), ("mosquitto_passwd", shutil.which("mosquitto_passwd")),
                        ("openssl", shutil.which("openssl"))):
        if found is None:
            pytest.skip(f"needs the {name} binary to run a TLS + password broker")
    workdir = tmp_path_factory.mktemp("tls-broker")
    _make_certificates(workdir)
    _run(["mosquitto_passwd", "-c", "-b", "passwords", USERNAME, PASSWORD], workdir)
    port = free_port()
    config = workdir / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\n"
        f"cafile {workdir / 'ca.pem'}\ncertfile {workdir / 'server.pem'}\nkeyfile {workdir / 'server.key'}\n"
        f"allow_anonymous false\npassword_file {workdir / 'passwords'}\n"
        f"user {getpass.getuser()}\n"  # keep our user: root would drop to 'mosquitto', who cannot read the key
    )
    with open(workdir / "mosquitto.log", "ab") as log:
        process = subprocess.Popen([mosquitto, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port, 10, alive=lambda: process.poll() is None)
        yield TlsBroker(port, workdir / "ca.pem")
    finally:
        process.terminate()
        process.wait(10)


class TlsCollector:
    """A subscriber that trusts the test CA and logs in: what it receives, the broker accepted."""

    def __init__(self, broker: TlsBroker, topic: str):
        self.payloads: list[bytes] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"tls-sub-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv311)
        self.client.tls_set(ca_certs=str(broker.ca_file), cert_reqs=ssl.CERT_REQUIRED)
        self.client.username_pw_set(USERNAME, PASSWORD)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.connect("127.0.0.1", broker.port, keepalive=30)
        self.client.loop_start()
        self.client.subscribe(topic, qos=1)
        assert subscribed.wait(10), "the TLS subscriber got no SUBACK"

    def _on_message(self, client, userdata, message) -> None:
        with self._lock:
            self.payloads.append(bytes(message.payload))

    def seqs(self, count: int, timeout_s: float = 15.0) -> list[int]:
        deadline = time.monotonic() + timeout_s
        while len(self.payloads) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.3)  # a duplicate would arrive now
        with self._lock:
            return [wire.FramesMessage.from_bytes(p).seq for p in self.payloads]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def collector_factory():
    made: list[TlsCollector] = []

    def make(broker: TlsBroker, topic: str) -> TlsCollector:
        made.append(TlsCollector(broker, topic))
        return made[-1]

    yield make
    for collector in made:
        collector.close()


def _agent(broker_url: str, device: str, state_dir: Path, *extra: str, password: str | None = None,
           timeout_s: float = 60) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("SOUNDFLEET_")}
    if password is not None:
        env["SOUNDFLEET_EDGE__PASSWORD"] = password
    cmd = [sys.executable, "-m", "soundfleet.cli", "edge", "run", "--site", SITE, "--device", device,
           "--broker", broker_url, "--state-dir", str(state_dir), "--source", str(FIXTURE), "--no-realtime",
           "--no-follow-models", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)


def _spool_depth(state_dir: Path, device: str) -> int:
    spool = Spool(state_dir / f"{SITE}.{device}" / "spool")
    try:
        return spool.stats().depth
    finally:
        spool.close()


def test_agent_streams_over_tls_with_username_and_password_from_env(tls_broker, collector_factory, tmp_path):
    device = f"tls-{uuid.uuid4().hex[:6]}"
    collector = collector_factory(tls_broker, wire.frames_topic(SITE, device))
    result = _agent(tls_broker.url(), device, tmp_path, "--tls-ca-file", str(tls_broker.ca_file),
                    "--username", USERNAME, password=PASSWORD)
    assert result.returncode == 0, result.stderr[-3000:]
    assert collector.seqs(FIXTURE_MESSAGES) == list(range(FIXTURE_MESSAGES))
    assert _spool_depth(tmp_path, device) == 0
    assert PASSWORD not in result.stderr + result.stdout


def test_wrong_password_is_refused_without_a_traceback_and_frames_stay_spooled(tls_broker, tmp_path):
    device = f"badpw-{uuid.uuid4().hex[:6]}"
    wrong = "Wr0ng-pw-9913"
    result = _agent(tls_broker.url(), device, tmp_path, "--tls-ca-file", str(tls_broker.ca_file),
                    "--username", USERNAME, "--drain-timeout-s", "3", password=wrong)
    assert result.returncode == 3, result.stderr[-3000:]  # finished reading; frames wait in the spool
    assert "refused the connection" in result.stderr and "not authori" in result.stderr.lower()
    assert "spooling to disk" in result.stderr
    assert f"{FIXTURE_MESSAGES} messages not yet acknowledged" in result.stderr
    assert "Traceback" not in result.stderr
    assert wrong not in result.stderr + result.stdout
    assert _spool_depth(tmp_path, device) == FIXTURE_MESSAGES


def test_untrusted_server_certificate_is_refused_with_a_clear_error(tls_broker, tmp_path):
    device = f"untrusted-{uuid.uuid4().hex[:6]}"
    # no --tls-ca-file: the system trust store, which does not know the test CA
    result = _agent(tls_broker.url(), device, tmp_path, "--username", USERNAME, "--drain-timeout-s", "3",
                    password=PASSWORD)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "cannot reach MQTT broker" in result.stderr
    assert "certificate verify failed" in result.stderr.lower()
    assert "Traceback" not in result.stderr
    assert _spool_depth(tmp_path, device) == FIXTURE_MESSAGES


def test_credentials_in_the_broker_url_work_and_the_password_is_redacted_from_logs(
        tls_broker, collector_factory, tmp_path):
    device = f"urlcred-{uuid.uuid4().hex[:6]}"
    collector = collector_factory(tls_broker, wire.frames_topic(SITE, device))
    url = tls_broker.url(f"{USERNAME}:{PASSWORD}@")
    result = _agent(url, device, tmp_path, "--tls-ca-file", str(tls_broker.ca_file), "--log-level", "debug")
    assert result.returncode == 0, result.stderr[-3000:].replace(PASSWORD, "<password>")
    assert collector.seqs(FIXTURE_MESSAGES) == list(range(FIXTURE_MESSAGES))
    assert PASSWORD not in result.stderr + result.stdout
    assert f"{USERNAME}:***@127.0.0.1" in result.stderr  # the URL is logged, redacted
