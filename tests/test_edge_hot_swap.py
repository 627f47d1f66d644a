"""Model rollout on the real broker: a streaming agent follows the retained announcement.

The second model is the shipped one re-exported with its codebook rows reversed:
a different codebook id, and for the same audio every code becomes K-1-code. So
the test can tell, frame by frame, which model encoded what it received.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from edge.encoder import EdgeEncoder
from edge.model_update import (
    announcement_for,
    clear_announcement,
    installed_name,
    pack_edge_archive,
    publish_announcement,
    read_current,
)
from edge.sources import file_source
from shared_models import bundle, wire
from shared_models.constants import PATCH_SAMPLES

SITE = "swaptest"
FIXTURE = Path(__file__).parent / "fixtures" / "siren_street.wav"  # 8 s
FRAMES_PER_MESSAGE = 8  # 0.2 s per message at real time: 40 messages


@pytest.fixture(scope="module")
def reversed_bundle(tmp_path_factory) -> Path:
    """The shipped model with its codebook reversed, exported by the training code's own exporter."""
    torch = pytest.importorskip("torch")
    from shared_models.codebook import EdgeEncoder as TorchEncoder
    from shared_models.codebook import codebook_id
    from shared_models.frontends import build_front_end
    from training.export import write_bundle

    src = bundle.default_bundle_dir()
    manifest = bundle.load_manifest(src)
    state = torch.load(src / bundle.CLOUD_WEIGHTS, weights_only=True)
    front_end = build_front_end(manifest.get("frontend", "dense"), manifest["frontend_config"])
    front_end.load_state_dict(state["frontend"])
    centroids = np.load(src / bundle.CODEBOOK)[::-1].copy()
    out = tmp_path_factory.mktemp("reversed")
    write_bundle(out, TorchEncoder(front_end.eval(), torch.from_numpy(centroids)), centroids, state,
                 {**manifest, "codebook_id": codebook_id(centroids), "model_version": manifest["model_version"] + "-rev"})
    return out


@pytest.fixture
def announcer(mqtt_client_factory):
    """Publishes retained announcements on the shared broker and clears them afterwards."""
    client = mqtt_client_factory()
    yield lambda announcement: publish_announcement(client, announcement)
    clear_announcement(client)


def _subscribe(mqtt_client_factory, device: str) -> tuple[list[bytes], list[bytes]]:
    frames: list[bytes] = []
    statuses: list[bytes] = []
    lock = threading.Lock()

    def on_message(client, userdata, message):
        with lock:
            (frames if message.topic.endswith("/frames") else statuses).append(bytes(message.payload))

    client = mqtt_client_factory(on_message=on_message)
    client.subscribe([(wire.frames_topic(SITE, device), 1), (wire.status_topic(SITE, device), 1)])
    time.sleep(0.3)
    return frames, statuses


def _start_agent(mqtt_url: str, device: str, state_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "soundfleet.cli", "edge", "run", "--site", SITE, "--device", device,
         "--broker", mqtt_url, "--state-dir", str(state_dir), "--frames-per-message", str(FRAMES_PER_MESSAGE),
         "--heartbeat-s", "1", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def _wait(predicate, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert predicate()


def _fixture_codes(bundle_dir: Path) -> np.ndarray:
    audio = np.concatenate(list(file_source(str(FIXTURE), 16000)))
    return EdgeEncoder(bundle_dir).encode(audio[: len(audio) // PATCH_SAMPLES * PATCH_SAMPLES]
                                          .reshape(-1, PATCH_SAMPLES)).codes  # (frames,)


@pytest.mark.slow
def test_announced_model_is_swapped_in_between_frames_with_none_lost(
    reversed_bundle, announcer, mqtt_url, mqtt_client_factory, tmp_path, clear_retained
):
    device = f"swap-{uuid.uuid4().hex[:6]}"
    clear_retained(wire.status_topic(SITE, device))
    old, new = EdgeEncoder(), EdgeEncoder(reversed_bundle)
    archive = tmp_path / "edge.tar"
    pack_edge_archive(reversed_bundle, archive)
    announcement = announcement_for(reversed_bundle, archive)
    frames, statuses = _subscribe(mqtt_client_factory, device)

    agent = _start_agent(mqtt_url, device, tmp_path / "state", "--source", str(FIXTURE), "--realtime")
    try:
        _wait(lambda: len(frames) >= 8, 30)  # streaming on the old model
        announcer(announcement)
        _, stderr = agent.communicate(timeout=60)
    finally:
        agent.kill()
    assert agent.returncode == 0, stderr[-3000:]

    messages = [wire.FramesMessage.from_bytes(p) for p in frames]
    assert [m.seq for m in messages] == list(range(40)), "frames lost, repeated or reordered across the swap"
    ids = [m.codebook_id for m in messages]
    swap_at = ids.index(new.codebook_id)
    assert 8 <= swap_at < 40 and ids == [old.codebook_id] * swap_at + [new.codebook_id] * (40 - swap_at)
    # every frame was encoded by the model its codebook id names
    expected = {old.codebook_id: _fixture_codes(bundle.default_bundle_dir()),
                new.codebook_id: _fixture_codes(reversed_bundle)}
    for m in messages:
        start = m.seq * FRAMES_PER_MESSAGE
        np.testing.assert_array_equal(m.codes, expected[m.codebook_id][start : start + m.frame_count])
    online = [wire.StatusMessage.from_bytes(p) for p in statuses]
    assert any(s.model_version == announcement.model_version and s.codebook_id == new.codebook_id
               and s.model_error == "" for s in online if s.state == "online")
    installed = tmp_path / "state" / f"{SITE}.{device}" / "models" / installed_name(announcement)
    assert read_current(tmp_path / "state" / f"{SITE}.{device}") == installed

    # a restart keeps the rolled-out model, even with no announcement on the broker
    announcer_client = mqtt_client_factory()
    clear_announcement(announcer_client)
    frames.clear()
    result = subprocess.run(
        [sys.executable, "-m", "soundfleet.cli", "edge", "run", "--site", SITE, "--device", device, "--broker",
         mqtt_url, "--state-dir", str(tmp_path / "state"), "--source", str(FIXTURE), "--no-realtime",
         "--max-seconds", "1", "--frames-per-message", str(FRAMES_PER_MESSAGE)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    _wait(lambda: len(frames) >= 5, 10)
    assert {wire.FramesMessage.from_bytes(p).codebook_id for p in frames} == {new.codebook_id}


@pytest.mark.slow
def test_model_with_bad_sha256_is_refused_and_the_old_model_keeps_running(
    reversed_bundle, announcer, mqtt_url, mqtt_client_factory, tmp_path, clear_retained
):
    device = f"badsha-{uuid.uuid4().hex[:6]}"
    clear_retained(wire.status_topic(SITE, device))
    old = EdgeEncoder()
    archive = tmp_path / "edge.tar"
    pack_edge_archive(reversed_bundle, archive)
    good = announcement_for(reversed_bundle, archive)
    bad = dataclasses.replace(good, sha256="0" * 64)
    frames, statuses = _subscribe(mqtt_client_factory, device)

    agent = _start_agent(mqtt_url, device, tmp_path / "state", "--source", str(FIXTURE), "--realtime")
    try:
        _wait(lambda: len(frames) >= 8, 30)
        announcer(bad)
        _, stderr = agent.communicate(timeout=60)
    finally:
        agent.kill()
    assert agent.returncode == 0, stderr[-3000:]
    assert "refused model" in stderr and "sha256" in stderr and "Traceback" not in stderr

    messages = [wire.FramesMessage.from_bytes(p) for p in frames]
    assert [m.seq for m in messages] == list(range(40))
    assert {m.codebook_id for m in messages} == {old.codebook_id}
    refusals = [wire.StatusMessage.from_bytes(p) for p in statuses]
    assert any("sha256" in s.model_error and s.model_version == old.model_version for s in refusals)
    models = tmp_path / "state" / f"{SITE}.{device}" / "models"
    assert not models.exists() or not [p for p in models.iterdir() if not p.name.startswith(".")]
    assert read_current(tmp_path / "state" / f"{SITE}.{device}") is None


def test_a_hostile_retained_announcement_is_refused_and_frames_keep_flowing(
    mqtt_url, mqtt_client_factory, tmp_path, clear_retained
):
    """A JSON nested past the recursion limit, retained on the models topic: before, the agent's
    network thread died on it (on every agent, at every restart) while the link said connected."""
    device = f"hostile-{uuid.uuid4().hex[:6]}"
    clear_retained(wire.status_topic(SITE, device))
    publisher = mqtt_client_factory()
    hostile = b'{"model_version":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    publisher.publish(wire.MODELS_EDGE_TOPIC, hostile, qos=1, retain=True).wait_for_publish(5)
    try:
        frames, statuses = _subscribe(mqtt_client_factory, device)
        agent = _start_agent(mqtt_url, device, tmp_path / "state", "--source", str(FIXTURE))
        try:
            _, stderr = agent.communicate(timeout=60)
        finally:
            agent.kill()
    finally:
        clear_announcement(publisher)
    assert agent.returncode == 0, stderr[-3000:]
    assert "malformed model announcement" in stderr and "Traceback" not in stderr
    _wait(lambda: len(frames) == 40, 10)
    assert [wire.FramesMessage.from_bytes(p).seq for p in frames] == list(range(40))
    last = wire.StatusMessage.from_bytes(statuses[-1])
    assert "nested too deeply" in last.model_error or any(
        "nested too deeply" in wire.StatusMessage.from_bytes(p).model_error for p in statuses)
