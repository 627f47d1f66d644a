"""S2 side by side (Verma & Smith 2020): code-LM linear probe vs supervised vs contrastive, and K.

On one corpus and one clip split:
1. the spectrogram-patch autoencoder (log-mel patches -> 3 FC layers -> 64-d);
2. for each codebook size K: k-means over the training embeddings, a code LM
   trained to predict the next code (no labels), and a linear probe on its
   hidden states, mean-pooled over each 1 s window;
3. the fully supervised baseline: the same-size Transformer over the same
   log-mel patches, trained end to end on the labels;
4. the contrastive baseline: that Transformer trained with SimCLR's NT-Xent
   on two augmented views of each window, then the same linear probe.
Every trained model goes through Ray Train; the probe is the evaluation.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from shared_models.autoencoder import AutoencoderConfig
from shared_models.code_transformer import CodeTransformerConfig
from shared_models.codebook import kmeans, nearest_code
from shared_models.constants import FRAMES_PER_SECOND
from shared_models.param_count import count_parameters
from shared_models.patch_transformer import (
    ContrastiveEncoder,
    PatchTransformerConfig,
    SupervisedPatchClassifier,
)
from soundfleet.config import TrainConfig
from training import baseline_stages
from training.autoencoder_stage import fit_autoencoder
from training.dataset import FramedClip
from training.pipeline import fit_code_lm, window_inputs
from training.probe import (
    BACKGROUND,
    SKIP,
    class_scores,
    linear_probe,
    window_classes,
    window_starts,
)
from training.ray_stage import StageSpec, fit_stage

log = logging.getLogger(__name__)

WINDOW = FRAMES_PER_SECOND  # 1 s windows, as the scene classifier


@dataclass
class S2Experiment:
    codebook_sizes: tuple[int, ...] = (16, 64, 256, 1024)
    autoencoder_epochs: int = 8
    code_lm_epochs: int = 8
    supervised_epochs: int = 12
    contrastive_epochs: int = 12
    train_stride_frames: int = 10  # windows for supervised / contrastive training: 250 ms apart
    temperature: float = 0.2
    kmeans_minibatch_from_k: int = 256  # mini-batch k-means for K at or above this


def run_s2(
    clips: list[FramedClip],
    labels: tuple[str, ...],
    train_idx: list[int],
    test_idx: list[int],
    exp: S2Experiment,
    cfg: TrainConfig,
    run: dict[str, Any],
) -> dict[str, Any]:
    """Train every S2 model on ``train_idx`` clips and score each on ``test_idx`` windows."""
    train = [clips[i] for i in train_idx]
    test = [clips[i] for i in test_idx]
    class_names = [*labels, BACKGROUND]
    train_y = window_classes(train, WINDOW, WINDOW)
    test_y = window_classes(test, WINDOW, WINDOW)
    results: dict[str, Any] = {"classes": class_names, "experiment": dataclasses.asdict(exp)}

    # 1. autoencoder
    started = time.monotonic()
    ae_config = AutoencoderConfig()
    spec = StageSpec("s2_autoencoder", exp.autoencoder_epochs, 2e-3, 256, cfg.seed, cfg.checkpoint_every)
    autoencoder, _ = fit_autoencoder(np.concatenate([c.patches for c in train]), ae_config, spec, run)
    with torch.no_grad():
        features = [autoencoder.reconstruct(torch.tensor(c.patches))[0] for c in clips]  # (N_i, F) each
        embeddings = [autoencoder(torch.tensor(c.patches)) for c in clips]  # (N_i, 64) each
        recon = [autoencoder.reconstruct(torch.tensor(c.patches)) for c in test]
    results["autoencoder"] = {
        "parameters": count_parameters(autoencoder),
        "test_reconstruction_mse": round(float(torch.cat([(r - f).pow(2).mean(1) for f, r in recon]).mean()), 4),
        "wall_s": round(time.monotonic() - started, 1),
    }

    # 2. codebook size sweep: k-means -> code LM -> linear probe on its states
    results["code_lm_probe"] = {}
    train_emb = torch.cat([embeddings[i] for i in train_idx])
    for k in exp.codebook_sizes:
        results["code_lm_probe"][k] = _code_lm_probe(
            k, train_emb, embeddings, clips, train_idx, test_idx, train_y, test_y, len(class_names), exp, cfg, run
        )

    # 3 + 4. baselines over the same log-mel patches, sized like the code LM
    enc_config = PatchTransformerConfig(feature_dim=ae_config.feature_dim)
    train_features = [features[i].numpy() for i in train_idx]
    starts = window_starts(train, WINDOW, exp.train_stride_frames)
    classes = window_classes(train, WINDOW, exp.train_stride_frames)
    results["supervised"] = _supervised(enc_config, train_features, starts, classes, features, test_idx, test_y, class_names, exp, cfg, run)
    results["contrastive"] = _contrastive(
        enc_config, ae_config, train_features, starts, features, train_idx, test_idx, train_y, test_y, class_names, exp, cfg, run
    )
    return results


def _code_lm_probe(k, train_emb, embeddings, clips, train_idx, test_idx, train_y, test_y, n_classes, exp, cfg, run):
    started = time.monotonic()
    minibatch = (cfg.kmeans_minibatch or 4096) if k >= exp.kmeans_minibatch_from_k else None
    centroids = kmeans(train_emb, k, seed=cfg.seed, minibatch=minibatch)
    codes = [nearest_code(e, centroids) for e in embeddings]
    used = int((torch.bincount(torch.cat([codes[i] for i in train_idx]), minlength=k) > 0).sum())
    lm_config = CodeTransformerConfig(vocab_size=k)
    lm_cfg = dataclasses.replace(cfg, code_lm_epochs=exp.code_lm_epochs)
    code_lm, state = fit_code_lm([codes[i] for i in train_idx], lm_config, lm_cfg, run, name=f"s2_code_lm_k{k}")

    def states(idx: list[int]) -> np.ndarray:
        win = window_inputs([clips[i] for i in idx], [codes[i] for i in idx], code_lm, WINDOW, WINDOW)
        return win["states"].mean(axis=1)  # (M, C): mean over the window's frames

    scores = linear_probe(states(train_idx), train_y, states(test_idx), test_y, n_classes)
    log.info("S2 K=%d: probe accuracy %.3f (balanced %.3f), %d codes used", k, scores["accuracy"], scores["balanced_accuracy"], used)
    return {
        **scores,
        "codes_used": used,
        "code_lm_parameters": count_parameters(code_lm),
        "code_lm_final_loss": round(state["final_metrics"]["loss"], 4),
        "wall_s": round(time.monotonic() - started, 1),
    }


def _supervised(enc_config, train_features, starts, classes, features, test_idx, test_y, class_names, exp, cfg, run):
    started = time.monotonic()
    keep = classes != SKIP
    name = "s2_supervised"
    state = fit_stage(
        name,
        baseline_stages.supervised_loop,
        {
            "spec": StageSpec(name, exp.supervised_epochs, 1e-3, 64, cfg.seed, cfg.checkpoint_every),
            "model_config": enc_config,
            "num_classes": len(class_names),
            "data_ref": ray.put({"clip_features": train_features, "windows": starts[keep], "classes": classes[keep]}),
        },
        **run,
    )
    model = SupervisedPatchClassifier(enc_config, len(class_names))
    model.load_state_dict(state["model"])
    model.eval()
    with torch.no_grad():
        test_windows = _windows([features[i] for i in test_idx])
        pred = torch.cat([model(test_windows[i : i + 512]) for i in range(0, len(test_windows), 512)]).argmax(-1).numpy()
    keep_test = test_y != SKIP
    scores = class_scores(pred[keep_test], test_y[keep_test])
    log.info("S2 supervised: accuracy %.3f (balanced %.3f)", scores["accuracy"], scores["balanced_accuracy"])
    return {**scores, "parameters": count_parameters(model), "wall_s": round(time.monotonic() - started, 1)}


def _contrastive(enc_config, ae_config, train_features, starts, features, train_idx, test_idx, train_y, test_y, class_names, exp, cfg, run):
    started = time.monotonic()
    name = "s2_contrastive"
    state = fit_stage(
        name,
        baseline_stages.contrastive_loop,
        {
            "spec": StageSpec(name, exp.contrastive_epochs, 1e-3, 128, cfg.seed, cfg.checkpoint_every),
            "model_config": enc_config,
            "n_mels": ae_config.n_mels,
            "temperature": exp.temperature,
            "data_ref": ray.put({"clip_features": train_features, "windows": starts}),
        },
        **run,
    )
    model = ContrastiveEncoder(enc_config)
    model.load_state_dict(state["model"])
    model.eval()

    def pooled(idx: list[int]) -> np.ndarray:
        windows = _windows([features[i] for i in idx])
        with torch.no_grad():
            return torch.cat([model.encoder.pooled(windows[i : i + 512]) for i in range(0, len(windows), 512)]).numpy()

    scores = linear_probe(pooled(train_idx), train_y, pooled(test_idx), test_y, len(class_names))
    log.info("S2 contrastive: probe accuracy %.3f (balanced %.3f)", scores["accuracy"], scores["balanced_accuracy"])
    return {**scores, "parameters": count_parameters(model.encoder), "wall_s": round(time.monotonic() - started, 1)}


def _windows(per_clip: list[torch.Tensor]) -> torch.Tensor:
    """Non-overlapping 1 s windows of per-frame features, in ``window_classes`` order: (M, W, F)."""
    return torch.stack([f[end - WINDOW : end] for f in per_clip for end in range(WINDOW, len(f) + 1, WINDOW)])
