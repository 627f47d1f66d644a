"""Ray Train fault tolerance: a killed worker and a killed run both continue from checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from shared_models.constants import EVENT_LABELS
from shared_models.frontend import FrontEndConfig
from training import stages
from training.corpus import load_corpus, synthesize_corpus
from training.dataset import load_framed
from training.pipeline import _segments
from training.ray_stage import StageSpec, fit_stage


def _wait_for_checkpoint(stage_glob: str, root: Path, timeout_s: float = 180) -> None:
    """Wait until Ray Train has *registered* a checkpoint of a stage.

    A checkpoint directory appears before the controller (which polls the
    workers) registers it; the checkpoint manager's snapshot file is written
    only on registration, so that is what a restart can resume from.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if list(root.glob(f"{stage_glob}/checkpoint_manager_snapshot.json")):
            return
        time.sleep(0.1)
    raise AssertionError(f"no registered checkpoint for {stage_glob} under {root} within {timeout_s} s")


def _train_workers() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if cmdline.startswith("ray::RayTrainWorker"):
            found.append(proc)
    return found


@pytest.mark.slow
def test_killed_worker_costs_only_the_epochs_since_the_last_checkpoint(ray_session, tmp_path):
    data = tmp_path / "corpus"
    synthesize_corpus(data, minutes=0.5, seed=5, progress=False)
    segments, labels = _segments(load_framed(load_corpus(data), EVENT_LABELS))
    run_dir = tmp_path / "run"
    epochs = 8  # each report waits ~1-2 s for the Train controller, so the kill lands mid-stage
    killed: list[int] = []

    def kill_one_worker_after_first_checkpoint() -> None:
        _wait_for_checkpoint("frontend", run_dir)
        workers = _train_workers()
        assert len(workers) == 2
        workers[-1].send_signal(signal.SIGKILL)
        killed.append(workers[-1].pid)

    killer = threading.Thread(target=kill_one_worker_after_first_checkpoint, daemon=True)
    killer.start()
    import ray

    state = fit_stage(
        "frontend",
        stages.frontend_loop,
        {
            "spec": StageSpec("frontend", epochs, 1e-3, 8, seed=0),
            "model_config": FrontEndConfig(hidden_dim=32),
            "data_ref": ray.put({"segments": segments, "labels": labels}),
        },
        workers=2,
        storage_path=run_dir,
        max_failures=2,
    )
    killer.join(5)
    assert killed, "the worker was never killed"
    assert state["epoch"] == epochs
    first, restart = state["starts"]  # exactly one restart
    assert first == 0 and 0 < restart < epochs  # resumed from a checkpoint, not from scratch


@pytest.mark.slow
def test_resume_continues_a_killed_training_run_at_its_saved_epoch(tmp_path):
    data = tmp_path / "corpus"
    synthesize_corpus(data, minutes=0.5, seed=6, progress=False)
    out = tmp_path / "bundle"
    cmd = [sys.executable, "-m", "soundfleet.cli", "train", "--data", str(data), "--out", str(out),
           "--workers", "1", "--codebook-size", "16", "--log-level", "warning"]
    epochs = 30  # a report every ~0.2 s (conftest's Ray Train poll): the kill lands seconds before the stage ends
    env = {**os.environ, "SOUNDFLEET_TRAIN__FRONTEND_EPOCHS": str(epochs), "SOUNDFLEET_TRAIN__FRONTEND_HIDDEN": "32",
           "SOUNDFLEET_TRAIN__CODE_LM_EPOCHS": "1", "SOUNDFLEET_TRAIN__CLASSIFIER_EPOCHS": "1"}
    # the whole run, Ray cluster included, in its own process group so it can be killed like a crash
    first = subprocess.Popen(cmd, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_checkpoint("ray_runs/run-*/frontend", out)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
    assert not (out / "manifest.json").exists()

    resumed = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    training = json.loads((out / "manifest.json").read_text())["training"]
    frontend = training["stages"]["frontend"]
    assert frontend["epochs"] == epochs
    assert frontend["starts"][0] == 0 and len(frontend["starts"]) == 2
    assert 0 < frontend["starts"][1] < epochs  # continued at the saved epoch
    assert len(list((out / "ray_runs").glob("run-*"))) == 1  # the same run, not a new one


def test_resume_without_an_earlier_run_is_a_clear_error(tmp_path):
    data = tmp_path / "corpus"
    synthesize_corpus(data, minutes=0.2, seed=7, progress=False)
    result = subprocess.run([sys.executable, "-m", "soundfleet.cli", "train", "--data", str(data),
                             "--out", str(tmp_path / "b"), "--resume"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "nothing to resume" in result.stderr and "Traceback" not in result.stderr
