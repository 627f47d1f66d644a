"""Edge agent behaviour on the real broker: status, last will, sequence numbers, bad input."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from edge.encoder import EdgeEncoder
from edge.spool import Spool
from shared_models import bundle, wire
from soundfleet.services import free_port

FIXTURE = Path(__file__).parent / "fixtures" / "quiet_room.wav"


def _agent_cmd(mqtt_url: str, device: str, state_dir: Path, *extra: str) -> list[str]:
    _DEVICES.append(device)
    return [sys.executable, "-m", "soundfleet.cli", "edge", "run", "--site", "agenttest", "--device", device,
            "--broker", mqtt_url, "--state-dir", str(state_dir), *extra]


@pytest.fixture(autouse=True)
def _clear_statuses(clear_retained):
    """Every agent here leaves a retained status; remove them from the shared broker afterwards."""
    yield
    for device in _DEVICES:
        clear_retained(wire.status_topic("agenttest", device))
    _DEVICES.clear()


_DEVICES: list[str] = []


def _collect(mqtt_client_factory, topic: str) -> list:
    received: list = []
    client = mqtt_client_factory(on_message=lambda c, u, msg: received.append(msg))
    client.subscribe(topic, qos=1)
    time.sleep(0.3)  # SUBACK before anything is published
    return received


def _wait(predicate, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert predicate()


def test_sequence_numbers_continue_across_restarts(mqtt_url, mqtt_client_factory, tmp_path):
    device = f"seq-{uuid.uuid4().hex[:6]}"
    frames = _collect(mqtt_client_factory, wire.frames_topic("agenttest", device))
    for _ in range(2):
        result = subprocess.run(_agent_cmd(mqtt_url, device, tmp_path, "--source", str(FIXTURE), "--no-realtime"),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    _wait(lambda: len(frames) == 8)
    assert [wire.FramesMessage.from_bytes(m.payload).seq for m in frames] == list(range(8))
    spool = Spool(tmp_path / f"agenttest.{device}" / "spool")
    assert spool.stats().next_seq == 8 and spool.stats().depth == 0  # all acked, the next seq kept
    spool.close()


def test_status_is_retained_online_then_offline_on_clean_stop(mqtt_url, mqtt_client_factory, tmp_path):
    device = f"status-{uuid.uuid4().hex[:6]}"
    statuses = _collect(mqtt_client_factory, wire.status_topic("agenttest", device))
    result = subprocess.run(_agent_cmd(mqtt_url, device, tmp_path, "--source", str(FIXTURE), "--no-realtime"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    _wait(lambda: len(statuses) >= 2)
    states = [wire.StatusMessage.from_bytes(m.payload).state for m in statuses]
    assert states[:2] == ["online", "offline"]
    # a late subscriber gets the retained offline status
    late = _collect(mqtt_client_factory, wire.status_topic("agenttest", device))
    _wait(lambda: len(late) == 1)
    assert late[0].retain and wire.StatusMessage.from_bytes(late[0].payload).state == "offline"


def test_killed_agent_is_reported_offline_by_its_last_will(mqtt_url, mqtt_client_factory, tmp_path):
    device = f"will-{uuid.uuid4().hex[:6]}"
    statuses = _collect(mqtt_client_factory, wire.status_topic("agenttest", device))
    agent = subprocess.Popen(_agent_cmd(mqtt_url, device, tmp_path, "--source", "synthetic", "--realtime"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: len(statuses) >= 1, 30)
        assert wire.StatusMessage.from_bytes(statuses[0].payload).state == "online"
        agent.send_signal(signal.SIGKILL)  # no clean DISCONNECT: the broker must publish the will
        agent.wait(10)
        _wait(lambda: len(statuses) >= 2, 30)  # keepalive 30 s is not needed: the socket closes at once
        offline = wire.StatusMessage.from_bytes(statuses[-1].payload)
        assert offline.state == "offline"
    finally:
        agent.kill()


def test_dead_broker_spools_and_says_so_without_a_traceback(tmp_path):
    closed = f"mqtt://127.0.0.1:{free_port()}"
    result = subprocess.run(_agent_cmd(closed, "dead", tmp_path, "--source", str(FIXTURE), "--no-realtime",
                                       "--drain-timeout-s", "2"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr  # finished reading; frames wait in the spool
    assert "cannot reach MQTT broker" in result.stderr and "spooling to disk" in result.stderr
    assert "4 messages not yet acknowledged" in result.stderr and "Traceback" not in result.stderr
    spool = Spool(tmp_path / "agenttest.dead" / "spool")
    assert spool.stats().depth == 4  # quiet_room.wav: 4 s, one message per second
    spool.close()


def test_missing_audio_file_is_a_clear_error(mqtt_url, tmp_path):
    result = subprocess.run(_agent_cmd(mqtt_url, "nofile", tmp_path, "--source", str(tmp_path / "nope.wav")),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "audio file not found" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("tamper", ["corrupt_onnx", "wrong_codebook_in_manifest"])
def test_agent_refuses_a_model_that_does_not_match_its_bundle(tmp_path, tamper):
    target = tmp_path / "bundle"
    shutil.copytree(bundle.default_bundle_dir(), target)
    if tamper == "corrupt_onnx":
        data = bytearray((target / bundle.EDGE_MODEL).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (target / bundle.EDGE_MODEL).write_bytes(bytes(data))
        match = "sha256"
    else:
        manifest = json.loads((target / bundle.MANIFEST).read_text())
        manifest["codebook_id"] += 1
        (target / bundle.MANIFEST).write_text(json.dumps(manifest))
        match = "codebook_id differs"
    with pytest.raises(bundle.BundleError, match=match):
        EdgeEncoder(target)
