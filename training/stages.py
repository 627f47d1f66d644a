"""The worker loops of the trainable stages (each runs under Ray Train).

1. front end: LearnedFrontEnd + FrameTaggingHead on 2 s segments, frame-level BCE;
2. code LM: CodeTransformer, next-code cross-entropy on random crops;
3. classifier: SceneClassifier on precomputed code-LM window states, masked BCE.

S2 front end (alternative to 1): PatchAutoencoder, log-mel patch reconstruction MSE.
"""

from __future__ import annotations

import numpy as np
import ray
import torch
import torch.nn as nn
import torch.nn.functional as F

from shared_models.autoencoder import PatchAutoencoder
from shared_models.code_transformer import CodeTransformer, CodeTransformerConfig
from shared_models.frontend import FrameTaggingHead, FrontEndConfig, LearnedFrontEnd
from shared_models.scene_classifier import SceneClassifier, SceneClassifierConfig
from training.ray_stage import StageSpec, run_epochs, worker_setup


class FrontEndTagger(nn.Module):
    """Front end with its training-only frame tagging head."""

    def __init__(self, config: FrontEndConfig, num_labels: int):
        super().__init__()
        self.front_end = LearnedFrontEnd(config)
        self.head = FrameTaggingHead(config.embedding_dim, num_labels)

    def forward(self, segments: torch.Tensor) -> torch.Tensor:
        B, T, P = segments.shape
        emb = self.front_end(segments.reshape(B * T, P)).reshape(B, T, -1)  # (B, T, D)
        return self.head(emb)  # (B, T, L)


def _prepare(model: nn.Module) -> nn.Module:
    import ray.train.torch

    return ray.train.torch.prepare_model(model)


def frontend_loop(config: dict) -> None:
    rank, world = worker_setup(config)
    spec: StageSpec = config["spec"]
    data = ray.get(config["data_ref"])  # segments (M, T, P), labels (M, T, L)
    model = _prepare(FrontEndTagger(config["model_config"], data["labels"].shape[-1]))
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=1e-4)

    def batch_loss(idx: np.ndarray) -> torch.Tensor:
        x = torch.tensor(data["segments"][idx])
        # random gain: the front end must not key on absolute level alone
        x = x * torch.empty(len(idx), 1, 1).uniform_(0.3, 1.5)
        return F.binary_cross_entropy_with_logits(model(x), torch.tensor(data["labels"][idx]))

    run_epochs(spec, model, opt, len(data["segments"]), batch_loss, rank, world)


def code_lm_loop(config: dict) -> None:
    rank, world = worker_setup(config)
    spec: StageSpec = config["spec"]
    lm_config: CodeTransformerConfig = config["model_config"]
    sequences: list[np.ndarray] = ray.get(config["data_ref"])  # per clip (N_i,) int64
    crop = min(lm_config.context_frames, min(len(s) for s in sequences) - 1) + 1
    model = _prepare(CodeTransformer(lm_config))
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=1e-2)
    rng = np.random.default_rng(spec.seed + rank)  # shuffles and crops

    def batch_loss(idx: np.ndarray) -> torch.Tensor:
        crops = []
        for i in idx:  # a random crop of clip i % n: 4 crops per clip per epoch
            seq = sequences[i % len(sequences)]
            start = rng.integers(0, len(seq) - crop + 1)
            crops.append(seq[start : start + crop])
        codes = torch.tensor(np.stack(crops))  # (B, crop)
        logits, _ = model(codes[:, :-1])  # (B, crop-1, V)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes[:, 1:].reshape(-1))

    run_epochs(spec, model, opt, 4 * len(sequences), batch_loss, rank, world, rng)


def classifier_loop(config: dict) -> None:
    rank, world = worker_setup(config)
    spec: StageSpec = config["spec"]
    cls_config: SceneClassifierConfig = config["model_config"]
    data = ray.get(config["data_ref"])  # states (M,W,C), codes (M,W), targets, weights (M,L)
    centroids = torch.tensor(data["centroids"])
    model = SceneClassifier(cls_config)
    if config.get("init_body") is not None:  # a user's classes start from the base classifier's body
        model.load_state_dict(config["init_body"], strict=False)
    model = _prepare(model)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=1e-3)
    # rare labels get somewhat more weight on their positives; capped low, because a
    # large weight buys recall with false alarms, the costlier error for alert users
    pos_rate = (data["targets"] * data["weights"]).sum(0) / np.maximum(data["weights"].sum(0), 1)
    pos_weight = torch.tensor(np.clip(0.1 / np.maximum(pos_rate, 1e-3), 1.0, 2.0), dtype=torch.float32)

    def batch_loss(idx: np.ndarray) -> torch.Tensor:
        logits = model(torch.tensor(data["states"][idx]), centroids[torch.tensor(data["codes"][idx])])
        return F.binary_cross_entropy_with_logits(
            logits,
            torch.tensor(data["targets"][idx]),
            weight=torch.tensor(data["weights"][idx]),
            pos_weight=pos_weight,
        )

    run_epochs(spec, model, opt, len(data["states"]), batch_loss, rank, world)


class _AutoencoderReconstruction(PatchAutoencoder):
    """PatchAutoencoder whose forward is the reconstruction: DDP only syncs the gradients of
    what goes through forward, and the loss needs the decoder. Same state_dict keys."""

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.reconstruct(patches)  # (N, F) normalised features, (N, F) reconstruction


def autoencoder_loop(config: dict) -> None:
    """S2 front end: PatchAutoencoder, MSE between normalised log-mel features and their
    reconstruction. The normalisation is fitted by the driver and only loaded here."""
    import ray.train.torch

    rank, world = worker_setup(config)
    spec: StageSpec = config["spec"]
    data = ray.get(config["data_ref"])  # patches (M, P) float32
    model = _AutoencoderReconstruction(config["model_config"])
    norm = config["normalisation"]  # {"mean": (F,), "std": (F,)} float32
    model.set_normalisation(torch.as_tensor(norm["mean"]), torch.as_tensor(norm["std"]))
    model = _prepare(model)  # after the buffers are set: DDP broadcasts rank 0's buffers
    device = ray.train.torch.get_device()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=1e-4)

    def batch_loss(idx: np.ndarray) -> torch.Tensor:
        x = torch.tensor(data["patches"][idx]).to(device)  # (B, P)
        # random gain: the code must describe spectral shape at any level, not one level
        x = x * torch.empty(len(idx), 1, device=device).uniform_(0.3, 1.5)
        features, reconstruction = model(x)
        return F.mse_loss(reconstruction, features)

    run_epochs(spec, model, opt, len(data["patches"]), batch_loss, rank, world)
