"""A dataset in the ESC-50 layout trains and evaluates end to end with its own labels."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from shared_models import bundle
from shared_models.synth import generate_event
from shared_models.wavio import resample_linear, write_wav
from soundfleet.config import TrainConfig
from training.pipeline import train_all

# ESC-50 category -> the built-in generator that stands in for its recordings
CATEGORIES = {"siren": "siren", "dog": "dog_bark", "church_bells": "doorbell"}
RATE_HZ = 22_050  # not 16 kHz: loading must resample
CLIP_S = 2.5


def _write_esc50(root, clips_per_category: int = 6) -> None:
    (root / "audio").mkdir(parents=True)
    (root / "meta").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for target, (category, generator) in enumerate(CATEGORIES.items()):
        for i in range(clips_per_category):
            event = generate_event(generator, rng)[: int(CLIP_S * 16_000)]
            clip = np.zeros(int(CLIP_S * 16_000), np.float32)
            clip[: len(event)] = event
            clip += 0.01 * rng.standard_normal(len(clip)).astype(np.float32)
            name = f"{i % 5 + 1}-{target}{i:03d}-A-{target}.wav"
            # write at 22.05 kHz: the inverse of what loading does
            write_wav(root / "audio" / name, resample_linear(clip, 16_000 * 16_000 // RATE_HZ), RATE_HZ)
            rows.append([name, i % 5 + 1, target, category, "False", f"{target}{i:03d}", "A"])
    with open(root / "meta" / "esc50.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "fold", "target", "category", "esc10", "src_file", "take"])
        writer.writerows(rows)


@pytest.mark.slow
def test_esc50_layout_trains_and_evaluates_with_its_own_labels(ray_session, tmp_path):
    data = tmp_path / "ESC-50-master"
    _write_esc50(data)
    cfg = TrainConfig(workers=1, seed=1, codebook_size=16, frontend_hidden=32, frontend_epochs=2,
                      code_lm_epochs=1, classifier_epochs=2, holdout_fraction=0.2,
                      classifier_pooling="wavelet")
    out = tmp_path / "bundle"
    manifest = train_all(data, out, cfg, command="pytest esc50")
    assert manifest["labels"] == sorted(CATEGORIES)
    assert manifest["training"]["data_layout"] == "esc50"
    assert manifest["classifier_config"]["num_labels"] == len(CATEGORIES)
    assert manifest["classifier_config"]["pooling"] == "wavelet"  # and eval below rebuilds it from the manifest
    assert set(manifest["thresholds"]) == set(CATEGORIES)

    result = subprocess.run([sys.executable, "-m", "soundfleet.cli", "eval", "--models", str(out),
                             "--data", str(data), "--out", str(tmp_path / "eval.json")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report == json.loads(result.stdout)
    assert report["model_version"] == manifest["model_version"]
    assert report["data"]["layout"] == "esc50" and report["data"]["clips"] == 18
    metrics = report["metrics"]
    assert set(metrics["per_class"]) == set(CATEGORIES)
    # every clip is one category for its whole length: 2 full 1 s windows per clip
    assert sum(c["support"] for c in metrics["per_class"].values()) == 18 * 2
    assert set(metrics["mAP"]["per_label"]) == set(CATEGORIES)
    assert 0.0 <= metrics["mAP"]["mean"] <= 1.0
    assert set(metrics["confusion"]) == set(CATEGORIES)
    # the figures land beside the JSON report, and the report says where
    assert report["plots"] == {"confusion": str(tmp_path / "confusion.png"),
                               "per_class": str(tmp_path / "per_class.png")}
    for name in ("confusion.png", "per_class.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_refuses_a_dataset_with_labels_the_bundle_does_not_know(tmp_path):
    data = tmp_path / "ESC-50-master"
    _write_esc50(data, clips_per_category=1)
    result = subprocess.run([sys.executable, "-m", "soundfleet.cli", "eval", "--models", str(bundle.default_bundle_dir()),
                             "--data", str(data)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "not trained on: church_bells, dog" in result.stderr and "Traceback" not in result.stderr
