"""`soundfleet fleet simulate`: virtual devices speak the real wire format over the real broker.

A subscriber on the session's broker checks what arrives: every device's messages with seq
0..k and no gap, valid payloads (CRC) of the bundle's codebook, capture timestamps that
advance one second per message, real-time pacing spread over the second, retained statuses
that end cleared, and a burst that flushes its backlog faster than real time."""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict

import pytest

from shared_models.constants import FRAMES_PER_SECOND, NS_PER_SECOND
from shared_models.wire import FramesMessage, StatusMessage, parse_device_topic
from soundfleet.fleet import FleetSettings, Tracks, device_name, encode_tracks, simulate_fleet

DEVICES = 20
SECONDS = 3


@pytest.fixture(scope="module")
def tracks() -> Tracks:
    return encode_tracks(n_tracks=2, seconds=10.0)


class Received:
    """Every message under one site, with its arrival time (unix ns)."""

    def __init__(self) -> None:
        self.frames: dict[str, list[tuple[FramesMessage, int]]] = defaultdict(list)
        self.status: dict[str, list[bytes]] = defaultdict(list)
        self.lock = threading.Lock()

    def on_message(self, _client, _userdata, msg) -> None:
        now = time.time_ns()
        _, device, kind = parse_device_topic(msg.topic)
        with self.lock:
            if kind == "frames":
                self.frames[device].append((FramesMessage.from_bytes(msg.payload), now))  # checks CRC
            elif kind == "status":
                self.status[device].append(bytes(msg.payload))

    def count(self) -> int:
        with self.lock:
            return sum(map(len, self.frames.values()))


@pytest.fixture
def listen(mqtt_client_factory):
    """Subscribe to every topic of a fresh site before the fleet starts; returns (site, Received)."""

    def start() -> tuple[str, Received]:
        site, received, subscribed = f"tfleet-{uuid.uuid4().hex[:8]}", Received(), threading.Event()
        client = mqtt_client_factory(on_message=received.on_message)
        client.on_subscribe = lambda *a: subscribed.set()
        client.subscribe(f"soundfleet/v1/{site}/+/+", qos=1)
        assert subscribed.wait(5)
        return site, received

    return start


def _run(mqtt_url: str, site: str, tracks: Tracks, **kwargs) -> dict:
    settings = FleetSettings(devices=DEVICES, seconds=SECONDS, site=site, broker_url=mqtt_url,
                             processes=2, progress_s=1.0, **kwargs)
    return simulate_fleet(settings, tracks)


def _wait_for(received: Received, n: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while received.count() < n and time.monotonic() < deadline:
        time.sleep(0.05)
    assert received.count() == n


def _check_streams(received: Received, tracks: Tracks, messages: int) -> None:
    """Each device: seq 0..messages-1 in order, 40 codes in range, one second per message."""
    assert sorted(received.frames) == [device_name("sim", k) for k in range(DEVICES)]
    for device, got in received.frames.items():
        assert [m.seq for m, _ in got] == list(range(messages)), device
        for m, _ in got:
            assert m.codebook_id == tracks.codebook_id
            assert m.frame_count == FRAMES_PER_SECOND and m.silent is None
            assert int(m.codes.max()) < tracks.codebook_size
            assert m.t_start_ns == got[0][0].t_start_ns + m.seq * NS_PER_SECOND
            assert m.t_end_ns - m.t_start_ns == NS_PER_SECOND


def _check_status_cleared(received: Received) -> None:
    for k in range(DEVICES):
        online, offline, cleared = received.status[device_name("sim", k)]
        assert StatusMessage.from_bytes(online).state == "online"
        assert StatusMessage.from_bytes(offline).state == "offline"
        assert cleared == b""  # the retained status is deleted: nothing left on the broker


def test_not_in_real_time_every_device_sends_contiguous_valid_frames_captured_in_the_past(
    mqtt_url, listen, tracks
):
    site, received = listen()
    summary = _run(mqtt_url, site, tracks, realtime=False)
    _wait_for(received, DEVICES * SECONDS)
    _check_streams(received, tracks, SECONDS)
    _check_status_cleared(received)
    for got in received.frames.values():
        for m, arrived_ns in got:
            assert m.t_end_ns <= arrived_ns  # a backlog: captured before it was sent
            assert arrived_ns - m.t_start_ns < (SECONDS + 5) * NS_PER_SECOND  # and recently
    assert summary["devices"] == DEVICES and summary["realtime"] is False
    assert summary["messages_sent"] == summary["messages_acked"] == DEVICES * SECONDS
    assert summary["frames_sent"] == DEVICES * SECONDS * FRAMES_PER_SECOND
    assert summary["last_seq"] == {device_name("sim", k): SECONDS - 1 for k in range(DEVICES)}
    assert summary["codebook_id"] == tracks.codebook_id and summary["errors"] == []


def test_in_real_time_each_message_leaves_when_its_last_sample_is_captured_spread_over_the_second(
    mqtt_url, listen, tracks
):
    site, received = listen()
    t0 = time.monotonic()
    summary = _run(mqtt_url, site, tracks, realtime=True)
    elapsed = time.monotonic() - t0
    _wait_for(received, DEVICES * SECONDS)
    _check_streams(received, tracks, SECONDS)
    _check_status_cleared(received)
    assert SECONDS <= elapsed < SECONDS + 15
    for got in received.frames.values():
        for m, arrived_ns in got:
            assert -5_000_000 <= arrived_ns - m.t_end_ns < 500_000_000  # sent at t_end_ns (+- clock)
    # device k of N starts k/N s after device 0: the fleet is spread over each second
    first = {d: got[0][0].t_start_ns for d, got in received.frames.items()}
    origin = first[device_name("sim", 0)]
    assert origin == summary["started_ns"]
    for k in range(DEVICES):
        assert first[device_name("sim", k)] - origin == k * NS_PER_SECOND // DEVICES
    assert summary["send_lateness_ms"]["p50"] < 50


def test_burst_flushes_the_backlog_of_an_outage_faster_than_real_time(mqtt_url, listen, tracks):
    site, received = listen()
    burst = 3
    summary = _run(mqtt_url, site, tracks, realtime=True, burst_s=burst)
    _wait_for(received, DEVICES * (SECONDS + burst))
    _check_streams(received, tracks, SECONDS + burst)
    backlog = [(m, arrived) for got in received.frames.values() for m, arrived in got if m.seq >= SECONDS]
    assert len(backlog) == DEVICES * burst
    assert all(m.t_end_ns <= arrived for m, arrived in backlog)  # captured during the outage
    spread_s = (max(a for _, a in backlog) - min(a for _, a in backlog)) / NS_PER_SECOND
    assert spread_s < burst / 2  # in real time it would take `burst` seconds
    assert summary["burst"]["messages"] == DEVICES * burst
    assert summary["burst"]["speed_x_realtime"] > 2
    assert summary["messages_sent"] == summary["messages_acked"] == DEVICES * (SECONDS + burst)
