"""S3 side by side (Verma & Berger 2021): wavelet pooling vs none vs a CNN, and the filterbank.

On the same corpus and split as the other experiments, along the product's
own path (raw 25 ms patches -> learned front end -> codes -> code LM):
1. the learned front end (``fit_front_end``), whose first layer is then read
   as a filterbank: each neuron's dominant frequency, against linear and mel;
2. k-means and the code LM, as ``soundfleet train`` does;
3. the scene classifier twice on the same windows, with S3's wavelet
   multi-scale pooling between its Transformer layers and without it (same
   parameters: the pooling has none), scored by mAP on held-out windows;
4. a CNN on the windows' log-mel images with at least as many parameters as
   the code LM and the classifier together, on the same targets.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from shared_models.code_transformer import CodeTransformerConfig
from shared_models.codebook import kmeans, nearest_code
from shared_models.constants import SAMPLE_RATE_HZ
from shared_models.detector import classify_windows
from shared_models.frontend import FrontEndConfig
from shared_models.param_count import count_parameters
from shared_models.scene_classifier import SceneClassifierConfig
from soundfleet.config import TrainConfig
from training.dataset import FramedClip
from training.evaluate import average_precision, window_metrics
from training.filterbank import dominant_frequencies_hz, filterbank_summary
from training.log_mel_cnn import fit_cnn
from training.pipeline import (
    TRAIN_WINDOW_STRIDE,
    fit_classifier,
    fit_code_lm,
    fit_front_end,
    window_inputs,
    window_spans,
)
from training.ray_stage import StageSpec

log = logging.getLogger(__name__)


@dataclass
class S3Experiment:
    frontend_hidden: int = 256  # the paper's 2000 is the GPU config
    frontend_epochs: int = 12
    codebook_size: int = 256
    code_lm_epochs: int = 8
    classifier_layers: int = 3  # pooling acts between layers: one layer would leave little to compare
    classifier_epochs: int = 8
    cnn_epochs: int = 8
    cnn_blocks: int = 4  # 4 blocks reach the parameter target at width 16: 3x cheaper than 3 blocks at 31


def run_s3(
    clips: list[FramedClip],
    labels: tuple[str, ...],
    train_idx: list[int],
    test_idx: list[int],
    exp: S3Experiment,
    cfg: TrainConfig,
    run: dict[str, Any],
) -> dict[str, Any]:
    train = [clips[i] for i in train_idx]
    test = [clips[i] for i in test_idx]
    results: dict[str, Any] = {"experiment": dataclasses.asdict(exp)}
    stage_cfg = dataclasses.replace(
        cfg, frontend_epochs=exp.frontend_epochs, code_lm_epochs=exp.code_lm_epochs, classifier_epochs=exp.classifier_epochs
    )

    # 1. front end and its filterbank
    started = time.monotonic()
    fe_config = FrontEndConfig(hidden_dim=exp.frontend_hidden)
    front_end, _ = fit_front_end(train, fe_config, stage_cfg, run, name="s3_frontend")
    weights = front_end.fc1.weight.detach().numpy()[:, : fe_config.patch_samples]  # (H, 400): drop the level input
    freqs_hz = dominant_frequencies_hz(weights, SAMPLE_RATE_HZ)
    results["filterbank"] = {"dominant_frequencies_hz": np.sort(freqs_hz).tolist(), **filterbank_summary(freqs_hz)}
    results["front_end"] = {"parameters": count_parameters(front_end), "wall_s": round(time.monotonic() - started, 1)}

    # 2. codes and the code LM, as the product trains them
    with torch.no_grad():
        embeddings = [front_end(torch.tensor(c.patches)) for c in clips]
    centroids = kmeans(torch.cat([embeddings[i] for i in train_idx]), exp.codebook_size, seed=cfg.seed)
    codes = [nearest_code(e, centroids) for e in embeddings]
    code_lm, _ = fit_code_lm(
        [codes[i] for i in train_idx], CodeTransformerConfig(vocab_size=exp.codebook_size), stage_cfg, run, name="s3_code_lm"
    )
    W = SceneClassifierConfig().window_frames
    train_win = window_inputs(train, [codes[i] for i in train_idx], code_lm, W, TRAIN_WINDOW_STRIDE)
    test_win = window_inputs(test, [codes[i] for i in test_idx], code_lm, W, W)

    # 3. the same classifier with and without wavelet pooling
    results["classifiers"] = {}
    for pooling in ("wavelet", "meanmax"):
        started = time.monotonic()
        cls_config = SceneClassifierConfig(
            lm_dim=code_lm.config.d_model,
            embedding_dim=fe_config.embedding_dim,
            num_labels=len(labels),
            n_layers=exp.classifier_layers,
            pooling=pooling,
        )
        classifier, _ = fit_classifier(train_win, centroids, cls_config, stage_cfg, run, name=f"s3_classifier_{pooling}")
        probs = classify_windows(classifier, centroids, torch.tensor(test_win["states"]), torch.tensor(test_win["codes"]))
        results["classifiers"][pooling] = {
            **_scores(probs.numpy(), test_win, labels),
            "parameters": count_parameters(classifier),
            "parameters_with_code_lm": count_parameters(classifier) + count_parameters(code_lm),
            "wall_s": round(time.monotonic() - started, 1),
        }

    # 4. the CNN on log-mel images of the same windows
    results["classifiers"]["cnn"] = _cnn(
        clips, train_idx, test_idx, train_win, test_win, labels, results["classifiers"]["wavelet"]["parameters_with_code_lm"], exp, cfg, run
    )
    return results


def _scores(probs: np.ndarray, windows: dict[str, np.ndarray], labels: tuple[str, ...]) -> dict[str, Any]:
    ap = average_precision(probs, windows["targets"], windows["weights"], labels)
    f1 = window_metrics(probs, windows["targets"], windows["weights"], labels)
    return {"mAP": ap["mean"], "AP": ap["per_label"], "macro_f1_at_0.5": f1["macro_f1"], "test_windows": len(probs)}


def _cnn(clips, train_idx, test_idx, train_win, test_win, labels, min_parameters, exp, cfg, run) -> dict[str, Any]:
    started = time.monotonic()
    W = SceneClassifierConfig().window_frames
    train, test = [clips[i] for i in train_idx], [clips[i] for i in test_idx]
    cnn = fit_cnn(train, window_spans(train, W, TRAIN_WINDOW_STRIDE), train_win["targets"], train_win["weights"], W,
                  min_parameters, StageSpec("s3_cnn", exp.cnn_epochs, 1e-3, 64, cfg.seed, cfg.checkpoint_every), run,
                  n_blocks=exp.cnn_blocks)
    probs = cnn.window_probabilities(test, window_spans(test, W, W), W)
    return {
        **_scores(probs, test_win, labels),
        "parameters": count_parameters(cnn.model),
        "width": cnn.model.config.width,
        "wall_s": round(time.monotonic() - started, 1),
    }
