"""The edge agent installs from the edge lock alone and runs: no torch, no ray.

Builds a fresh virtual environment the way a device is installed, from the
edge lock (`scripts/deps.py install edge`: requirements/edge.txt, then this
checkout without dependencies), and streams a WAV through the real broker from
there. Then adds the test tools from the edge-test lock (no torch, ray, redis
or amqtt) and runs the agent's own tests in that environment, against this
session's broker.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from shared_models import wire

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "siren_street.wav"
HEAVY_MODULES = ("torch", "torchaudio", "ray", "redis", "amqtt")  # the cloud's, never the edge's
EDGE_TESTS = [  # the tests of edge code that need nothing beyond the edge extra
    "tests/test_edge_isolation.py",
    "tests/test_edge_sources.py",
    "tests/test_resample.py",
    "tests/test_spool.py",
    "tests/test_wire.py",
    "tests/test_wire_messages.py",
    "tests/test_model_update.py",
    "tests/test_edge_agent.py",
    "tests/test_poison.py",
]
# test_edge_delivery.py (the same modules as test_edge_agent.py, under broker outages and
# stalled sockets) runs in the main environment only: ~50 s of waiting out outages, twice,
# would buy no import the agent tests do not make
INNER_TIMEOUT_S = 300
PROGRESS_LINE = re.compile(r"[.sxXFE]+\s+\[\s*\d+%\]$")  # -q's dots, left out of the summary


@pytest.fixture(scope="module")
def edge_venv(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("edge-venv")
    install_lock(venv, "edge")
    return venv


def install_lock(venv: Path, name: str) -> None:
    """What a device runs: requirements/<name>.txt by hash, then soundfleet itself (a copy)."""
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "deps.py"), "install", name, "--venv", str(venv)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def edge_env(venv: Path, **extra: str) -> dict[str, str]:
    """This environment without what would lead the venv's python to other packages or pytest options."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV") and not k.startswith("PYTEST_")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # leave no caches in the checkout
    return {**env, **extra}


def importable(venv: Path, modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` the venv's python finds, run from the repo as the edge tests are."""
    code = ("import importlib.util, sys\n"
            "print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m)))")
    result = subprocess.run([str(venv / "bin" / "python"), "-c", code, *modules], capture_output=True,
                            text=True, cwd=REPO, env=edge_env(venv), check=True)
    return result.stdout.split()


@pytest.mark.slow
def test_edge_extra_brings_no_cloud_packages(edge_venv):
    assert importable(edge_venv, HEAVY_MODULES) == [], "importable in the edge-only environment"


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


@pytest.mark.slow
def test_edge_tests_pass_with_only_the_edge_extra(edge_venv, mqtt_url, capsys):
    python = str(edge_venv / "bin" / "python")
    install_lock(edge_venv, "edge-test")
    assert importable(edge_venv, HEAVY_MODULES) == [], "the test tools brought in cloud packages"

    # pyproject's asyncio_* options belong to pytest-asyncio, which no edge test needs.
    command = [python, "-m", "pytest", "-p", "no:cacheprovider", "-q",
               "-W", "ignore::pytest.PytestConfigWarning", *EDGE_TESTS]
    env = edge_env(edge_venv, SOUNDFLEET_TEST_MQTT_URL=mqtt_url)  # the broker of this session
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=INNER_TIMEOUT_S)
    output = result.stdout + result.stderr
    summary = [line for line in output.splitlines() if not PROGRESS_LINE.match(line)][-8:]
    with capsys.disabled():  # the inner summary belongs in the CI log, pass or fail
        print("\nedge tests in the edge-only environment:\n" + "\n".join(summary))
    assert result.returncode == 0, output[-6000:]

