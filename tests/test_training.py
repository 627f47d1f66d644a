"""`soundfleet train` end to end on a tiny corpus, through Ray Train with two workers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from shared_models import bundle
from shared_models.codebook import codebook_id
from shared_models.constants import EVENT_LABELS
from shared_models.wire import WIRE_VERSION
from soundfleet.config import TrainConfig
from training.corpus import corpus_hash, synthesize_corpus
from training.pipeline import train_all


def write_folders_dataset(root: Path, seed: int) -> Path:
    """A labelled-folders dataset as `soundfleet data real` writes one: a few whole-file event
    recordings (weak labels, one shorter than a window) and unlabelled background recordings."""
    from shared_models.synth_events import generate_event
    from shared_models.wavio import write_wav
    from training.sources import NONE_FOLDER

    rng = np.random.default_rng(seed)
    for label, seconds in (("dog_bark", [0.5, 1.5]), ("siren", [2.0])):
        (root / label).mkdir(parents=True)
        for k, duration_s in enumerate(seconds):
            write_wav(root / label / f"{k}.wav", generate_event(label, rng, duration_s), 16_000)
    (root / NONE_FOLDER).mkdir()
    for k in range(6):
        write_wav(root / NONE_FOLDER / f"{k}.wav", (0.02 * rng.standard_normal(48_000)).astype(np.float32), 16_000)
    return root


@pytest.mark.slow
def test_tiny_training_run_exports_a_self_describing_bundle(ray_session, tmp_path):
    """The synthetic corpus and a folder of real-style recordings trained on together: the weakly
    labelled events are mixed into the folder's negatives, thresholds come from the false-alarm
    calibration, and held-out metrics are reported for both kinds of clip."""
    from training.sources import load_datasets

    data = tmp_path / "corpus"
    synthesize_corpus(data, minutes=1.5, seed=3, progress=False)
    folders = write_folders_dataset(tmp_path / "folders", seed=3)
    cfg = TrainConfig(workers=2, seed=3, codebook_size=32, frontend_hidden=64, frontend_epochs=2,
                      code_lm_epochs=2, classifier_epochs=2, holdout_fraction=0.2, augment_per_label=8)
    out = tmp_path / "bundle"
    manifest = train_all([data, folders], out, cfg, command="pytest tiny run")

    # every file is there and matches its recorded sha256
    assert bundle.verify_bundle(out) == json.loads((out / bundle.MANIFEST).read_text())
    centroids = np.load(out / bundle.CODEBOOK)
    assert centroids.shape == (32, 64)
    assert manifest["codebook_id"] == codebook_id(centroids)
    assert manifest["wire_version"] == WIRE_VERSION
    training = manifest["training"]
    assert training["data_sha256"] == load_datasets([data, folders]).data_sha256 != corpus_hash(data)
    assert training["data_layout"] == "builtin+folders"
    assert training["command"] == "pytest tiny run" and training["seed"] == 3
    assert tuple(manifest["labels"]) == EVENT_LABELS  # the corpus's order; the folders add no label
    # the corpus's clips and the 9 recordings, plus 8 mixtures per event label found in the training
    # split (2 per label in validation), all counted
    mixtures = training["mixtures"]
    assert sum(training["clips"].values()) == len(load_datasets([data, folders]).clips) + sum(mixtures.values())
    assert mixtures["train"] in (8, 16) and mixtures["validation"] in (0, 2, 4)
    # pretrain_on="all" (the default): the front end and code LM learn from every training clip
    assert training["pretraining_clips"] == training["clips"]["train"]
    metrics = training["metrics"]
    assert set(metrics["per_class"]) == set(manifest["labels"])
    assert 0.0 <= metrics["macro_f1"] <= 1.0 and 0.0 <= metrics["mAP"] <= 1.0
    # the calibration's thresholds are the bundle's, each on the grid, and each report row says why
    calibration = training["calibration"]
    assert calibration["budget_per_24h"] == 1.0 and calibration["pool_hours"] > 0
    assert manifest["thresholds"] == {label: row["on_threshold"] for label, row in calibration["labels"].items()}
    assert all(0.3 <= t <= 0.999 for t in manifest["thresholds"].values())
    assert manifest["min_windows"] == {label: row["min_windows"] for label, row in calibration["labels"].items()}
    assert set(manifest["min_windows"].values()) <= {1, 2, 3}
    assert all([o["min_windows"] for o in row["tried"]] == [1, 2, 3] for row in calibration["labels"].values())

    # `soundfleet calibrate` at the training's own settings finds the same thresholds from the
    # bundle's ONNX codes, and at other settings writes a copy with the same models
    from training.recalibrate import CalibrateError, recalibrate

    again = recalibrate(out, tmp_path / "same")
    assert (again["thresholds"], again["min_windows"]) == (manifest["thresholds"], manifest["min_windows"])
    one = recalibrate(out, tmp_path / "one-window", budget_per_24h=1000.0, max_min_windows=1)
    assert set(one["min_windows"].values()) == {1} and one["model_version"].startswith(manifest["model_version"] + "-cal")
    assert one["recalibrated"]["previous_thresholds"] == manifest["thresholds"]
    assert one["training"]["calibration"]["budget_per_24h"] == 1000.0
    for name in (bundle.EDGE_MODEL, bundle.CODEBOOK, bundle.CLOUD_WEIGHTS):
        assert (tmp_path / "one-window" / name).read_bytes() == (out / name).read_bytes()
    with pytest.raises(CalibrateError, match="not empty"):
        recalibrate(out, tmp_path / "one-window")

    # the ONNX model describes itself the same way
    meta = ort.InferenceSession(str(out / bundle.EDGE_MODEL)).get_modelmeta().custom_metadata_map
    assert meta["codebook_id"] == str(manifest["codebook_id"])
    assert meta["wire_version"] == str(WIRE_VERSION)
    assert meta["data_sha256"] == training["data_sha256"]

    # Ray Train wrote checkpoints for each stage, and the cloud weights load
    run_dir = Path(training["run_dir"])
    assert run_dir.parent == out / "ray_runs"
    for stage in ("frontend", "code_lm", "classifier"):
        assert list((run_dir / stage).glob("checkpoint_*")), f"no checkpoint for {stage}"
        assert training["stages"][stage] == {"epochs": 2, "starts": [0]}  # uninterrupted
    weights = torch.load(out / bundle.CLOUD_WEIGHTS, weights_only=True)
    assert set(weights) == {"frontend", "code_lm", "classifier"}


@pytest.mark.slow
def test_autoencoder_front_end_trains_and_ships_an_edge_model_that_matches_torch(ray_session, tmp_path):
    """`train.frontend = "autoencoder"`: the S2 log-mel autoencoder goes through the same pipeline,
    and the bundle's edge.onnx reproduces the torch front end + VQ rebuilt from the manifest."""
    from shared_models.codebook import EdgeEncoder
    from shared_models.frontends import build_front_end
    from shared_models.wavio import read_wav
    from training.dataset import frame_patches

    data = tmp_path / "corpus"
    synthesize_corpus(data, minutes=1.0, seed=4, progress=False)
    cfg = TrainConfig(workers=1, seed=4, frontend="autoencoder", codebook_size=16, frontend_epochs=1,
                      code_lm_epochs=1, classifier_epochs=1, holdout_fraction=0.2)
    out = tmp_path / "bundle"
    manifest = train_all(data, out, cfg, command="pytest autoencoder run")

    assert manifest["frontend"] == "autoencoder"
    assert manifest["frontend_config"]["n_mels"] == 32
    front_end = build_front_end(manifest["frontend"], manifest["frontend_config"])
    front_end.load_state_dict(torch.load(out / bundle.CLOUD_WEIGHTS, weights_only=True)["frontend"])
    encoder = EdgeEncoder(front_end.eval(), torch.tensor(np.load(out / bundle.CODEBOOK))).eval()
    frames = frame_patches(read_wav(Path(__file__).parent / "fixtures" / "siren_street.wav")[0])
    onnx_emb, onnx_codes = ort.InferenceSession(str(out / bundle.EDGE_MODEL)).run(None, {"patches": frames})
    with torch.no_grad():
        torch_emb, torch_codes = encoder(torch.tensor(frames))
    assert np.abs(onnx_emb - torch_emb.numpy()).max() < 1e-4
    assert (onnx_codes == torch_codes.numpy()).mean() > 0.99
    assert manifest["training"]["stages"]["frontend"] == {"epochs": 1, "starts": [0]}
