"""The torch eager side of `soundfleet bench edge`: the same front end + VQ in torch.

Kept out of ``edge/`` (which never imports torch): the benchmark's parent process
passes :func:`measure_torch_eager` to ``edge.bench.run_edge_bench``. torch is
imported lazily, so an edge-only install gets a reason instead of a crash.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from edge.agent import message_chunks
from edge.bench import BenchError, measure_path
from edge.encoder import EdgeEncoder, Encoded
from edge.sources import file_source
from shared_models import bundle
from shared_models.constants import HOP_SAMPLES, PATCH_SAMPLES, SILENCE_DBFS

log = logging.getLogger(__name__)


class TorchEagerEncoder:
    """The bundle's front end + VQ as a torch eager model, behind the edge encoder's interface."""

    def __init__(self, bundle_dir: Path):
        import torch

        from shared_models.codebook import EdgeEncoder as TorchEdgeEncoder
        from shared_models.frontends import build_front_end

        manifest = bundle.verify_bundle(bundle_dir, files=(bundle.CLOUD_WEIGHTS, bundle.CODEBOOK))
        weights = torch.load(bundle_dir / bundle.CLOUD_WEIGHTS, weights_only=True)
        if "frontend" not in weights:
            raise BenchError(f"{bundle_dir / bundle.CLOUD_WEIGHTS} has no 'frontend' weights")
        front_end = build_front_end(manifest.get("frontend", "dense"), manifest["frontend_config"])
        front_end.load_state_dict(weights["frontend"])
        centroids = torch.from_numpy(np.load(bundle_dir / bundle.CODEBOOK))  # (K, D)
        self.model = TorchEdgeEncoder(front_end.eval(), centroids).eval()
        self.codebook_id = int(manifest["codebook_id"])
        self._torch = torch

    def encode(self, patches: np.ndarray) -> Encoded:
        """patches: (N, PATCH_SAMPLES) float32; loudness as edge.encoder.EdgeEncoder computes it."""
        patches = np.ascontiguousarray(patches, dtype=np.float32)
        with self._torch.inference_mode():
            embeddings, codes = self.model(self._torch.from_numpy(patches))  # (N, D), (N,)
        rms = np.sqrt(np.mean(np.square(patches), axis=1))
        loudness = 20.0 * np.log10(np.maximum(rms, 10.0 ** (SILENCE_DBFS / 20.0)))
        return Encoded(
            codes.numpy().astype(np.uint16), embeddings.numpy(), loudness.astype(np.float32)
        )


def _code_agreement(a: Any, b: Any, wav: Path, frames_per_message: int) -> float:
    """Fraction of frames on which two encoders pick the same code (ties may differ)."""
    per_message = frames_per_message * HOP_SAMPLES
    same = total = 0
    for chunk in message_chunks(file_source(str(wav), per_message), per_message):
        patches = chunk.reshape(-1, PATCH_SAMPLES)  # (N, PATCH_SAMPLES)
        same += int(np.sum(a.encode(patches).codes == b.encode(patches).codes))
        total += len(patches)
    return same / total


def measure_torch_eager(wav: Path, bundle_dir: Path, repeats: int, frames: int) -> dict[str, Any]:
    """The same path with torch eager on one thread, in this process; reason when impossible."""
    try:
        import torch
    except ImportError as exc:
        return {"available": False, "reason": f"torch is not installed ({exc}): edge-only install"}
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        encoder = TorchEagerEncoder(bundle_dir)
        result = measure_path(encoder, wav, frames, repeats, "torch eager")
        agreement = _code_agreement(encoder, EdgeEncoder(bundle_dir), wav, frames)
    except (BenchError, bundle.BundleError, KeyError, RuntimeError) as exc:
        log.warning("torch eager comparison skipped: %s", exc)
        return {"available": False, "reason": f"torch eager model could not run: {exc}"}
    finally:
        torch.set_num_threads(previous_threads)
    return {"available": True, "torch": torch.__version__, "code_agreement": agreement, **result}
