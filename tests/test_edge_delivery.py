"""No frame lost, none repeated, none out of order: the agent across a broker outage and a SIGKILL.

The outage test owns its Mosquitto (a `mosquitto` process on a free port with
persistence on, so the subscriber's session and queue survive the restart):
it stops it for 30 s while an agent streams, then starts it again. The SIGKILL
test needs no broker while the agent is offline and the session's broker after.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho_client
import pytest

from edge.link import BrokerLink, LinkSettings
from shared_models import wire
from soundfleet.services import free_port

SITE = "delivery"
FRAMES_PER_MESSAGE = 8  # 0.2 s per message: many messages in a short test
OUTAGE_S = 30.0


class Collector:
    """A persistent-session subscriber (clean_session=False, QoS 1): keeps its queue on the broker
    while either side is away, so what it receives is what the broker accepted."""

    def __init__(self, make_client, url: str, topic: str):
        self.payloads: list[bytes] = []
        self.redelivered = 0
        self.lock = threading.Lock()
        self.client = make_client(f"collector-{uuid.uuid4().hex[:8]}", url=url, clean_session=False,
                                  on_message=self._on_message)
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.client.subscribe(topic, qos=1)
        time.sleep(0.3)  # SUBACK before anything is published

    def _on_message(self, client, userdata, message) -> None:
        with self.lock:
            if message.dup and bytes(message.payload) in self.payloads:
                # the broker re-delivering to *this subscriber* what it sent just before its own
                # shutdown (QoS 1 between broker and subscriber); a frame the agent sent twice
                # would arrive as a new delivery without the DUP flag and still be caught
                self.redelivered += 1
                return
            self.payloads.append(bytes(message.payload))

    def seqs(self) -> list[int]:
        with self.lock:
            return [wire.FramesMessage.from_bytes(p).seq for p in self.payloads]

    def wait_for(self, count: int, timeout_s: float) -> list[int]:
        deadline = time.monotonic() + timeout_s
        while len(self.seqs()) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # anything more (a duplicate) would arrive now
        return self.seqs()


def _agent(url: str, device: str, state_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "soundfleet.cli", "edge", "run", "--site", SITE, "--device", device,
            "--broker", url, "--state-dir", str(state_dir), "--frames-per-message", str(FRAMES_PER_MESSAGE),
            "--no-follow-models", *extra]


# quick reconnects so the test does not wait out a 60 s backoff ceiling
AGENT_ENV = {**os.environ, "SOUNDFLEET_EDGE__RECONNECT_MAX_S": "2"}


@pytest.mark.slow
def test_broker_away_30s_every_frame_arrives_once_in_order(own_mosquitto, mqtt_client_factory, tmp_path):
    device = f"outage-{uuid.uuid4().hex[:6]}"
    collector = Collector(mqtt_client_factory, own_mosquitto.url, wire.frames_topic(SITE, device))
    seconds = 40.0
    expected = int(seconds * 40) // FRAMES_PER_MESSAGE  # 200 messages of 0.2 s
    agent = subprocess.Popen(
        _agent(own_mosquitto.url, device, tmp_path / "state", "--source", "synthetic", "--realtime",
               "--max-seconds", str(seconds), "--drain-timeout-s", "60"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=AGENT_ENV,
    )
    try:
        assert len(collector.wait_for(10, 30)) >= 10, "the agent never got going"
        own_mosquitto.stop()
        during = len(collector.seqs())
        time.sleep(OUTAGE_S)
        own_mosquitto.start()
        _, stderr = agent.communicate(timeout=120)
    finally:
        agent.kill()
    assert agent.returncode == 0, stderr[-3000:]
    assert "spooling to disk" in stderr  # the outage was noticed and ridden out
    seqs = collector.wait_for(expected, 30)
    assert during < expected - 100  # at least 30 s of the stream happened while the broker was away
    assert seqs == list(range(expected)), f"lost {sorted(set(range(expected)) - set(seqs))[:10]}, " \
                                          f"{len(seqs) - len(set(seqs))} duplicated"


@pytest.mark.slow
def test_sigkilled_offline_agent_sends_its_spool_after_restart(mqtt_url, mqtt_client_factory, tmp_path,
                                                               clear_retained):
    device = f"sigkill-{uuid.uuid4().hex[:6]}"
    clear_retained(wire.status_topic(SITE, device))
    state = tmp_path / "state"
    dead = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens: the agent is offline from the start
    agent = subprocess.Popen(_agent(dead, device, state, "--source", "synthetic", "--realtime"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=AGENT_ENV)
    spool = state / f"{SITE}.{device}" / "spool"
    try:
        deadline = time.monotonic() + 30
        while _spooled_bytes(spool) < 20 * 56 and time.monotonic() < deadline:  # >= 20 messages of 8 codes
            time.sleep(0.2)
        time.sleep(1.0)
        agent.send_signal(signal.SIGKILL)  # no clean stop: nothing flushed, no offline status
        agent.wait(10)
    finally:
        agent.kill()
    assert _spooled_bytes(spool) >= 20 * 56, "the offline agent spooled nothing"

    collector = Collector(mqtt_client_factory, mqtt_url, wire.frames_topic(SITE, device))
    result = subprocess.run(_agent(mqtt_url, device, state, "--source", "synthetic", "--no-realtime",
                                   "--max-seconds", "2"),
                            capture_output=True, text=True, timeout=120, env=AGENT_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    seqs = collector.wait_for(30, 20)
    new = 2 * 40 // FRAMES_PER_MESSAGE  # the restarted run's own 2 s
    assert len(seqs) >= 20 + new
    assert seqs == list(range(len(seqs))), "spooled frames lost, repeated or out of order"
    times = [wire.FramesMessage.from_bytes(p).t_start_ns for p in collector.payloads]
    assert times[-new] > times[-new - 1]  # the restarted run's frames come after the spooled ones


def test_link_keeps_publish_order_when_its_network_thread_stalls_mid_write(
        mqtt_url, mqtt_client_factory, clear_retained, monkeypatch):
    """Regression for the SIGKILL test's rare "at index 23 got seq 24" (23 arrived last).

    paho's ``publish`` used to write to the socket itself, in the sender's thread, while the
    link's network thread (paho's ``loop``) wrote too; each took packets off paho's one queue.
    When the network thread had taken seq k and was preempted before its ``send``, the sender
    sent k+1.. first. Here that preemption is made certain: paho's socket send stalls on seq 3
    until seqs 6..11 are published. A callback holding the network thread (a retained message on
    a subscribed topic) makes seqs 0..5 wait in paho's queue, so that thread, not the publishing
    one, is the one that takes seq 3. The broker is real; only the timing is forced."""
    topic = f"test/link-order/{uuid.uuid4().hex[:8]}"
    hold_topic = f"{topic}/hold"
    clear_retained(hold_topic)
    payloads = [wire.FramesMessage(codebook_id=1, seq=seq, t_start_ns=seq,
                                   codes=np.full(8, seq, dtype=np.uint16)).to_bytes() for seq in range(12)]
    stalled, go_on = threading.Event(), threading.Event()
    writers: dict[int, str] = {}  # seq -> the thread that wrote its PUBLISH to the socket
    sock_send = paho_client.Client._sock_send

    def slow_sock_send(client, buf):
        packet = bytes(buf)
        seq = next((i for i, p in enumerate(payloads) if packet.endswith(p)), None)
        if seq is not None:
            writers[seq] = threading.current_thread().name
        if seq == 3:
            stalled.set()
            go_on.wait(10)  # as if preempted between paho's popleft() and send()
        return sock_send(client, buf)

    monkeypatch.setattr(paho_client.Client, "_sock_send", slow_sock_send)
    in_callback, leave_callback = threading.Event(), threading.Event()

    def hold(_payload: bytes) -> None:  # runs on the link's network thread
        in_callback.set()
        leave_callback.wait(10)

    mqtt_client_factory().publish(hold_topic, b"hold", qos=1, retain=True).wait_for_publish(5)
    collector = Collector(mqtt_client_factory, mqtt_url, topic)
    acked: list[object] = []
    link = BrokerLink(LinkSettings(broker_url=mqtt_url, client_id=f"test-link-{uuid.uuid4().hex[:8]}"),
                      will=lambda: (f"{topic}/status", b"gone"), on_ack=acked.append,
                      subscriptions={hold_topic: hold})
    try:
        assert link.connect()
        assert in_callback.wait(10), "the retained message never reached the link's callback"
        for seq in range(6):
            assert link.publish(topic, payloads[seq], token=seq)
        leave_callback.set()
        assert stalled.wait(10), "seq 3 was never written"
        for seq in range(6, 12):
            assert link.publish(topic, payloads[seq], token=seq)
        go_on.set()
        seqs = collector.wait_for(12, 10)
    finally:
        leave_callback.set()
        go_on.set()
        link.close()
    assert seqs == list(range(12)), f"frames reordered on the wire: {seqs}"
    assert set(writers.values()) == {"mqtt-link"}, f"PUBLISH written by other threads: {writers}"
    assert sorted(acked) == list(range(12))


def _spooled_bytes(spool: Path) -> int:
    return sum(p.stat().st_size for p in spool.glob("*.seg")) if spool.is_dir() else 0
