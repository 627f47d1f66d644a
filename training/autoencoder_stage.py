"""Driver of the S2 front-end stage: fit the normalisation, train the autoencoder with Ray Train.

The per-feature normalisation is fitted here, once, on (a subsample of) the
training patches, and handed to every worker, so all workers and the shipped
model standardise the same way. The worker loop is
:func:`training.stages.autoencoder_loop`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import ray
import torch

from shared_models.autoencoder import AutoencoderConfig, PatchAutoencoder
from training import stages
from training.ray_stage import StageSpec, fit_stage

log = logging.getLogger(__name__)

NORMALISATION_PATCHES = 200_000
"""At most this many random training patches (83 minutes of audio) set the mean/std."""

EVAL_PATCHES = 20_000  # patches the final reconstruction loss is logged on
FEATURE_BATCH = 65_536  # patches per log-mel batch while fitting the normalisation


def fit_normalisation(
    patches: np.ndarray, config: AutoencoderConfig, seed: int = 0
) -> dict[str, np.ndarray]:
    """Per-feature mean/std of the raw log-mel features: {"mean": (F,), "std": (F,)} float32."""
    rng = np.random.default_rng(seed)
    if len(patches) > NORMALISATION_PATCHES:
        patches = patches[np.sort(rng.choice(len(patches), NORMALISATION_PATCHES, replace=False))]
    model = PatchAutoencoder(config)
    with torch.no_grad():
        features = torch.cat(
            [
                model.features(torch.as_tensor(patches[i : i + FEATURE_BATCH], dtype=torch.float32))
                for i in range(0, len(patches), FEATURE_BATCH)
            ]
        )  # (n, F)
    model.fit_normalisation(features)
    return {"mean": model.feature_mean.numpy().copy(), "std": model.feature_std.numpy().copy()}


def fit_autoencoder(
    patches: np.ndarray, config: AutoencoderConfig, spec: StageSpec, run: dict[str, Any]
) -> tuple[PatchAutoencoder, dict[str, Any]]:
    """Train the S2 autoencoder on ``patches`` (M, patch_samples) float32.

    Returns the model in eval mode and the stage's final state (epoch, starts, metrics),
    like the other ``fit_*`` stage drivers.

    ``run`` holds :func:`~training.ray_stage.fit_stage`'s keyword arguments
    (workers, storage_path, use_gpu). The stage's checkpoints are named after
    ``spec.name``.
    """
    patches = np.ascontiguousarray(patches, dtype=np.float32)
    if patches.ndim != 2 or patches.shape[1] != config.patch_samples:
        raise ValueError(f"patches must be (M, {config.patch_samples}), got {patches.shape}")
    normalisation = fit_normalisation(patches, config, spec.seed)
    state = fit_stage(
        spec.name,
        stages.autoencoder_loop,
        {
            "spec": spec,
            "model_config": config,
            "normalisation": normalisation,
            "data_ref": ray.put({"patches": patches}),
        },
        **run,
    )
    model = PatchAutoencoder(config)
    model.load_state_dict({k.removeprefix("module."): v for k, v in state["model"].items()})
    model.eval()
    loss = reconstruction_loss(model, patches[:EVAL_PATCHES])
    log.info("autoencoder: final reconstruction loss %.4f (normalised log-mel MSE)", loss)
    return model, state


def reconstruction_loss(model: PatchAutoencoder, patches: np.ndarray) -> float:
    """Mean reconstruction MSE of ``model`` on ``patches`` (M, P), as the training loss
    without the gain augmentation."""
    with torch.no_grad():
        return float(model.reconstruction_loss(torch.as_tensor(patches, dtype=torch.float32)))
