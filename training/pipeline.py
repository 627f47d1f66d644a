"""`soundfleet train`: front end -> codebook -> code LM -> classifier -> export.

Each gradient-trained stage runs through Ray Train (see ``ray_stage``); k-means
and the feature passes between stages run on the driver. The result is a
self-describing bundle (see ``shared_models.bundle``) plus metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cloud.events import label_policies
from shared_models.autoencoder import AutoencoderConfig
from shared_models.code_transformer import CodeTransformer, CodeTransformerConfig
from shared_models.codebook import EdgeEncoder, codebook_id, kmeans, nearest_code
from shared_models.constants import FRAMES_PER_SECOND, PATCH_SAMPLES, SAMPLE_RATE_HZ
from shared_models.detector import classify_windows, lm_window_states
from shared_models.frontend import FrontEndConfig, LearnedFrontEnd
from shared_models.scene_classifier import SceneClassifier, SceneClassifierConfig
from soundfleet.config import CloudConfig, TrainConfig
from training import stages
from training.augment import augment_clips
from training.autoencoder_stage import fit_autoencoder
from training.dataset import FramedClip, clip_source, load_framed, split_clips, window_targets
from training.eval_events import ScoredClip, calibrate_event_thresholds, window_probabilities
from training.evaluate import average_precision, window_metrics
from training.export import write_bundle
from training.ray_stage import StageSpec, fit_stage, run_directory
from training.sources import Dataset, load_datasets

log = logging.getLogger(__name__)

SEGMENT_FRAMES = 2 * FRAMES_PER_SECOND  # front-end training segments: 2 s
TRAIN_WINDOW_STRIDE = 8  # frames between classifier training windows (200 ms) ...
WEAK_WINDOW_STRIDE = 40  # ... but 1 s in weakly labelled clips: each window has the same label anyway
FRONTEND_MAX_SEGMENTS = 16_000  # 2 s front-end training segments at most (2 GB of float32)


def train_all(
    data_dir: Path | Sequence[Path], out_dir: Path, cfg: TrainConfig, command: str = "", resume: bool = False
) -> dict[str, Any]:
    """Train every model on the dataset(s) at ``data_dir`` and write a bundle to ``out_dir``.

    Several datasets (the synthetic corpus and a real one) are trained on together. With
    ``resume``, every stage continues from the latest checkpoint of the latest earlier run
    under the same storage path (finished stages are not redone).
    """
    import ray

    started = time.monotonic()
    out_dir = Path(out_dir)
    storage = run_directory(Path(cfg.storage_path or out_dir / "ray_runs"), resume)
    log.info("%s training run %s", "resuming" if resume else "starting", storage)
    data = prepare_data(data_dir, cfg)
    dataset, labels, framed = data.dataset, data.dataset.labels, data.framed
    train_idx, val_idx, hold_idx, augmented = data.train_idx, data.val_idx, data.hold_idx, data.augmented
    window_frames = SceneClassifierConfig().window_frames
    if not ray.is_initialized():
        # the dashboard hosts the State API that Ray Train v2 polls; without it Train logs a warning a second
        ray.init(log_to_driver=True)
    use_gpu = None if cfg.use_gpu == "auto" else cfg.use_gpu == "true"
    run = dict(workers=cfg.workers, storage_path=storage, use_gpu=use_gpu)
    torch.manual_seed(cfg.seed)

    # 1. front end: S3 dense layers on raw patches, or the S2 log-mel patch autoencoder. It,
    #    the codebook and the code LM learn from the pretraining clips (every training clip,
    #    or only the labelled ones: the ablation of label-free pretraining)
    pre_idx = pretraining_clips(framed, train_idx, cfg.pretrain_on)
    log.info("pretraining (front end, codebook, code LM) on %d of %d training clips (%s)",
             len(pre_idx), len(train_idx), cfg.pretrain_on)
    train_clips = [framed[i] for i in pre_idx]
    if cfg.frontend == "autoencoder":
        fe_config = AutoencoderConfig()
        spec = StageSpec("frontend", cfg.frontend_epochs, 2e-3, 256, cfg.seed, cfg.checkpoint_every)
        front_end, fe_state = fit_autoencoder(np.concatenate([c.patches for c in train_clips]), fe_config, spec, run)
    else:
        fe_config = FrontEndConfig(hidden_dim=cfg.frontend_hidden)
        front_end, fe_state = fit_front_end(train_clips, fe_config, cfg, run)

    # 2. codebook: k-means over the training clips' embeddings
    with torch.no_grad():
        embeddings = [front_end(torch.tensor(c.patches)) for c in framed]
    train_emb = torch.cat([embeddings[i] for i in pre_idx])
    log.info("k-means: K=%d over %d embeddings", cfg.codebook_size, len(train_emb))
    centroids = kmeans(train_emb, cfg.codebook_size, seed=cfg.seed, minibatch=cfg.kmeans_minibatch or None)
    codes = [nearest_code(e, centroids) for e in embeddings]
    usage = torch.bincount(torch.cat(codes), minlength=cfg.codebook_size)
    log.info("codebook: %d of %d codes used", int((usage > 0).sum()), cfg.codebook_size)

    # 3. code LM
    lm_config = CodeTransformerConfig(vocab_size=cfg.codebook_size)
    code_lm, lm_state = fit_code_lm([codes[i] for i in pre_idx], lm_config, cfg, run)

    # 4. classifier on code-LM states of 1 s windows
    cls_config = SceneClassifierConfig(
        lm_dim=lm_config.d_model,
        embedding_dim=fe_config.embedding_dim,
        num_labels=len(labels),
        pooling=cfg.classifier_pooling,
    )
    W = cls_config.window_frames
    assert W == window_frames, "clips were padded to the default window"
    train_windows = window_inputs([framed[i] for i in train_idx], [codes[i] for i in train_idx], code_lm, W, TRAIN_WINDOW_STRIDE,
                                  WEAK_WINDOW_STRIDE)
    classifier, cls_state = fit_classifier(train_windows, centroids, cls_config, cfg, run)

    # 5. per-label on-thresholds for the false-alarm budget, by the live event logic over the
    #    validation clips' windows (one decision per second, as the ingest makes them)
    scored = [scored_clip(framed[i], codes[i], labels, code_lm, classifier, centroids) for i in val_idx]
    thresholds, min_windows, calibration = calibrate_event_thresholds(
        scored, labels, label_policies(CloudConfig(), {"labels": labels}), W, cfg.false_events_per_24h,
        min_windows=tuple(range(1, cfg.calibration_max_min_windows + 1)))
    log.info("thresholds (min windows) for %.1f false events per 24 h over %.2f h of validation negatives: %s",
             cfg.false_events_per_24h, calibration["pool_hours"],
             {label: f"{thresholds[label]} ({min_windows[label]})" for label in labels})

    # 6. held-out window metrics at those thresholds: all test clips, then the synthetic and
    #    the real (weakly labelled) ones apart
    def held_out(idx: list[int]) -> dict[str, Any]:
        win = window_inputs([framed[i] for i in idx], [codes[i] for i in idx], code_lm, W, W)
        probs = classify_windows(classifier, centroids, torch.tensor(win["states"]), torch.tensor(win["codes"])).numpy()
        out = window_metrics(probs, win["targets"], win["weights"], labels, thresholds)
        out["mAP"] = average_precision(probs, win["targets"], win["weights"], labels)["mean"]
        return out

    metrics = held_out(hold_idx)
    for name, weak in (("synthetic", False), ("real", True)):
        part = [i for i in hold_idx if framed[i].weak == weak]
        if part and len(part) < len(hold_idx):
            metrics[name] = held_out(part)
    log.info("held-out macro-F1 %.3f, mAP %.3f over %d windows", metrics["macro_f1"], metrics["mAP"], metrics["windows"])

    # 7. export
    cb_id = codebook_id(centroids.numpy())
    manifest = {
        "model_version": f"sf1-{cb_id:08x}",
        "codebook_id": cb_id,
        "codebook_size": cfg.codebook_size,
        "sample_rate_hz": SAMPLE_RATE_HZ,
        "labels": list(labels),
        "thresholds": thresholds,
        "min_windows": min_windows,  # per label: consecutive 1 s windows before an event starts
        "frontend": cfg.frontend,  # shared_models.frontends kind; rebuild with build_front_end
        "frontend_config": dataclasses.asdict(fe_config),
        "code_lm_config": dataclasses.asdict(lm_config),
        "classifier_config": dataclasses.asdict(cls_config),
        "training": {
            "command": command,
            "seed": cfg.seed,
            "config": dataclasses.asdict(cfg),
            "data_dir": ",".join(map(str, data.data_dirs)),
            "data_layout": dataset.layout,
            "data_sha256": dataset.data_sha256,
            "clips": {"train": len(train_idx), "validation": len(val_idx), "test": len(hold_idx)},
            # of the training clips, how many the front end, codebook and code LM learn from
            "pretraining_clips": len(pre_idx),
            "mixtures": augmented,  # of those clips, how many are augmentation mixtures
            "codes_used": int((usage > 0).sum()),
            "metrics": metrics,
            "calibration": calibration,
            "run_dir": str(storage),
            # epochs at which each stage (re)started: [0] for an uninterrupted stage
            "stages": {name: {"epochs": st["epoch"], "starts": st["starts"]}
                       for name, st in (("frontend", fe_state), ("code_lm", lm_state), ("classifier", cls_state))},
            "wall_time_s": round(time.monotonic() - started, 1),
            "machine": f"{platform.machine()} {platform.system()}, {torch.get_num_threads()} torch threads, "
            f"python {platform.python_version()}, torch {torch.__version__}",
        },
    }
    # the front end's torch weights ride along: parity checks and cloud-side audio use them
    cloud_state = {"frontend": front_end.state_dict(), "code_lm": code_lm.state_dict(), "classifier": classifier.state_dict()}
    return write_bundle(out_dir, EdgeEncoder(front_end, centroids), centroids.numpy(), cloud_state, manifest)


@dataclasses.dataclass
class TrainingData:
    """What every model of one training run learns from: the clips, framed, and three disjoint
    index sets into them (augmentation mixtures appended to train and validation)."""

    data_dirs: list[Path]
    dataset: Dataset
    framed: list[FramedClip]
    train_idx: list[int]
    val_idx: list[int]
    hold_idx: list[int]
    augmented: dict[str, int]


def prepare_data(data_dir: Path | Sequence[Path], cfg: TrainConfig) -> TrainingData:
    """Load the dataset(s), frame every clip (short ones padded to one classifier window),
    split train / validation / held-out test, and add the augmentation mixtures of real
    events into real negatives within train and validation (no clip crosses a split).

    Deterministic for a config's seed: a baseline trained on ``prepare_data``'s output sees
    exactly the clips ``train_all`` trained the bundle on.
    """
    data_dirs = [Path(data_dir)] if isinstance(data_dir, str | Path) else [Path(d) for d in data_dir]
    dataset = load_datasets(data_dirs)
    labels = dataset.labels
    framed = load_framed(dataset.clips, labels, min_frames=SceneClassifierConfig().window_frames)
    # three disjoint clip sets: train, validation (threshold calibration), held-out test (metrics)
    groups = [clip_source(c) for c in dataset.clips] if cfg.split_by_source else None
    train_idx, val_idx, hold_idx = train_val_test_split(len(framed), cfg, groups)
    log.info("%s dataset %s: %d clips (%d train, %d validation, %d test), %d labels",
             dataset.layout, dataset.name, len(framed), len(train_idx), len(val_idx), len(hold_idx), len(labels))
    augmented = {}
    for split, idx, per_label, seed in (("train", train_idx, cfg.augment_per_label, cfg.seed),
                                        ("validation", val_idx, cfg.augment_per_label // 4, cfg.seed + 1)):
        mixtures = augment_clips([framed[i] for i in idx], labels, per_label, seed)
        idx.extend(range(len(framed), len(framed) + len(mixtures)))
        framed.extend(mixtures)
        augmented[split] = len(mixtures)
        if mixtures:
            log.info("augmentation (%s): %d mixtures of real events into real negatives, %d per label",
                     split, len(mixtures), per_label)
    return TrainingData(data_dirs, dataset, framed, train_idx, val_idx, hold_idx, augmented)


def pretraining_clips(framed: list[FramedClip], train_idx: list[int], pretrain_on: str) -> list[int]:
    """The training clips the label-free stages learn from: all of them (``"all"``), or only
    those with at least one labelled frame (``"labelled"``, which leaves out the hours of
    unlabelled background and confusers)."""
    if pretrain_on == "all":
        return list(train_idx)
    return [i for i in train_idx if framed[i].labels.any()]


def scored_clip(clip: FramedClip, codes: torch.Tensor, labels: tuple[str, ...], code_lm: CodeTransformer,
                classifier: SceneClassifier, centroids: torch.Tensor) -> ScoredClip:
    """One clip's windows and probabilities, exactly as the ingest would form them."""
    windows, probs = window_probabilities(codes.numpy(), code_lm, classifier, centroids,
                                          classifier.config.window_frames, code_lm.config.context_frames)
    return ScoredClip(windows, probs, clip.carried(labels), (len(clip.patches) - clip.padded_frames) / FRAMES_PER_SECOND)


def train_val_test_split(n_clips: int, cfg: TrainConfig,
                         groups: Sequence[str] | None = None) -> tuple[list[int], list[int], list[int]]:
    """Three disjoint, deterministic clip index sets: train, validation, held-out test; with
    ``groups`` (a source per clip), each source in one of them (``split_clips``)."""
    train_idx, hold_idx = split_clips(n_clips, cfg.holdout_fraction, cfg.seed, groups)
    fit_idx, val_idx = split_clips(len(train_idx), cfg.holdout_fraction, cfg.seed + 1,
                                   None if groups is None else [groups[i] for i in train_idx])
    return [train_idx[i] for i in fit_idx], [train_idx[i] for i in val_idx], hold_idx


def fit_front_end(
    clips: list[FramedClip], config: FrontEndConfig, cfg: TrainConfig, run: dict[str, Any], name: str = "frontend"
) -> tuple[LearnedFrontEnd, dict[str, Any]]:
    """Stage 1 through Ray Train: the S3 raw-patch front end, trained by frame tagging."""
    import ray

    segments, seg_labels = _segments(clips, FRONTEND_MAX_SEGMENTS, cfg.seed)
    state = fit_stage(
        name,
        stages.frontend_loop,
        {
            "spec": StageSpec(name, cfg.frontend_epochs, 2e-3, 16, cfg.seed, cfg.checkpoint_every),
            "model_config": config,
            "data_ref": ray.put({"segments": segments, "labels": seg_labels}),
        },
        **run,
    )
    front_end = LearnedFrontEnd(config)
    prefix = "front_end."
    front_end.load_state_dict({k.removeprefix(prefix): v for k, v in state["model"].items() if k.startswith(prefix)})
    return front_end.eval(), state


def fit_code_lm(
    sequences: list[torch.Tensor], config: CodeTransformerConfig, cfg: TrainConfig, run: dict[str, Any], name: str = "code_lm"
) -> tuple[CodeTransformer, dict[str, Any]]:
    """Stage 3 through Ray Train: the causal code LM on the training clips' code sequences."""
    import ray

    state = fit_stage(
        name,
        stages.code_lm_loop,
        {
            "spec": StageSpec(name, cfg.code_lm_epochs, 3e-3, 16, cfg.seed, cfg.checkpoint_every),
            "model_config": config,
            "data_ref": ray.put([s.numpy() for s in sequences]),
        },
        **run,
    )
    code_lm = CodeTransformer(config)
    code_lm.load_state_dict(state["model"])
    return code_lm.eval(), state


def fit_classifier(
    windows: dict[str, np.ndarray],
    centroids: torch.Tensor,
    config: SceneClassifierConfig,
    cfg: TrainConfig,
    run: dict[str, Any],
    name: str = "classifier",
    init_body: dict[str, torch.Tensor] | None = None,
) -> tuple[SceneClassifier, dict[str, Any]]:
    """Stage 4 through Ray Train: the scene classifier on ``window_inputs`` windows (starting
    from ``init_body``, a classifier's weights without its head, when given)."""
    import ray

    state = fit_stage(
        name,
        stages.classifier_loop,
        {
            "spec": StageSpec(name, cfg.classifier_epochs, 1e-3, 64, cfg.seed, cfg.checkpoint_every),
            "model_config": config,
            "data_ref": ray.put({**windows, "centroids": centroids.numpy()}),
            "init_body": init_body,
        },
        **run,
    )
    classifier = SceneClassifier(config)
    classifier.load_state_dict(state["model"])
    return classifier.eval(), state


def _segments(clips: list[FramedClip], max_segments: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Cut clips into overlapping 2 s segments: (M, T, P) patches, (M, T, L) labels.

    Each clip is cut twice, the second time shifted by half a patch, so the
    front end sees each sound at more than one phase of the patch grid (a raw
    waveform front end has no shift invariance of its own). With more than
    ``max_segments``, a seeded random subset of that many is kept (hours of real
    background would otherwise cost gigabytes and add little).
    """
    cuts = []  # (clip, shift, first patch): decided before any audio is copied
    for k, clip in enumerate(clips):
        for shift in (0, PATCH_SAMPLES // 2):
            n = (len(clip.patches) * PATCH_SAMPLES - shift) // PATCH_SAMPLES
            cuts += [(k, shift, start) for start in range(0, n - SEGMENT_FRAMES + 1, SEGMENT_FRAMES // 2)]
    if max_segments is not None and len(cuts) > max_segments:
        keep = np.sort(np.random.default_rng(seed).choice(len(cuts), max_segments, replace=False))
        log.info("front end: %d of %d 2 s segments, drawn at random", max_segments, len(cuts))
        cuts = [cuts[i] for i in keep]
    segs, labs = [], []
    for k, shift, start in cuts:
        audio = clips[k].patches.reshape(-1)[shift + start * PATCH_SAMPLES : shift + (start + SEGMENT_FRAMES) * PATCH_SAMPLES]
        segs.append(audio.reshape(SEGMENT_FRAMES, PATCH_SAMPLES))
        labs.append(clips[k].labels[start : start + SEGMENT_FRAMES])
    return np.stack(segs), np.stack(labs)


def window_inputs(
    clips: list[FramedClip], codes: list[torch.Tensor], code_lm: CodeTransformer, window: int, stride: int,
    weak_stride: int | None = None,
) -> dict[str, np.ndarray]:
    """Classifier inputs exactly as the cloud computes them: the LM sees up to its
    context of codes ending at the window's end, and the last ``window`` states are kept.
    Windows start every ``stride`` frames (``weak_stride`` in weakly labelled clips)."""
    context = code_lm.config.context_frames
    assert [len(c) for c in codes] == [len(clip.labels) for clip in clips], "one code per frame"
    spans = window_spans(clips, window, stride, weak_stride)
    contexts = [codes[k][max(0, end - context) : end] for k, end in spans]
    window_codes = [codes[k][end - window : end] for k, end in spans]
    targets, weights = span_targets(clips, spans, window)
    states = torch.cat([lm_window_states(code_lm, contexts[i : i + 512], window) for i in range(0, len(contexts), 512)])
    return {
        "states": states.numpy(),
        "codes": torch.stack(window_codes).numpy(),
        "targets": targets,
        "weights": weights,
    }


def window_spans(clips: list[FramedClip], window: int, stride: int, weak_stride: int | None = None) -> list[tuple[int, int]]:
    """(clip index, end frame) of every window: every ``stride`` frames (``weak_stride`` in
    weakly labelled clips), in clip order. Every model scored on the same clips sees these."""
    return [(k, end) for k, clip in enumerate(clips)
            for end in range(window, len(clip.labels) + 1, (weak_stride or stride) if clip.weak else stride)]


def span_targets(clips: list[FramedClip], spans: list[tuple[int, int]], window: int) -> tuple[np.ndarray, np.ndarray]:
    """(M, L) targets and loss weights of ``window_spans`` windows (``dataset.window_targets``)."""
    pairs = [window_targets(clips[k].labels, end - window, window) for k, end in spans]
    n_labels = clips[0].labels.shape[1] if clips else 0
    if not pairs:
        return np.zeros((0, n_labels), np.float32), np.zeros((0, n_labels), np.float32)
    return np.stack([t for t, _ in pairs]), np.stack([w for _, w in pairs])
