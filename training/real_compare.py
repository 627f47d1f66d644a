"""The real-audio comparisons: the product's path against a log-mel CNN, and what label-free
pretraining buys, both on the real corpus's test split.

For a bundle trained by ``soundfleet train`` (its manifest names the data and the config):

1. **a log-mel CNN baseline** (``training.log_mel_cnn``) on exactly the clips the bundle's
   classifier trained on (``pipeline.prepare_data`` with the bundle's config: same split,
   same augmentation mixtures), the same windows, targets and loss weights, with at least
   as many parameters as the bundle's code LM and classifier together;
2. **the pretraining ablation**: the same ``soundfleet train`` with the other
   ``train.pretrain_on`` (the shipped ``all`` lets the front end, the codebook and the code
   LM learn from every training clip, labelled or not; ``labelled`` keeps them to the
   labelled ones), then the same evaluation as the bundle's own (``training.eval``).

Window mAP is over the windows ``soundfleet eval`` scores (one per second of every test
clip), so the three numbers compare like with like.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from shared_models import bundle
from shared_models.detector import load_cloud_models
from shared_models.param_count import count_parameters
from shared_models.scene_classifier import SceneClassifierConfig
from soundfleet.config import CloudConfig, TrainConfig
from training.dataset import load_framed
from training.eval import evaluate_bundle
from training.evaluate import average_precision
from training.log_mel_cnn import fit_cnn
from training.pipeline import (
    TRAIN_WINDOW_STRIDE,
    WEAK_WINDOW_STRIDE,
    TrainingData,
    prepare_data,
    span_targets,
    train_all,
    window_spans,
)
from training.ray_stage import StageSpec, run_directory
from training.sources import load_dataset

log = logging.getLogger(__name__)

CNN_EPOCHS = 8  # as S3's comparison: the classifier trains 6, the CNN gets more, not fewer


class CompareError(ValueError):
    """The bundle cannot be retrained: no training record, or its data is not here as it was."""


def bundle_training(bundle_dir: Path) -> tuple[list[Path], TrainConfig, dict[str, Any]]:
    """(data directories, train config, manifest) of a bundle ``soundfleet train`` wrote."""
    manifest = bundle.load_manifest(Path(bundle_dir))
    training = manifest.get("training") or {}
    if not training.get("data_dir") or not isinstance(training.get("config"), dict):
        raise CompareError(f"{bundle_dir}: the manifest has no training record (data_dir, config) to train baselines on")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    # a bundle trained before the split by source had its clips split one by one
    cfg = TrainConfig(**{"split_by_source": False, **{k: v for k, v in training["config"].items() if k in known}})
    cfg.validate()
    return [Path(d) for d in training["data_dir"].split(",")], cfg, manifest


def bundle_data(bundle_dir: Path) -> tuple[TrainingData, TrainConfig, dict[str, Any]]:
    """The bundle's training data, prepared (framed, split, augmented) exactly as its training
    run did, after checking it is the same data (sha256); (data, config, manifest)."""
    data_dirs, cfg, manifest = bundle_training(bundle_dir)
    data = prepare_data(data_dirs, cfg)
    if data.dataset.data_sha256 != manifest["training"].get("data_sha256"):
        raise CompareError(f"{', '.join(map(str, data_dirs))}: not the data {manifest['model_version']} was trained on "
                           f"(sha256 {data.dataset.data_sha256[:16]}, the manifest says "
                           f"{str(manifest['training'].get('data_sha256'))[:16]}): rebuild it with the bundle's commands")
    return data, cfg, manifest


def run_comparison(bundle_dir: Path, test_dir: Path, work_dir: Path, cloud_config: CloudConfig | None = None) -> dict[str, Any]:
    """Train the CNN baseline and the pretraining ablation for ``bundle_dir``; score both on
    ``test_dir`` (the real test split). Checkpoints and the ablation bundle go under ``work_dir``."""
    import ray

    started = time.monotonic()
    data, cfg, manifest = bundle_data(bundle_dir)
    data_dirs, labels = data.data_dirs, tuple(manifest["labels"])
    if data.dataset.labels != labels:
        raise CompareError(f"the data's labels {data.dataset.labels} are not the bundle's {labels}")
    work_dir = Path(work_dir)
    storage = run_directory(work_dir / "ray", False)
    cfg = dataclasses.replace(cfg, storage_path=str(storage))
    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    run = dict(workers=cfg.workers, storage_path=storage, use_gpu=None if cfg.use_gpu == "auto" else cfg.use_gpu == "true")
    W = SceneClassifierConfig().window_frames

    # 1. the CNN on the bundle's own training clips
    train = [data.framed[i] for i in data.train_idx]
    spans = window_spans(train, W, TRAIN_WINDOW_STRIDE, WEAK_WINDOW_STRIDE)
    targets, weights = span_targets(train, spans, W)
    _, code_lm, classifier, _ = load_cloud_models(Path(bundle_dir))
    product_parameters = count_parameters(code_lm) + count_parameters(classifier)
    log.info("log-mel CNN baseline: %d training windows, at least %d parameters", len(spans), product_parameters)
    cnn = fit_cnn(train, spans, targets, weights, W, product_parameters,
                  StageSpec("real_cnn", CNN_EPOCHS, 1e-3, 64, cfg.seed, cfg.checkpoint_every), run)
    del data, train
    test = load_framed(load_dataset(Path(test_dir)).clips, labels)  # as soundfleet eval frames them
    test_spans = window_spans(test, W, W)
    test_targets, test_weights = span_targets(test, test_spans, W)
    ap = average_precision(cnn.window_probabilities(test, test_spans, W), test_targets, test_weights, labels)
    results: dict[str, Any] = {"cnn": {
        "mAP": ap["mean"], "AP": ap["per_label"], "windows": len(test_spans),
        "parameters": count_parameters(cnn.model), "width": cnn.model.config.width,
        "product_parameters": product_parameters, "epochs": CNN_EPOCHS,
        "wall_s": round(time.monotonic() - started, 1)}}
    log.info("log-mel CNN: mAP %.3f on %d real test windows", ap["mean"], len(test_spans))

    # 2. the same training with the other pretraining set
    started = time.monotonic()
    other = "labelled" if cfg.pretrain_on == "all" else "all"
    ablation_dir = work_dir / f"bundle-pretrain-{other}"
    train_all(data_dirs, ablation_dir, dataclasses.replace(cfg, pretrain_on=other),
              command=f"{manifest['training'].get('command', 'soundfleet train')} --pretrain-on {other}")
    evaluation = evaluate_bundle(ablation_dir, Path(test_dir), cloud_config)
    ablation_manifest = bundle.load_manifest(ablation_dir)
    results["pretraining"] = {
        "bundle": {"pretrain_on": cfg.pretrain_on,
                   "pretraining_clips": manifest["training"].get("pretraining_clips")},
        "ablation": {"pretrain_on": other, "model_version": evaluation["model_version"],
                     "pretraining_clips": ablation_manifest["training"]["pretraining_clips"],
                     "mAP": evaluation["metrics"]["mAP"]["mean"], "AP": evaluation["metrics"]["mAP"]["per_label"],
                     "macro_f1": evaluation["metrics"]["macro_f1"],
                     "false_events_per_24h": evaluation["events"]["negative_pool"]["false_events_per_24h"],
                     "recall": {k: v["recall"] for k, v in evaluation["events"]["recall"].items()},
                     "wall_s": round(time.monotonic() - started, 1)},
    }
    log.info("pretraining ablation (%s): mAP %.3f", other, results["pretraining"]["ablation"]["mAP"])
    return results
