"""`soundfleet report replication`: the whole command runs end to end (smoke preset), and the
committed report is exactly what the command writes from its own results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.replication import PRESETS, preset, run_replication
from training.replication_report import write_report

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "docs" / "results"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = ("s1_accuracy.png", "s2_probe_vs_k.png", "s3_map.png", "filterbank.png")


@pytest.fixture(scope="module")
def smoke_report(ray_session, tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("replication")
    results = run_replication(root / "out", root / "work", PRESETS["smoke"], "smoke", command="pytest smoke")
    return root / "out", results


def test_smoke_run_writes_the_report_its_figures_and_raw_results(smoke_report):
    out, results = smoke_report
    text = (out / "replication.md").read_text()
    for heading in ("## S1", "## S2", "## S3", "## How these numbers were made"):
        assert heading in text
    for name in FIGURES:
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
        assert f"]({name})" in text
    assert json.loads((out / "replication.json").read_text())["preset"] == "smoke"
    assert results["data"]["data_sha256"][:16] in text


def test_smoke_results_are_well_formed_and_comparisons_fair(smoke_report):
    _, r = smoke_report
    s1 = r["s1"]
    params = [s1[m]["params"] for m in ("wavenet", "transformer", "conditioned_transformer")]
    assert max(params) <= 1.1 * min(params)  # matched parameter counts
    for m in ("wavenet", "transformer", "conditioned_transformer"):
        assert 0.0 <= s1[m]["top1"] <= s1[m]["top5"] <= 1.0
    s2 = r["s2"]
    assert sorted(int(k) for k in s2["code_lm_probe"]) == [16, 32]
    windows = {s2["code_lm_probe"][k]["test_windows"] for k in s2["code_lm_probe"]}
    windows |= {s2["supervised"]["test_windows"], s2["contrastive"]["test_windows"]}
    assert len(windows) == 1  # every S2 representation scored on the same held-out windows
    cls = r["s3"]["classifiers"]
    assert cls["wavelet"]["parameters"] == cls["meanmax"]["parameters"]  # the pooling adds none
    assert cls["cnn"]["parameters"] >= cls["wavelet"]["parameters_with_code_lm"]
    assert all(0.0 <= c["mAP"] <= 1.0 for c in cls.values())
    freqs = r["s3"]["filterbank"]["dominant_frequencies_hz"]
    assert len(freqs) == PRESETS["smoke"].s3.frontend_hidden
    assert freqs == sorted(freqs) and 0 < freqs[0] and freqs[-1] <= 8000


def test_committed_report_is_the_commands_unedited_output(tmp_path):
    """Re-rendering the committed raw results gives the committed report, byte for byte."""
    results = json.loads((COMMITTED / "replication.json").read_text())
    assert results["preset"] == "cpu"
    assert results["command"].startswith("soundfleet report replication")
    rendered = write_report(results, tmp_path).read_text()
    assert rendered == (COMMITTED / "replication.md").read_text()
    for name in FIGURES:
        assert (COMMITTED / name).read_bytes()[:8] == PNG_SIGNATURE


def test_unknown_preset_is_named_with_the_known_ones():
    with pytest.raises(ValueError, match="known: cpu, gpu, smoke"):
        preset("huge")
