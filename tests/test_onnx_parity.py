"""The edge's ONNX graph computes what the torch model computes, on real audio frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from shared_models import bundle
from shared_models.codebook import EdgeEncoder, codebook_id
from shared_models.frontend import FrontEndConfig, LearnedFrontEnd
from shared_models.frontends import build_front_end
from shared_models.wavio import read_wav
from training.dataset import frame_patches
from training.export import export_edge_onnx

FIXTURES = Path(__file__).parent / "fixtures"


def _real_frames() -> np.ndarray:
    frames = [frame_patches(read_wav(FIXTURES / name)[0]) for name in
              ("siren_street.wav", "smoke_alarm_kitchen.wav", "quiet_room.wav")]
    return np.concatenate(frames)  # (N, 400) float32


def _torch_encoder(bundle_dir: Path) -> EdgeEncoder:
    manifest = bundle.verify_bundle(bundle_dir)
    front_end = build_front_end(manifest.get("frontend", "dense"), manifest["frontend_config"])
    front_end.load_state_dict(torch.load(bundle_dir / bundle.CLOUD_WEIGHTS, weights_only=True)["frontend"])
    centroids = torch.tensor(np.load(bundle_dir / bundle.CODEBOOK))
    return EdgeEncoder(front_end.eval(), centroids).eval()


def _check_parity(encoder: EdgeEncoder, onnx_path: Path, frames: np.ndarray) -> None:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_emb, onnx_codes = session.run(None, {"patches": frames})
    with torch.no_grad():
        torch_emb, torch_codes = encoder(torch.tensor(frames))
    assert np.abs(onnx_emb - torch_emb.numpy()).max() < 1e-4
    # codes may only differ where two centroids are (numerically) equally near
    differ = onnx_codes != torch_codes.numpy()
    assert differ.mean() < 0.01, f"{differ.sum()} of {len(frames)} codes differ"


def test_shipped_edge_model_matches_its_torch_weights_on_real_frames():
    bundle_dir = bundle.default_bundle_dir()
    frames = _real_frames()
    assert len(frames) >= 600 and np.abs(frames).max() > 0.1  # a few seconds of real, non-silent audio
    _check_parity(_torch_encoder(bundle_dir), bundle_dir / bundle.EDGE_MODEL, frames)


def test_fresh_export_matches_torch_and_carries_metadata(tmp_path):
    torch.manual_seed(0)
    front_end = LearnedFrontEnd(FrontEndConfig(hidden_dim=64)).eval()
    centroids = torch.randn(32, 64)
    encoder = EdgeEncoder(front_end, centroids).eval()
    path = tmp_path / "edge.onnx"
    export_edge_onnx(encoder, path, {"codebook_id": str(codebook_id(centroids.numpy())), "wire_version": "1"})
    _check_parity(encoder, path, _real_frames())
    meta = ort.InferenceSession(str(path)).get_modelmeta().custom_metadata_map
    assert meta["codebook_id"] == str(codebook_id(centroids.numpy()))
    # any number of frames: the frame axis is dynamic
    session = ort.InferenceSession(str(path))
    for n in (1, 7, 400):
        emb, codes = session.run(None, {"patches": np.zeros((n, 400), np.float32)})
        assert emb.shape == (n, 64) and codes.shape == (n,)
