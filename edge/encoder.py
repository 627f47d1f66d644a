"""The edge's model: ONNX front end + VQ, run by onnxruntime on one thread."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from shared_models import bundle
from shared_models.constants import PATCH_SAMPLES, SAMPLE_RATE_HZ
from shared_models.wire import WIRE_VERSION

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Encoded:
    """One batch of frames through the front end and the quantizer."""

    codes: np.ndarray  # (N,) uint16 index of the nearest codebook entry
    embeddings: np.ndarray  # (N, D) float32 front-end output
    loudness_dbfs: np.ndarray  # (N,) float32 frame RMS level in dB relative to full scale


class EdgeEncoder:
    """Loads ``edge.onnx`` from a bundle and refuses one that does not match the wire or codebook."""

    def __init__(self, bundle_dir: str | Path | None = None, threads: int = 1):
        self.bundle_dir = Path(bundle_dir) if bundle_dir else bundle.default_bundle_dir()
        self.manifest = bundle.verify_bundle(self.bundle_dir, files=(bundle.EDGE_MODEL, bundle.CODEBOOK))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(
            str(self.bundle_dir / bundle.EDGE_MODEL), options, providers=["CPUExecutionProvider"]
        )
        meta = self.session.get_modelmeta().custom_metadata_map
        self._check(meta)
        self.codebook_id = int(meta["codebook_id"])
        self.model_version = meta["model_version"]

    def _check(self, meta: dict[str, str]) -> None:
        problems = []
        if meta.get("wire_version") != str(WIRE_VERSION):
            problems.append(f"wire_version {meta.get('wire_version')!r} != {WIRE_VERSION}")
        if meta.get("codebook_id") != str(self.manifest["codebook_id"]):
            problems.append("codebook_id differs from the manifest")
        if meta.get("patch_samples") != str(PATCH_SAMPLES) or meta.get("sample_rate_hz") != str(SAMPLE_RATE_HZ):
            problems.append("patch size or sample rate differs from this agent's")
        if problems:
            raise bundle.BundleError(f"{self.bundle_dir / bundle.EDGE_MODEL}: " + "; ".join(problems))

    def encode(self, patches: np.ndarray) -> Encoded:
        """patches: (N, PATCH_SAMPLES) float32 in [-1, 1]."""
        patches = np.ascontiguousarray(patches, dtype=np.float32)
        embeddings, codes = self.session.run(None, {"patches": patches})
        rms = np.sqrt(np.mean(np.square(patches), axis=1))
        loudness = 20.0 * np.log10(np.maximum(rms, 1e-5))  # floor: -100 dBFS
        return Encoded(codes.astype(np.uint16), embeddings, loudness.astype(np.float32))
