"""Model bundles: the directory a training run writes and the edge and cloud load.

numpy/stdlib only, so the edge can verify a bundle without torch. Layout::

    manifest.json   model version, wire version, codebook id, model configs,
                    sha256 of every file, and how it was trained
    edge.onnx       front end + nearest-centroid VQ (what the edge runs)
    codebook.npy    (K, D) float32 centroids (the cloud embeds codes with it)
    cloud.pt        code LM and classifier weights (torch state dicts)
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from shared_models.constants import PATCH_SAMPLES

BUNDLE_FORMAT = 1
MANIFEST = "manifest.json"
EDGE_MODEL = "edge.onnx"
CODEBOOK = "codebook.npy"
CLOUD_WEIGHTS = "cloud.pt"
BUNDLE_FILES = (EDGE_MODEL, CODEBOOK, CLOUD_WEIGHTS)


class BundleError(RuntimeError):
    """A bundle is missing, incomplete, corrupted or incompatible."""


def default_bundle_dir() -> Path:
    """The small bundle that ships inside the package (trained by ``soundfleet train``)."""
    return Path(__file__).resolve().parent / "default_bundle"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_manifest(bundle_dir: Path) -> dict[str, Any]:
    path = Path(bundle_dir) / MANIFEST
    if not path.is_file():
        raise BundleError(f"no model bundle at {bundle_dir}: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from None
    if manifest.get("bundle_format") != BUNDLE_FORMAT:
        raise BundleError(
            f"{path}: bundle_format {manifest.get('bundle_format')!r} is not {BUNDLE_FORMAT}"
        )
    return manifest


def verify_bundle(bundle_dir: Path, files: tuple[str, ...] = BUNDLE_FILES) -> dict[str, Any]:
    """Load the manifest and check the sha256 of ``files``; returns the manifest."""
    manifest = load_manifest(bundle_dir)
    for name in files:
        path = Path(bundle_dir) / name
        if not path.is_file():
            raise BundleError(f"bundle {bundle_dir} is missing {name}")
        expected = manifest["sha256"].get(name)
        actual = file_sha256(path)
        if actual != expected:
            raise BundleError(f"{path}: sha256 {actual[:12]}.. does not match manifest {str(expected)[:12]}..")
    return manifest


def silence_code(bundle_dir: str | Path) -> int:
    """The code the bundle's ``edge.onnx`` gives one all-zeros patch (digital silence).

    The cloud feeds it to the code LM for the frames the edge's loudness gate sent as silent
    (``wire.FLAG_SILENCE``). Computed once per bundle directory (resolved path)."""
    return _silence_code(str(Path(bundle_dir).resolve()))


@functools.cache
def _silence_code(bundle_dir: str) -> int:
    import onnxruntime as ort  # here, not at the top: this module stays numpy/stdlib-only

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(Path(bundle_dir) / EDGE_MODEL), options, providers=["CPUExecutionProvider"]
    )
    (codes,) = session.run(["codes"], {"patches": np.zeros((1, PATCH_SAMPLES), np.float32)})
    return int(codes[0])  # codes: (1,) int64
