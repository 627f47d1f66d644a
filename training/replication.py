"""`soundfleet report replication`: the three papers' claims, side by side, on one corpus.

One command regenerates everything in ``docs/results/``: it synthesises the
built-in corpus (fixed seed), splits it once into training and held-out clips,
runs the S1, S2 and S3 experiments on that split, every model through Ray
Train, and writes ``replication.md``, ``replication.json`` and the plots. The
report is that output, unedited: each number sits next to the command, seed,
data hash, wall time and machine that produced it.

Presets: "cpu" (default) fits in well under an hour on 2 CPU cores; "gpu" is
the larger configuration (the papers' widths, longer training) for a machine
with a GPU, where Ray Train puts each worker on one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from soundfleet.config import TrainConfig
from training.corpus import synthesize_corpus
from training.dataset import load_framed
from training.pipeline import train_val_test_split
from training.ray_stage import run_directory
from training.s1_comparison import run_s1_comparison
from training.s1_stage import GPU_EXPERIMENT, S1Experiment
from training.s2_experiment import S2Experiment, run_s2
from training.s3_experiment import S3Experiment, run_s3
from training.sources import load_dataset

log = logging.getLogger(__name__)


@dataclass
class ReplicationConfig:
    corpus_minutes: float = 120.0  # the shipped bundle's corpus
    seed: int = 0
    workers: int = 2
    s1: S1Experiment = field(default_factory=S1Experiment)
    s2: S2Experiment = field(default_factory=S2Experiment)
    s3: S3Experiment = field(default_factory=S3Experiment)


PRESETS: dict[str, ReplicationConfig] = {
    "cpu": ReplicationConfig(),
    "gpu": ReplicationConfig(
        corpus_minutes=600.0,
        workers=1,
        s1=GPU_EXPERIMENT,
        s2=S2Experiment(codebook_sizes=(16, 64, 256, 1024, 4096), autoencoder_epochs=30, code_lm_epochs=40,
                        supervised_epochs=40, contrastive_epochs=60),
        s3=S3Experiment(frontend_hidden=2000, frontend_epochs=40, code_lm_epochs=30, classifier_layers=6,
                        classifier_epochs=30, cnn_epochs=30),
    ),
    # every stage for one or two epochs on 3 minutes of audio: proves the whole command in CI
    # (one worker per stage: at this size a stage is Ray Train's start-up, and a second worker doubles it)
    "smoke": ReplicationConfig(
        corpus_minutes=3.0,
        workers=1,
        s1=S1Experiment(target_params=20_000, context_samples=128, cond_context=512, steps_per_epoch=5, epochs=1,
                        warmup_steps=2, eval_positions=512, eval_targets=64),
        s2=S2Experiment(codebook_sizes=(16, 32), autoencoder_epochs=1, code_lm_epochs=1, supervised_epochs=1,
                        contrastive_epochs=1, kmeans_minibatch_from_k=32),
        s3=S3Experiment(frontend_hidden=32, frontend_epochs=1, codebook_size=32, code_lm_epochs=1,
                        classifier_layers=2, classifier_epochs=1, cnn_epochs=1, cnn_blocks=2),
    ),
}
"""Named configurations; "cpu" is what the committed report was made with."""


def preset(name: str) -> ReplicationConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown replication preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None


def run_replication(
    out_dir: Path, work_dir: Path, config: ReplicationConfig, preset_name: str, command: str, use_gpu: bool | None = None
) -> dict[str, Any]:
    """Run every experiment and write the report; returns the results dict."""
    import ray

    from training.replication_report import write_report

    started = time.monotonic()
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    corpus_dir = work_dir / "corpus"
    t0 = time.monotonic()
    corpus = synthesize_corpus(corpus_dir, minutes=config.corpus_minutes, seed=config.seed)
    data_s = time.monotonic() - t0
    dataset = load_dataset(corpus_dir)
    clips = load_framed(dataset.clips, dataset.labels)
    cfg = TrainConfig(seed=config.seed, workers=config.workers)
    train_idx, val_idx, test_idx = train_val_test_split(len(clips), cfg)
    train_idx = sorted(train_idx + val_idx)  # no thresholds to calibrate here: validation clips train
    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    run = dict(workers=config.workers, storage_path=run_directory(work_dir / "ray", resume=False), use_gpu=use_gpu)
    results: dict[str, Any] = {
        "command": command,
        "preset": preset_name,
        "config": dataclasses.asdict(config),
        "data": {
            "dir": str(corpus_dir),
            "minutes": config.corpus_minutes,
            "seed": config.seed,
            "data_sha256": dataset.data_sha256,
            "clips": {"train": len(train_idx), "test": len(test_idx)},
            "events": corpus["n_events"],
            "labels": list(dataset.labels),
            "wall_s": round(data_s, 1),
        },
        "machine": machine_description(),
    }
    sections = (
        ("s1", lambda: run_s1_comparison(
            [clips[i].patches.reshape(-1) for i in train_idx], [clips[i].patches.reshape(-1) for i in test_idx], config.s1, run
        )),
        ("s2", lambda: run_s2(clips, dataset.labels, train_idx, test_idx, config.s2, cfg, run)),
        ("s3", lambda: run_s3(clips, dataset.labels, train_idx, test_idx, config.s3, cfg, run)),
    )
    for name, section in sections:
        t0 = time.monotonic()
        log.info("replication: %s", name.upper())
        results[name] = section()
        results[name]["wall_s"] = round(time.monotonic() - t0, 1)
        log.info("replication: %s done in %.0f s", name.upper(), results[name]["wall_s"])
    results["wall_s"] = round(time.monotonic() - started, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = json.dumps(results, indent=2, sort_keys=True, default=str) + "\n"
    (out_dir / "replication.json").write_text(raw)
    # rendered from the JSON as written, so re-rendering the committed JSON reproduces the report
    write_report(json.loads(raw), out_dir)
    return results


def machine_description() -> dict[str, Any]:
    """What ran the experiments: CPU model and count, GPU if any, library versions."""
    import ray

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "system": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
    }
