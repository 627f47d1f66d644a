"""What the agent tells the cloud about itself (retained status heartbeats) and how it gates silence.

Heartbeats and the loudness gate run against the shared broker; the outage
test owns a Mosquitto (persistence on, so a persistent-session subscriber
keeps its queue across the broker's restart) that it stops and starts again.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from edge.agent import AGENT_VERSION
from edge.encoder import EdgeEncoder
from edge.sources import file_source
from shared_models import bundle, wire
from shared_models.constants import PATCH_SAMPLES

FIXTURE = Path(__file__).parent / "fixtures" / "quiet_room.wav"
FIXTURE_MESSAGES = 4  # 4 s, one 40-frame message per second
SITE = "statustest"
# quick reconnects, and no SOUNDFLEET_* from the caller's shell
AGENT_ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("SOUNDFLEET_")},
             "SOUNDFLEET_EDGE__RECONNECT_MAX_S": "2"}


def _agent_cmd(broker_url: str, device: str, state_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "soundfleet.cli", "edge", "run", "--site", SITE, "--device", device,
            "--broker", broker_url, "--state-dir", str(state_dir), "--no-follow-models", *extra]


class Collector:
    """Every message on one topic, in arrival order, with its retain flag."""

    def __init__(self, make_client, topic: str, **client_kwargs):
        self.messages: list[tuple[bytes, bool]] = []
        self._lock = threading.Lock()
        self.client = make_client(on_message=self._on_message, **client_kwargs)
        self.client.subscribe(topic, qos=1)
        time.sleep(0.3)  # SUBACK before anything is published

    def _on_message(self, client, userdata, message) -> None:
        with self._lock:
            self.messages.append((bytes(message.payload), bool(message.retain)))

    def statuses(self) -> list[wire.StatusMessage]:
        with self._lock:
            return [wire.StatusMessage.from_bytes(p) for p, _ in self.messages if p]

    def frames(self) -> list[wire.FramesMessage]:
        with self._lock:
            return [wire.FramesMessage.from_bytes(p) for p, _ in self.messages]

    def wait_until(self, predicate, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert predicate(), f"timed out; got {len(self.messages)} messages"


def _retained_status(make_client, topic: str) -> tuple[wire.StatusMessage, bool]:
    """What a subscriber arriving now gets: the retained status."""
    late = Collector(make_client, topic)
    late.wait_until(lambda: len(late.messages) >= 1, 10)
    payload, retained = late.messages[0]
    return wire.StatusMessage.from_bytes(payload), retained


def _manifest() -> dict:
    return json.loads((bundle.default_bundle_dir() / bundle.MANIFEST).read_text())


# --- heartbeat ----------------------------------------------------------------------------
def test_heartbeats_report_uptime_model_and_resources_then_offline(mqtt_url, mqtt_client_factory, clear_retained,
                                                                   tmp_path):
    device = f"hb-{uuid.uuid4().hex[:6]}"
    topic = wire.status_topic(SITE, device)
    clear_retained(topic)
    collector = Collector(mqtt_client_factory, topic)
    result = subprocess.run(_agent_cmd(mqtt_url, device, tmp_path, "--source", "synthetic", "--realtime",
                                       "--heartbeat-s", "1", "--max-seconds", "5"),
                            capture_output=True, text=True, timeout=60, env=AGENT_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    collector.wait_until(lambda: any(s.state == "offline" for s in collector.statuses()))

    statuses = collector.statuses()
    online = [s for s in statuses if s.state == "online"]
    assert len(online) >= 3, [s.state for s in statuses]
    uptimes = [s.uptime_s for s in online]
    gaps = np.diff(uptimes)
    assert (gaps >= 0.9).all(), f"uptime must grow by about --heartbeat-s per heartbeat: {uptimes}"
    manifest = _manifest()
    for status in online:
        assert status.agent_version == AGENT_VERSION
        assert status.model_version == manifest["model_version"]
        assert status.codebook_id == manifest["codebook_id"]
        assert 5 < status.rss_mb < 200, status.rss_mb
        assert status.cpu_percent >= 0 and status.spool_depth >= 0 and status.t_ns > 0
    assert any(s.cpu_percent > 0 for s in online), "encoding audio in real time used no CPU?"
    assert statuses[-1].state == "offline"

    retained, is_retained = _retained_status(mqtt_client_factory, topic)
    assert is_retained and retained.state == "offline" and retained.t_ns > 0  # the agent's own, not the will


def test_last_will_says_offline_with_unknown_time(mqtt_url, mqtt_client_factory, clear_retained, tmp_path):
    device = f"will-{uuid.uuid4().hex[:6]}"
    topic = wire.status_topic(SITE, device)
    clear_retained(topic)
    collector = Collector(mqtt_client_factory, topic)
    agent = subprocess.Popen(_agent_cmd(mqtt_url, device, tmp_path, "--source", "synthetic", "--realtime"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=AGENT_ENV)
    try:
        collector.wait_until(lambda: len(collector.statuses()) >= 1, 30)
        agent.send_signal(signal.SIGKILL)  # no clean stop: the broker publishes the will
        agent.wait(10)
    finally:
        agent.kill()
    collector.wait_until(lambda: collector.statuses()[-1].state == "offline")
    will = collector.statuses()[-1]
    # the will was registered at connect and fired later: it cannot know when (docs/WIRE.md)
    assert will.t_ns == 0 and will.uptime_s == 0
    assert will.codebook_id == _manifest()["codebook_id"]


# --- spool depth across a broker outage -----------------------------------------------------
OUTAGE_S = 5.0
FRAMES_PER_MESSAGE = 8  # 0.2 s per message: 25 messages spooled during the outage


def test_first_status_after_an_outage_reports_the_spooled_backlog(own_mosquitto, mqtt_client_factory, tmp_path):
    device = f"depth-{uuid.uuid4().hex[:6]}"
    collector = Collector(mqtt_client_factory, wire.status_topic(SITE, device), url=own_mosquitto.url,
                          client_id=f"status-{uuid.uuid4().hex[:8]}", clean_session=False)
    collector.client.reconnect_delay_set(min_delay=1, max_delay=2)
    agent = subprocess.Popen(
        _agent_cmd(own_mosquitto.url, device, tmp_path / "state", "--source", "synthetic", "--realtime",
                   "--max-seconds", "12", "--frames-per-message", str(FRAMES_PER_MESSAGE), "--heartbeat-s", "1"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=AGENT_ENV,
    )
    try:
        collector.wait_until(lambda: len(collector.statuses()) >= 2, 30)  # connected and heartbeating
        own_mosquitto.stop()
        time.sleep(OUTAGE_S)
        restarted_ns = time.time_ns()
        own_mosquitto.start()
        _, stderr = agent.communicate(timeout=60)
    finally:
        agent.kill()
    assert agent.returncode == 0, stderr[-3000:]
    assert "spooling to disk" in stderr
    collector.wait_until(lambda: any(s.state == "offline" and s.t_ns > restarted_ns for s in collector.statuses()),
                         20)

    after = [s for s in collector.statuses() if s.t_ns > restarted_ns]
    first = after[0]  # published on reconnect, before the backlog is sent
    assert first.state == "online"
    assert first.spool_depth >= OUTAGE_S * 40 / FRAMES_PER_MESSAGE / 2, first.spool_depth  # ~25 spooled
    assert after[-1].state == "offline" and after[-1].spool_depth == 0  # the backlog was delivered


# --- loudness gate ---------------------------------------------------------------------------
def _fixture_loudness() -> np.ndarray:
    audio = np.concatenate(list(file_source(str(FIXTURE), 16000)))
    return EdgeEncoder().encode(audio.reshape(-1, PATCH_SAMPLES)).loudness_dbfs  # (N,) dBFS


def _gate_between_frames(loudness: np.ndarray) -> float:
    """A gate near the median, in the widest gap between two frame levels there, so a frame is
    clearly on one side of it (the fixture is a quiet room: every frame is within a few dB)."""
    levels = np.unique(loudness)
    middle = levels[len(levels) // 3: 2 * len(levels) // 3 + 1]
    widest = int(np.argmax(np.diff(middle)))
    return round(float(middle[widest] + middle[widest + 1]) / 2, 4)


def test_loudness_gate_marks_quiet_frames_silent_and_keeps_the_others_codes(mqtt_url, mqtt_client_factory,
                                                                           clear_retained, tmp_path):
    loudness = _fixture_loudness()
    gate = _gate_between_frames(loudness)
    expected_silent = loudness < gate  # (160,)
    assert 0 < expected_silent.sum() < len(expected_silent)

    runs = {}
    for name, extra in (("gated", ["--gate-dbfs", str(gate)]), ("ungated", [])):
        device = f"gate-{name}-{uuid.uuid4().hex[:6]}"
        clear_retained(wire.status_topic(SITE, device))
        collector = Collector(mqtt_client_factory, wire.frames_topic(SITE, device))
        result = subprocess.run(_agent_cmd(mqtt_url, device, tmp_path / name, "--source", str(FIXTURE),
                                           "--no-realtime", *extra),
                                capture_output=True, text=True, timeout=60, env=AGENT_ENV)
        assert result.returncode == 0, result.stderr[-3000:]
        collector.wait_until(lambda c=collector: len(c.messages) >= FIXTURE_MESSAGES)
        runs[name] = collector

    gated, ungated = runs["gated"].frames(), runs["ungated"].frames()
    assert [m.seq for m in gated] == [m.seq for m in ungated] == list(range(FIXTURE_MESSAGES))
    silent = np.concatenate([m.silent if m.silent is not None else np.zeros(m.frame_count, bool) for m in gated])
    np.testing.assert_array_equal(silent, expected_silent)
    assert all(m.silent is None for m in ungated)
    gated_codes = np.concatenate([m.codes for m in gated])
    ungated_codes = np.concatenate([m.codes for m in ungated])
    np.testing.assert_array_equal(gated_codes[~silent], ungated_codes[~silent])
    assert (gated_codes[silent] == wire.SILENT_CODE).all()
    gated_bytes = sum(len(p) for p, _ in runs["gated"].messages)
    ungated_bytes = sum(len(p) for p, _ in runs["ungated"].messages)
    assert gated_bytes < ungated_bytes, (gated_bytes, ungated_bytes)


def test_dry_run_prints_gated_messages_and_touches_no_broker_and_no_state(tmp_path):
    loudness = _fixture_loudness()
    gate = _gate_between_frames(loudness)
    expected = (loudness < gate).reshape(FIXTURE_MESSAGES, -1).sum(axis=1)  # (messages,) silent frames each
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:  # a "broker" that only counts callers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        url = f"mqtt://127.0.0.1:{listener.getsockname()[1]}"
        result = subprocess.run(_agent_cmd(url, "dry", tmp_path / "state", "--source", str(FIXTURE), "--no-realtime",
                                           "--gate-dbfs", str(gate), "--dry-run"),
                                capture_output=True, text=True, timeout=60, env=AGENT_ENV)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["seq"] for line in lines] == list(range(FIXTURE_MESSAGES))
    assert [line["silent_frames"] for line in lines] == expected.tolist()
    assert all(line["topic"] == wire.frames_topic(SITE, "dry") for line in lines)
    assert not (tmp_path / "state").exists()  # no spool, no sequence numbers
