"""The edge agent installs and runs with only the `edge` extra: no torch, no ray.

Builds a fresh virtual environment, installs `soundfleet[edge]` into it from
this checkout, and streams a WAV through the real broker from there.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from shared_models import wire

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "siren_street.wav"


@pytest.fixture(scope="module")
def edge_venv(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("edge-venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    result = subprocess.run([*pip, f"{REPO}[edge]"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return venv


@pytest.mark.slow
def test_edge_extra_has_no_torch_or_ray(edge_venv):
    for module in ("torch", "ray", "torchaudio"):
        result = subprocess.run([str(edge_venv / "bin" / "python"), "-c", f"import {module}"], capture_output=True)
        assert result.returncode != 0, f"{module} is importable in the edge-only environment"


@pytest.mark.slow
def test_edge_only_agent_streams_a_wav_to_the_real_broker(edge_venv, mqtt_url, mqtt_client_factory, tmp_path,
                                                         clear_retained):
    device = f"edgeonly-{uuid.uuid4().hex[:6]}"
    clear_retained(wire.status_topic("edgeonly", device))
    received: list[bytes] = []
    subscriber = mqtt_client_factory(on_message=lambda c, u, msg: received.append(bytes(msg.payload)))
    subscriber.subscribe(wire.frames_topic("edgeonly", device), qos=1)[0]
    import time

    time.sleep(0.3)  # let the SUBACK land before the agent publishes
    result = subprocess.run(
        [str(edge_venv / "bin" / "soundfleet"), "edge", "run", "--source", str(FIXTURE), "--site", "edgeonly",
         "--device", device, "--broker", mqtt_url, "--no-realtime", "--state-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,  # not the repo: use the installed package
    )
    assert result.returncode == 0, result.stderr[-3000:]
    deadline = time.monotonic() + 10
    while len(received) < 8 and time.monotonic() < deadline:
        time.sleep(0.1)
    messages = [wire.FramesMessage.from_bytes(p) for p in received]
    assert [m.seq for m in messages] == list(range(8))
    assert all(m.frame_count == 40 for m in messages)
    assert len({int(m.codes.max()) for m in messages}) > 1  # real codes, not a constant
