"""`soundfleet bench edge`: the report's fields, units and its torch-free edge process.

No timing assertions: the speed and memory targets are what the benchmark reports
(``meets_targets``), not what a unit test on a busy machine can promise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge.bench import PCM16_BPS, TARGETS, build_report, format_table
from shared_models.bundle import default_bundle_dir
from shared_models.constants import EMBEDDING_DIM, FRAMES_PER_SECOND
from shared_models.wire import CRC_BYTES, HEADER_BYTES
from training.bench_torch import measure_torch_eager

FIXTURE = Path(__file__).parent / "fixtures" / "quiet_room.wav"  # 4.0 s


def _bench(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "soundfleet.cli", "bench", "edge", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def report() -> dict:
    out = _bench("--json", "--seconds", "5", "--repeats", "1")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # the whole of stdout is one JSON object


def test_report_has_every_field_with_sane_types_and_ranges(report):
    assert report["audio_seconds"] == 5.0
    assert report["frames"] == 5 * FRAMES_PER_SECOND and report["messages"] == 5
    assert report["repeats"] == 1 and len(report["cpu_seconds_repeats"]) == 1
    assert report["cpu_seconds"] > 0 and report["torch_eager_cpu_seconds"] > 0
    assert report["realtime_factor_per_core"] > 0
    assert report["torch_eager_realtime_factor_per_core"] > 0
    assert report["speedup_onnx_vs_torch"] == pytest.approx(
        report["realtime_factor_per_core"] / report["torch_eager_realtime_factor_per_core"]
    )
    assert report["torch_eager_unavailable_reason"] is None
    assert report["torch_onnx_code_agreement"] >= 0.99  # the same model in both runtimes
    assert 0 < report["peak_rss_mb"] < 4000
    # the target is about the whole agent (spool, MQTT session, threads), not just the timed path
    assert report["peak_rss_source"] == "agent process (soundfleet edge run)"
    assert report["peak_rss_mb"] == report["agent_process"]["peak_rss_mb"]
    assert report["agent_process"]["peak_rss_mb"] > report["rss_after_imports_mb"] * 0.8
    assert report["model_version"].startswith("sf1-")
    assert report["codebook_size"] == 256 and isinstance(report["codebook_id"], int)
    machine = report["machine"]
    assert machine["cpu_model"] and machine["cores"] >= 1
    assert all(isinstance(machine[k], str) for k in ("onnxruntime", "numpy", "torch"))
    assert report["targets"] == TARGETS
    assert set(report["meets_targets"]) == set(TARGETS)
    assert all(isinstance(v, bool) for v in report["meets_targets"].values())


def test_bitrates_are_the_wire_payload_sizes_and_rise_with_the_payload(report):
    bps = report["bitrate_bps"]
    frames = FRAMES_PER_SECOND  # one message per second of audio
    assert bps["codes"] == (HEADER_BYTES + 2 * frames + CRC_BYTES) * 8  # 928 bit/s
    assert bps["codes+loudness"] == (HEADER_BYTES + 4 * frames + CRC_BYTES) * 8
    emb_bytes = 2 * frames * EMBEDDING_DIM  # float16
    assert bps["codes+embeddings"] == (HEADER_BYTES + 2 * frames + emb_bytes + CRC_BYTES) * 8
    assert bps["codes"] < bps["codes+loudness"] < bps["codes+embeddings"] < bps["pcm16"]
    assert bps["pcm16"] == PCM16_BPS == 256_000
    assert report["compression_vs_pcm16"]["codes"] == pytest.approx(PCM16_BPS / bps["codes"])


def test_the_process_that_measured_the_edge_path_did_not_import_torch(report):
    assert report["edge_process"]["torch_loaded"] is False


def test_edge_process_entry_point_reads_a_real_wav(tmp_path):
    cmd = [sys.executable, "-m", "edge.bench", str(FIXTURE), "--repeats", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["audio_seconds"] == 4.0 and result["messages"] == 4
    assert result["torch_loaded"] is False and result["peak_rss_mb"] > 0


def test_missing_bundle_dir_is_a_clear_error_not_a_traceback(tmp_path):
    missing = tmp_path / "no-such-bundle"
    out = _bench("--json", "--seconds", "1", "--repeats", "1", "--bundle", str(missing))
    assert out.returncode == 1
    assert str(missing) in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_without_torch_the_torch_fields_are_null_with_a_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    torch_eager = measure_torch_eager(FIXTURE, default_bundle_dir(), repeats=1, frames=40)
    assert torch_eager["available"] is False and "torch is not installed" in torch_eager["reason"]
    edge = {
        "audio_seconds": 5.0, "frames": 200, "messages": 5, "cpu_seconds_repeats": [0.01],
        "payload_bytes": {"codes": 580, "codes+loudness": 980, "codes+embeddings": 26180},
        "peak_rss_mb": 70.0, "rss_after_imports_mb": 60.0, "model_version": "sf1-x",
        "codebook_id": 1, "codebook_size": 256, "torch_loaded": False,
        "onnxruntime": "1", "numpy": "2",
    }  # fmt: skip
    agent = {"peak_rss_mb": 75.0, "broker": "acknowledged every message"}
    offline = build_report(edge, agent, torch_eager, {"cpu_model": "cpu"}, Path("b"), 1, 40)
    assert offline["torch_eager_realtime_factor_per_core"] is None
    assert offline["speedup_onnx_vs_torch"] is None
    assert "torch is not installed" in offline["torch_eager_unavailable_reason"]
    assert offline["realtime_factor_per_core"] == pytest.approx(500.0)
    assert "n/a" in format_table(offline)


def test_human_table_names_each_measure_and_target(report):
    table = format_table(report)
    for text in ("real time per core, onnx", "torch eager", "peak RSS", "bitrate codes", "928 bps"):
        assert text in table
    help_out = subprocess.run(
        [sys.executable, "-m", "soundfleet.cli", "bench", "edge", "--help"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert help_out.returncode == 0
    assert all(opt in help_out.stdout for opt in ("--json", "--seconds", "--bundle", "--repeats"))
