"""infra/soundfleet-edge.service runs the agent we ship, and the agent behaves as the unit expects.

The unit promises: `soundfleet edge run` with flags this CLI accepts, restarts
after a crash, state in systemd's StateDirectory= (handed to the agent as
$STATE_DIRECTORY), and a SIGTERM stop that counts as success (exit 130,
SuccessExitStatus=130) after a clean retained "offline".
"""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from shared_models import wire
from soundfleet.cli import build_parser

UNIT = Path(__file__).resolve().parents[1] / "infra" / "soundfleet-edge.service"
FIXTURE = Path(__file__).parent / "fixtures" / "quiet_room.wav"
SITE = "unittest"
AGENT_ENV = {k: v for k, v in os.environ.items() if not k.startswith("SOUNDFLEET_") and k != "STATE_DIRECTORY"}


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"))
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def _exec_start() -> list[str]:
    return shlex.split(_unit()["Service"]["ExecStart"])


def test_unit_runs_the_edge_agent_with_arguments_our_cli_accepts():
    binary, *args = _exec_start()
    assert Path(binary).name == "soundfleet"
    parsed = build_parser().parse_args(args)  # SystemExit (test error) on an unknown flag
    assert (parsed.command, parsed.edge_command) == ("edge", "run")
    assert not parsed.dry_run


def test_unit_restarts_the_agent_keeps_its_state_and_treats_sigterm_exit_as_success():
    service = _unit()["Service"]
    assert service["Restart"] == "always"
    assert service["StateDirectory"].strip()
    assert "130" in service["SuccessExitStatus"].split()
    assert float(service["TimeoutStopSec"]) > 5  # the agent's clean stop fits before the SIGKILL


def test_systemd_analyze_verifies_the_unit_without_complaints(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("needs systemd-analyze to check the unit's directives")
    soundfleet = Path(sys.executable).parent / "soundfleet"
    assert soundfleet.exists(), f"{soundfleet} missing: is the project installed in this venv?"
    binary = _exec_start()[0]
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(f"ExecStart={binary} ", f"ExecStart={soundfleet} ", 1))
    assert str(soundfleet) in unit.read_text()
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    complaints = [line for line in result.stderr.splitlines()
                  if any(word in line for word in ("Unknown", "ignoring", "Failed", "Invalid", "not executable"))]
    assert complaints == []


def _collect_statuses(make_client, topic: str) -> list[wire.StatusMessage]:
    received: list[wire.StatusMessage] = []
    lock = threading.Lock()

    def on_message(client, userdata, message) -> None:
        if message.payload:
            with lock:
                received.append(wire.StatusMessage.from_bytes(bytes(message.payload)))

    client = make_client(on_message=on_message)
    client.subscribe(topic, qos=1)
    time.sleep(0.3)  # SUBACK before anything is published
    return received


def _wait(predicate, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert predicate()


def test_agent_keeps_its_state_in_systemds_state_directory(mqtt_url, clear_retained, tmp_path):
    device = f"statedir-{uuid.uuid4().hex[:6]}"
    clear_retained(wire.status_topic(SITE, device))
    state_directory = tmp_path / "var-lib-soundfleet-edge"
    env = {**AGENT_ENV, "STATE_DIRECTORY": str(state_directory), "XDG_STATE_HOME": str(tmp_path / "xdg"),
           "HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-m", "soundfleet.cli", "edge", "run", "--site", SITE,
                             "--device", device, "--broker", mqtt_url, "--source", str(FIXTURE), "--no-realtime",
                             "--no-follow-models"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (state_directory / f"{SITE}.{device}" / "spool").is_dir()
    # not the fallbacks ($HOME gets onnxruntime's ~/.cache, which is not ours)
    assert not (tmp_path / "xdg").exists() and not (tmp_path / "home" / ".local").exists()


def test_sigterm_stops_the_agent_with_exit_130_after_a_retained_offline(mqtt_url, mqtt_client_factory,
                                                                        clear_retained, tmp_path):
    device = f"sigterm-{uuid.uuid4().hex[:6]}"
    topic = wire.status_topic(SITE, device)
    clear_retained(topic)
    statuses = _collect_statuses(mqtt_client_factory, topic)
    agent = subprocess.Popen([sys.executable, "-m", "soundfleet.cli", "edge", "run", "--site", SITE,
                              "--device", device, "--broker", mqtt_url, "--state-dir", str(tmp_path),
                              "--source", "synthetic", "--realtime", "--no-follow-models"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=AGENT_ENV)
    try:
        _wait(lambda: len(statuses) >= 1, 30)
        assert statuses[0].state == "online"
        time.sleep(1.0)  # mid-stream: encoding, sleeping for real time, sending
        sigterm_ns = time.time_ns()
        agent.send_signal(signal.SIGTERM)
        _, stderr = agent.communicate(timeout=5)
    finally:
        agent.kill()
    assert agent.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    _wait(lambda: statuses[-1].state == "offline", 5)
    # the agent's own "offline", not the last will (a will has t_ns 0: the broker sends it later)
    assert statuses[-1].t_ns >= sigterm_ns

    late = _collect_statuses(mqtt_client_factory, topic)
    _wait(lambda: len(late) >= 1, 5)
    assert late[0].state == "offline" and late[0].t_ns >= sigterm_ns  # retained
