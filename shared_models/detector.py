"""The cloud's inference path over codes, shared by training (evaluation) and Serve.

codes context (up to the code LM's context) -> code LM hidden states of the
last ``window_frames`` frames -> scene classifier (with the codebook centroids
of those frames) -> one probability per event label.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from shared_models import bundle
from shared_models.code_transformer import CodeTransformer, CodeTransformerConfig
from shared_models.scene_classifier import (
    ExtendedClassifier,
    SceneClassifier,
    SceneClassifierConfig,
)

LM_CHUNK = 16  # contexts per code LM pass in lm_window_states


@torch.no_grad()
def lm_window_states(
    code_lm: CodeTransformer, contexts: list[torch.Tensor], window_frames: int
) -> torch.Tensor:
    """Hidden states of the last ``window_frames`` positions of each context.

    contexts: list of (T_i,) int64 with window_frames <= T_i <= context_frames.
    Contexts of equal length run together (no padding: positions start at 0 in
    training too), in chunks of ``LM_CHUNK`` (larger batches of these small matrices
    run slower per window on a CPU). Returns (B, W, C) in the input order.
    """
    out: list[torch.Tensor | None] = [None] * len(contexts)
    by_len: dict[int, list[int]] = {}
    for i, ctx in enumerate(contexts):
        if len(ctx) < window_frames:
            raise ValueError(f"context of {len(ctx)} codes is shorter than the window")
        by_len.setdefault(len(ctx), []).append(i)
    for same_len in by_len.values():
        for start in range(0, len(same_len), LM_CHUNK):
            idx = same_len[start : start + LM_CHUNK]
            hidden = code_lm.tail_hidden(torch.stack([contexts[i] for i in idx]), window_frames)  # (b, W, C)
            for j, i in enumerate(idx):
                out[i] = hidden[j]
    return torch.stack(out)  # (B, W, C)


@torch.no_grad()
def classify_windows(
    classifier: SceneClassifier,
    centroids: torch.Tensor,
    lm_states: torch.Tensor,
    window_codes: torch.Tensor,
) -> torch.Tensor:
    """(B, W, C) states, (B, W) codes -> (B, L) probabilities."""
    return torch.sigmoid(classifier(lm_states, centroids[window_codes]))


def load_cloud_models(
    bundle_dir: Path,
) -> tuple[dict, CodeTransformer, SceneClassifier | ExtendedClassifier, torch.Tensor]:
    """Verify the bundle and rebuild both models from the configs saved in its manifest (with a
    user's own classes, the classifier is the base one extended by theirs)."""
    manifest = bundle.verify_bundle(bundle_dir)
    weights = torch.load(Path(bundle_dir) / bundle.CLOUD_WEIGHTS, map_location="cpu", weights_only=True)
    code_lm = CodeTransformer(CodeTransformerConfig(**manifest["code_lm_config"]))
    code_lm.load_state_dict(weights["code_lm"])
    classifier = SceneClassifier(SceneClassifierConfig(**manifest["classifier_config"]))
    classifier.load_state_dict(weights["classifier"])
    if "custom_classifier_config" in manifest:  # a user's own classes on top (`soundfleet train --base`)
        custom = SceneClassifier(SceneClassifierConfig(**manifest["custom_classifier_config"]))
        custom.load_state_dict(weights["custom_classifier"])
        classifier = ExtendedClassifier(classifier, custom)
    centroids = torch.tensor(np.load(Path(bundle_dir) / bundle.CODEBOOK))
    return manifest, code_lm.eval(), classifier.eval(), centroids
