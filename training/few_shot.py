"""`soundfleet train --base BUNDLE`: a user's own classes on top of a trained bundle.

A household wants *its* doorbell, *its* CO alarm. From 5-20 recordings per class:

- The edge model, the codebook and the code LM are the base bundle's, byte for byte:
  devices keep sending the same codes, so no edge rollout is needed, and the cloud loads
  the new bundle in place of the base.
- The base classifier is kept as it is; a small classifier of the new labels, reading the same
  inputs (code LM states and code embeddings of 1 s windows), is trained beside it through Ray
  Train (``stages.classifier_loop``) and its outputs follow the base ones
  (``shared_models.scene_classifier.ExtendedClassifier``). The base labels' outputs,
  thresholds and probabilities are unchanged, exactly.
- Positives: the user's clips of each new class (a folder each, weak labels), plus
  ``augment_per_label`` mixtures of them into negatives as a room and a cheap microphone
  would deliver them (:func:`training.augment.mix_event`), so five recordings become
  hundreds of situations.
- Negatives: every other clip in the data (its ``_none`` folder, other labels),
  ``few_shot_negative_minutes`` of the built-in synthetic corpus and ``BASE_SOUNDS_PER_LABEL``
  synthetic sounds of every base class in a room (what the new class must not be taken for),
  generated with the seed.
- Thresholds: each new label's on-threshold is calibrated for its share of the false-alarm
  budget on a held-out part of the negatives, through the live event logic, as in
  ``soundfleet train``. With 8 or more clips of a class, a quarter of them are held out and
  the class's recall at that threshold is measured on them.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cloud.events import label_policies
from edge.encoder import EdgeEncoder
from shared_models import bundle
from shared_models.constants import FRAMES_PER_SECOND, SAMPLE_RATE_HZ
from shared_models.detector import load_cloud_models
from shared_models.scene_classifier import ExtendedClassifier
from shared_models.synth import BACKGROUNDS, EVENT_GENERATORS, generate_background, generate_event
from shared_models.synth_scene import BACKGROUND_DBFS_RANGE
from soundfleet.config import CloudConfig, TrainConfig
from training.augment import MIXTURE_S, mix_event
from training.corpus import synthesize_corpus
from training.dataset import FramedClip, frame_labels, frame_patches, load_framed, split_clips
from training.eval_events import (
    ScoredClip,
    at_threshold,
    calibrate_event_thresholds,
    label_event_count,
    window_probabilities,
)
from training.export import finish_bundle
from training.pipeline import TRAIN_WINDOW_STRIDE, WEAK_WINDOW_STRIDE, fit_classifier, window_inputs
from training.ray_stage import run_directory
from training.sources import Clip, ClipEvent, load_datasets

log = logging.getLogger(__name__)

MIN_CLIPS = 3
"""Fewer recordings of a new class than this is an error; fewer than 5 is a warning."""

HOLD_OUT_FROM = 8
"""With at least this many clips of a class, a quarter are held out to measure its recall."""

BACKGROUND_CLIPS = 48
"""Synthetic rooms (8 s each) the recordings are mixed into, besides the user's own clips without a label."""

BASE_SOUNDS_PER_LABEL = 24
"""Synthetic sounds of each base class mixed into rooms, as negatives of the new classes."""

EVENT_ABOVE_FLOOR_DB = 6.0
"""A user's recording is mostly room around a short sound: the sound is labelled from the first
to the last 25 ms frame this far above the recording's median frame power (its floor)."""


class FewShotError(ValueError):
    """The data cannot add a class to the base bundle (no new label, too few clips)."""


def add_classes(base_dir: Path, data_dirs: Sequence[Path], out_dir: Path, cfg: TrainConfig,
                command: str = "") -> dict[str, Any]:
    """Train a classifier of the labels of ``data_dirs`` that the base bundle lacks; write the
    extended bundle to ``out_dir`` and return its manifest."""
    import ray

    started = time.monotonic()
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    base, code_lm, base_classifier, centroids = load_cloud_models(base_dir)
    if "custom_classifier_config" in base:
        raise FewShotError(f"{base_dir} already has classes added to {base['base']['model_version']}; add every "
                           f"class in one run on top of that bundle ({base['base']['path']})")
    encoder = EdgeEncoder(base_dir)
    base_labels = tuple(base["labels"])
    user = load_datasets([Path(d) for d in data_dirs])
    new_labels = tuple(label for label in user.labels if label not in base_labels)
    if not new_labels:
        raise FewShotError(f"nothing to add: every label of {user.name} ({', '.join(user.labels) or 'none'}) "
                           f"is already one of the base bundle's ({', '.join(base_labels)})")
    W = base_classifier.config.window_frames
    user_clips = [_localised(c, new_labels) for c in _framed(user.clips, new_labels, W)]
    positives = {label: [i for i, c in enumerate(user_clips) if label in c.carried(new_labels)] for label in new_labels}
    for label, idx in positives.items():
        if len(idx) < MIN_CLIPS:
            raise FewShotError(f"{label}: {len(idx)} recording(s); a new class needs at least {MIN_CLIPS} (5-20 is best)")
        if len(idx) < 5:
            log.warning("%s: only %d recordings; 5-20 give a more reliable class", label, len(idx))
    held = {label: (split_clips(len(idx), 0.25, cfg.seed)[1] if len(idx) >= HOLD_OUT_FROM else [])
            for label, idx in positives.items()}
    held_idx = {positives[label][k] for label, ks in held.items() for k in ks}

    with tempfile.TemporaryDirectory(prefix="soundfleet-few-shot-") as tmp:
        synth = synthesize_corpus(Path(tmp) / "negatives", minutes=cfg.few_shot_negative_minutes, seed=cfg.seed,
                                  progress=False)
        negatives = _framed(load_datasets([Path(tmp) / "negatives"]).clips, new_labels, W)
    negatives += [c for c in user_clips if not c.carried(new_labels)]
    neg_train, neg_val = split_clips(len(negatives), 0.3, cfg.seed + 1)
    train_pos = [user_clips[i] for idx in positives.values() for i in idx if i not in held_idx]
    # mixed only into sound-free backgrounds: a bark or a smoke alarm under a mixture would be
    # labelled as the new class; the user's clips without any label, and synthetic rooms
    rooms = [user_clips[i] for i, c in enumerate(user.clips) if not c.events] + _rooms(BACKGROUND_CLIPS, cfg.seed, new_labels)
    mixtures = _mixtures(train_pos, rooms, new_labels, cfg.augment_per_label, cfg.seed)
    confusers = _base_sounds(base_labels, rooms, BASE_SOUNDS_PER_LABEL, cfg.seed + 2, new_labels)
    train = train_pos + mixtures + rooms + confusers + [negatives[i] for i in neg_train]
    log.info("few-shot %s on %s: %d recordings (%d held out), %d mixtures, %d negative clips (%.0f min synthetic)",
             ",".join(new_labels), base["model_version"], sum(map(len, positives.values())), len(held_idx),
             len(mixtures), len(negatives), cfg.few_shot_negative_minutes)

    # the new labels' classifier, on the windows the cloud would form from the devices' codes
    codes = [torch.tensor(encoder.encode(c.patches).codes.astype(np.int64)) for c in train]
    windows = window_inputs(train, codes, code_lm, W, TRAIN_WINDOW_STRIDE, WEAK_WINDOW_STRIDE)
    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    storage = run_directory(Path(cfg.storage_path or out_dir / "ray_runs"), resume=False)
    use_gpu = None if cfg.use_gpu == "auto" else cfg.use_gpu == "true"
    custom_config = dataclasses.replace(base_classifier.config, num_labels=len(new_labels))
    custom, state = fit_classifier(windows, centroids, custom_config,
                                   dataclasses.replace(cfg, classifier_epochs=cfg.few_shot_epochs),
                                   dict(workers=cfg.workers, storage_path=storage, use_gpu=use_gpu), name="custom_classifier",
                                   init_body={k: v for k, v in base_classifier.state_dict().items()
                                              if not k.startswith("head.")})
    classifier = ExtendedClassifier(base_classifier, custom)

    # thresholds for the new labels' share of the budget, on the validation negatives
    L, N = len(base_labels), len(new_labels)

    def scored(clips: list[FramedClip]) -> list[ScoredClip]:
        return [_scored(c, new_labels, encoder, code_lm, classifier, centroids, L) for c in clips]

    budget = cfg.false_events_per_24h * N / (L + N)
    policies = label_policies(CloudConfig(), {"labels": list(new_labels)})
    # the new labels keep one window: a user's 5-20 recordings are too few to choose more
    thresholds, _, calibration = calibrate_event_thresholds(
        scored([negatives[i] for i in neg_val] + [user_clips[i] for i in sorted(held_idx)]), new_labels, policies, W,
        budget)
    trained_on = scored(train_pos)
    for j, label in enumerate(new_labels):
        report = calibration["labels"][label]
        report["held_out_clips"] = len(held[label])
        policy = at_threshold(policies[label], thresholds[label])
        hits = [label_event_count(c, j, policy, W) > 0 for c in trained_on if label in c.carried]
        report["recall_on_training_clips"] = round(sum(hits) / len(hits), 4)
        log.info("%s: on-threshold %.2f; recall %s on %d held-out clips, %.2f on the %d training clips", label,
                 thresholds[label], report["recall"] if held[label] else "n/a", len(held[label]),
                 report["recall_on_training_clips"], len(hits))

    labels = base_labels + new_labels
    cloud_state = torch.load(base_dir / bundle.CLOUD_WEIGHTS, map_location="cpu", weights_only=True)
    cloud_state["custom_classifier"] = custom.state_dict()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (bundle.EDGE_MODEL, bundle.CODEBOOK):  # the devices' model, byte for byte
        shutil.copyfile(base_dir / name, out_dir / name)
    torch.save(cloud_state, out_dir / bundle.CLOUD_WEIGHTS)
    cloud_sha = bundle.file_sha256(out_dir / bundle.CLOUD_WEIGHTS)
    manifest = {
        **{k: v for k, v in base.items() if k not in ("sha256", "training")},
        "model_version": f"{base['model_version']}-{'-'.join(new_labels)}"[:54] + f"-{cloud_sha[:8]}",
        "labels": list(labels),
        "thresholds": {**base["thresholds"], **thresholds},
        "min_windows": {**base.get("min_windows", {}), **dict.fromkeys(new_labels, 1)},
        "custom_classifier_config": dataclasses.asdict(custom_config),
        "base": {"model_version": base["model_version"], "path": str(base_dir),
                 "edge_sha256": base["sha256"][bundle.EDGE_MODEL], "training": base["training"]},
        "training": {
            "command": command,
            "seed": cfg.seed,
            "config": dataclasses.asdict(cfg),
            "data_dir": ",".join(map(str, data_dirs)),
            "data_layout": user.layout,
            "data_sha256": user.data_sha256,
            "few_shot": {
                "labels": list(new_labels),
                "clips": {label: len(idx) for label, idx in positives.items()},
                "mixtures": len(mixtures),
                "negative_clips": {"train": len(neg_train), "validation": len(neg_val)},
                "synthetic_negatives": {"minutes": cfg.few_shot_negative_minutes, "data_sha256": synth["data_sha256"]},
                "windows": len(windows["states"]),
            },
            "calibration": calibration,
            "stages": {"custom_classifier": {"epochs": state["epoch"], "starts": state["starts"]}},
            "run_dir": str(storage),
            "wall_time_s": round(time.monotonic() - started, 1),
            "machine": f"{platform.machine()} {platform.system()}, {torch.get_num_threads()} torch threads, "
            f"python {platform.python_version()}, torch {torch.__version__}",
        },
    }
    return finish_bundle(out_dir, manifest, few_shot_readme)


def _framed(clips: list[Clip], labels: tuple[str, ...], min_frames: int) -> list[FramedClip]:
    """Framed clips whose label columns are ``labels`` only (the new classes): the events of any
    other label are not targets here, so they are dropped."""
    kept = [dataclasses.replace(c, events=[e for e in c.events if e.label in labels]) for c in clips]
    return load_framed(kept, labels, min_frames=min_frames)


def event_span(patches: np.ndarray) -> tuple[int, int]:
    """(first, end) frame of the sound in a recording: frames ``EVENT_ABOVE_FLOOR_DB`` above the
    median frame power; the whole recording when none is (a steady sound filling it)."""
    power = np.mean(np.square(patches, dtype=np.float64), axis=1)
    loud = np.flatnonzero(power > np.median(power) * 10 ** (EVENT_ABOVE_FLOOR_DB / 10))
    return (int(loud[0]), int(loud[-1]) + 1) if len(loud) else (0, len(patches))


def _localised(clip: FramedClip, labels: tuple[str, ...]) -> FramedClip:
    """A weakly labelled positive recording made strong: its labels only over its sound's span
    (so the room around a doorbell is a negative, not a doorbell)."""
    carried = clip.carried(labels)
    if not clip.weak or not carried:
        return clip
    first, end = event_span(clip.patches[: len(clip.patches) - clip.padded_frames])
    frame_lab = np.zeros_like(clip.labels)
    frame_lab[first:end, [labels.index(label) for label in carried]] = 1.0
    return dataclasses.replace(clip, labels=frame_lab, weak=False)


def _rooms(n: int, seed: int, labels: tuple[str, ...]) -> list[FramedClip]:
    """``n`` clips of synthetic room sound with no event (noise, hum, rain, babble), at the
    built-in corpus's background levels."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        audio = generate_background(BACKGROUNDS[k % len(BACKGROUNDS)], int(MIXTURE_S * 2 * SAMPLE_RATE_HZ), rng)
        patches = frame_patches((audio * 10 ** (rng.uniform(*BACKGROUND_DBFS_RANGE) / 20)).astype(np.float32))
        out.append(FramedClip(patches, np.zeros((len(patches), len(labels)), np.float32)))
    return out


def _base_sounds(base_labels: tuple[str, ...], rooms: list[FramedClip], per_label: int, seed: int,
                 labels: tuple[str, ...]) -> list[FramedClip]:
    """Negatives the new classes must not be taken for: ``per_label`` synthetic sounds of every
    base class (those the built-in synthesiser makes), each mixed into a room."""
    rng = np.random.default_rng(seed)
    out = []
    for base_label in (b for b in base_labels if b in EVENT_GENERATORS):
        for _ in range(per_label):
            room = rooms[int(rng.integers(len(rooms)))]
            mixture = mix_event(rng, generate_event(base_label, rng), base_label, room.patches.reshape(-1))
            patches = frame_patches(mixture.audio)
            out.append(FramedClip(patches, np.zeros((len(patches), len(labels)), np.float32)))
    return out


def _mixtures(positives: list[FramedClip], backgrounds: list[FramedClip], labels: tuple[str, ...], per_label: int,
              seed: int) -> list[FramedClip]:
    """``per_label`` strongly labelled mixtures of each label's clips into random backgrounds."""
    rng = np.random.default_rng(seed)
    out = []
    for label in labels:
        sources = [c for c in positives if label in c.carried(labels)]
        for k in range(per_label if sources and backgrounds else 0):
            background = backgrounds[int(rng.integers(len(backgrounds)))]
            source = sources[k % len(sources)]
            on = np.flatnonzero(source.labels[:, labels.index(label)])
            sound = source.patches[on[0] : on[-1] + 1].reshape(-1)  # the sound, without the room around it
            mixture = mix_event(rng, sound, label, background.patches.reshape(-1))
            patches = frame_patches(mixture.audio)
            events = [ClipEvent(name, onset_s, offset_s) for name, onset_s, offset_s in mixture.events]
            out.append(FramedClip(patches, frame_labels(events, len(patches), labels)))
    return out


def _scored(clip: FramedClip, labels: tuple[str, ...], encoder: EdgeEncoder, code_lm, classifier: ExtendedClassifier,
            centroids: torch.Tensor, first_new: int) -> ScoredClip:
    """One clip through the product's path (edge ONNX codes, the ingest's windows), keeping the
    new labels' probability columns only."""
    codes = encoder.encode(clip.patches).codes
    windows, probs = window_probabilities(codes, code_lm, classifier, centroids, classifier.config.window_frames,
                                          code_lm.config.context_frames)
    return ScoredClip(windows, probs[:, first_new:], clip.carried(labels),
                      (len(clip.patches) - clip.padded_frames) / FRAMES_PER_SECOND)


def few_shot_readme(manifest: dict[str, Any]) -> str:
    """The extended bundle's README: what was added to which base, and how well."""
    t, fs = manifest["training"], manifest["training"]["few_shot"]
    cal = t["calibration"]
    def held_out(c: dict) -> str:
        return f"{c['recall']:.2f} of {c['held_out_clips']}" if c["held_out_clips"] else "none held out"

    rows = "\n".join(
        f"| {label} | {fs['clips'][label]} | {c['on_threshold']:.2f} | {c['pool_false_events']} | {held_out(c)} | "
        f"{c['recall_on_training_clips']:.2f} |"
        for label, c in cal["labels"].items()
    )
    return f"""# Model bundle {manifest['model_version']}

Made by `soundfleet train --base`: the classes below added to
`{manifest['base']['model_version']}`, whose edge model (`edge.onnx`), codebook and code LM this
bundle carries unchanged (devices need no new model; codebook id {manifest['codebook_id']}).
The base labels' outputs and thresholds are the base bundle's. Everything here is also in
`manifest.json`.

- command: `{t['command']}`
- data: `{t['data_dir']}`, sha256 `{t['data_sha256']}`
- negatives: {fs['negative_clips']['train'] + fs['negative_clips']['validation']} clips, with
  {fs['synthetic_negatives']['minutes']:g} min of the synthetic corpus; {fs['mixtures']} augmentation mixtures
- wall time: {t['wall_time_s']} s on {t['machine']}

On-thresholds: the lowest that kept {cal['pool_hours']} h of validation negatives within the new
labels' share of {t['config']['false_events_per_24h']:g} false event per 24 h, through the live event logic.

| label | recordings | on-threshold | validation false events | recall, held-out clips | recall, training clips |
|---|---|---|---|---|---|
{rows}
"""
