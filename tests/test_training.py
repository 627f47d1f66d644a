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
from shared_models.wire import WIRE_VERSION
from soundfleet.config import TrainConfig
from training.corpus import corpus_hash, synthesize_corpus
from training.pipeline import train_all


@pytest.mark.slow
def test_tiny_training_run_exports_a_self_describing_bundle(ray_session, tmp_path):
    data = tmp_path / "corpus"
    synthesize_corpus(data, minutes=1.5, seed=3, progress=False)
    cfg = TrainConfig(workers=2, seed=3, codebook_size=32, frontend_hidden=64, frontend_epochs=2,
                      code_lm_epochs=2, classifier_epochs=2, holdout_fraction=0.2)
    out = tmp_path / "bundle"
    manifest = train_all(data, out, cfg, command="pytest tiny run")

    # every file is there and matches its recorded sha256
    assert bundle.verify_bundle(out) == json.loads((out / bundle.MANIFEST).read_text())
    centroids = np.load(out / bundle.CODEBOOK)
    assert centroids.shape == (32, 64)
    assert manifest["codebook_id"] == codebook_id(centroids)
    assert manifest["wire_version"] == WIRE_VERSION
    training = manifest["training"]
    assert training["data_sha256"] == corpus_hash(data)
    assert training["command"] == "pytest tiny run" and training["seed"] == 3
    assert set(training["metrics"]["per_class"]) == set(manifest["labels"])
    assert 0.0 <= training["metrics"]["macro_f1"] <= 1.0

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
    cfg = TrainConfig(workers=2, seed=4, frontend="autoencoder", codebook_size=16, frontend_epochs=1,
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
