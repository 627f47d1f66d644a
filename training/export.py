"""Export a trained model set: ONNX for the edge, weights for the cloud, a manifest."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from shared_models import bundle
from shared_models.codebook import EdgeEncoder
from shared_models.constants import PATCH_SAMPLES
from shared_models.wire import WIRE_VERSION

log = logging.getLogger(__name__)

ONNX_OPSET = 18


def export_edge_onnx(encoder: EdgeEncoder, path: Path, metadata: dict[str, str]) -> None:
    """Export front end + VQ with a dynamic frame count and self-describing metadata."""
    encoder = encoder.eval()
    dummy = torch.zeros(40, PATCH_SAMPLES)
    frames = torch.export.Dim("frames", min=1, max=1_000_000)  # any number of frames per call
    torch.onnx.export(
        encoder,
        (dummy,),
        str(path),
        input_names=["patches"],
        output_names=["embeddings", "codes"],
        dynamic_shapes={"patches": {0: frames}},
        opset_version=ONNX_OPSET,
        dynamo=True,
        external_data=False,  # one self-contained file: the edge verifies its sha256
        verbose=False,
    )
    model = onnx.load(str(path))
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def write_bundle(
    out_dir: Path,
    encoder: EdgeEncoder,
    centroids: np.ndarray,
    cloud_state: dict[str, Any],
    manifest: dict[str, Any],
) -> dict[str, Any]:
    """Write edge.onnx, codebook.npy, cloud.pt and manifest.json into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_meta = {
        "model_version": manifest["model_version"],
        "wire_version": str(WIRE_VERSION),
        "codebook_id": str(manifest["codebook_id"]),
        "codebook_size": str(len(centroids)),
        "data_sha256": manifest["training"]["data_sha256"],
        "sample_rate_hz": str(manifest["sample_rate_hz"]),
        "patch_samples": str(PATCH_SAMPLES),
    }
    export_edge_onnx(encoder, out_dir / bundle.EDGE_MODEL, onnx_meta)
    np.save(out_dir / bundle.CODEBOOK, centroids.astype(np.float32))
    torch.save(cloud_state, out_dir / bundle.CLOUD_WEIGHTS)
    return finish_bundle(out_dir, manifest, bundle_readme)


def finish_bundle(out_dir: Path, manifest: dict[str, Any], readme: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    """With the model files in ``out_dir``: add the format, wire version and every file's sha256
    to ``manifest``, write it and the README that ``readme`` renders from it; returns it."""
    manifest = {
        **manifest,
        "bundle_format": bundle.BUNDLE_FORMAT,
        "wire_version": WIRE_VERSION,
        "sha256": {name: bundle.file_sha256(out_dir / name) for name in bundle.BUNDLE_FILES},
    }
    (out_dir / bundle.MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    (out_dir / "README.md").write_text(readme(manifest))
    log.info("wrote bundle %s (model %s)", out_dir, manifest["model_version"])
    return manifest


def bundle_readme(manifest: dict[str, Any]) -> str:
    """A human-readable account of how the bundle was made (the manifest is the source of truth)."""
    t = manifest["training"]
    m, cal = t["metrics"], t.get("calibration")
    parts = "".join(f"; {name} clips alone: macro-F1 {m[name]['macro_f1']:.3f}, mAP {m[name]['mAP']:.3f}"
                    for name in ("synthetic", "real") if name in m)
    if "mAP" in m:
        parts = f", mAP {m['mAP']:.3f}{parts}"
    # bundles trained before the false-alarm calibration chose thresholds by window F1
    how = (f"the lowest that kept the validation clips' negatives\n({cal['pool_hours']} h of background, "
           f"confusers and speech) within\n{cal['budget_per_24h']:g} false event per 24 h, through the live event logic"
           if cal else "the ones that maximised window F1 on the validation clips")
    rows = "\n".join(
        f"| {label} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} | "
        f"{m['thresholds'][label]:.2f} |"
        for label, c in m["per_class"].items()
    )
    return f"""# Model bundle {manifest['model_version']}

Made by `soundfleet train`; everything here is also in `manifest.json`.

- command: `{t['command']}`
- seed: {t['seed']}
- data: `{t['data_dir']}`, sha256 `{t['data_sha256']}`
- clips: {', '.join(f'{n} {split}' for split, n in t['clips'].items())}
- wall time: {t['wall_time_s']} s on {t['machine']}
- codebook: K={manifest['codebook_size']}, id {manifest['codebook_id']}, {t['codes_used']} codes used
- wire version {manifest['wire_version']}

Per-label on-thresholds: {how}.

Held-out test clips, one decision per 1 s window, at those thresholds:
macro-F1 **{m['macro_f1']:.3f}**{parts}, {m['windows']} windows.

| label | precision | recall | F1 | positive windows | threshold |
|---|---|---|---|---|---|
{rows}
"""
