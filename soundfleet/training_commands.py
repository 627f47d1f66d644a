"""The training side of the `soundfleet` command line: data, train, eval and report.

Each handler takes the parsed arguments and the typed config and returns the exit code;
heavy modules (torch, Ray) are imported inside them, so importing this module is cheap.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from soundfleet.config import apply_flags

log = logging.getLogger("soundfleet")


def data_command(args, config) -> int:
    if args.data_command == "real":
        return _data_real(args)
    from training.corpus import synthesize_corpus

    manifest = synthesize_corpus(args.out, minutes=args.minutes, seed=args.seed, clip_seconds=args.clip_seconds)
    log.info("corpus written to %s: %d clips, sha256 %s", args.out, manifest["n_clips"], manifest["data_sha256"][:16])
    return 0


def _data_real(args) -> int:
    from training.debian_audio import DebianError
    from training.real_corpus import CATALOGUE, RealCorpusError, build_real_corpus

    try:
        summary = build_real_corpus(args.out, args.cache, args.catalogue or CATALOGUE, args.packages,
                                    args.max_clip_seconds, progress=not args.no_progress)
    except (RealCorpusError, DebianError, OSError) as exc:  # OSError: a full disk, an unwritable --out
        log.error("%s", exc)
        return 1
    minutes = {s: sum(v["minutes"] for v in t.values()) for s, t in summary["totals"].items()}
    log.info("real corpus written to %s: %d clips from %d packages (train %.1f min, test %.1f min); left out: %s",
             args.out, summary["clips"], len(summary["packages"]), minutes["train"], minutes["test"],
             summary["skipped"] or "nothing")
    return 0


def train_command(args, config) -> int:
    from training.corpus import CorpusError
    from training.pipeline import train_all
    from training.sources import DatasetError

    cfg = config.train
    apply_flags(cfg, {"workers": args.workers, "seed": args.seed, "codebook_size": args.codebook_size,
                 "classifier_pooling": args.classifier_pooling, "frontend": args.frontend,
                 "pretrain_on": args.pretrain_on,
                 "storage_path": str(args.storage_path) if args.storage_path else None})
    for name in ("frontend_epochs", "code_lm_epochs", "classifier_epochs"):
        setattr(cfg, name, max(1, round(getattr(cfg, name) * args.epochs_scale)))
    cfg.validate()
    if args.base:
        return _train_few_shot(args, cfg)
    try:
        manifest = train_all(args.data, args.out, cfg, command="soundfleet " + " ".join(args.argv),
                             resume=args.resume)
    except (CorpusError, DatasetError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 1
    log.info("bundle %s written to %s; held-out macro-F1 %.3f", manifest["model_version"], args.out,
             manifest["training"]["metrics"]["macro_f1"])
    return 0


def _train_few_shot(args, cfg) -> int:
    from shared_models.bundle import BundleError
    from training.few_shot import FewShotError, add_classes
    from training.sources import DatasetError

    if args.resume:
        log.error("--resume does not apply to --base (the few-shot head trains in a minute); run it again")
        return 1
    try:
        manifest = add_classes(args.base, args.data, args.out, cfg, command="soundfleet " + " ".join(args.argv))
    except (BundleError, DatasetError, FewShotError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 1
    added = manifest["training"]["few_shot"]["labels"]
    log.info("bundle %s written to %s: %s added to %s (edge model unchanged: no rollout needed)",
             manifest["model_version"], args.out, ", ".join(added), manifest["base"]["model_version"])
    return 0


def report_command(args, config) -> int:
    if args.report_command == "real-audio":
        return _report_real_audio(args, config)
    from training.replication import preset, run_replication

    use_gpu = None if args.use_gpu == "auto" else args.use_gpu == "true"
    results = run_replication(args.out, args.work, preset(args.preset), args.preset,
                              command="soundfleet " + " ".join(args.argv), use_gpu=use_gpu)
    log.info("replication report written to %s in %.1f min", args.out / "replication.md", results["wall_s"] / 60)
    return 0

def _report_real_audio(args, config) -> int:
    from shared_models.bundle import BundleError, default_bundle_dir
    from training.eval import EvalError
    from training.real_audio_report import ReportError, run_real_audio_report
    from training.real_compare import CompareError
    from training.sources import DatasetError

    try:
        results = run_real_audio_report(args.corpus, args.models or default_bundle_dir(), args.out,
                                        "soundfleet " + " ".join(args.argv), config.cloud,
                                        compare_work=args.work if args.compare else None)
    except (BundleError, CompareError, DatasetError, EvalError, ReportError) as exc:
        log.error("%s", exc)
        return 1
    pool = results["evaluation"]["events"]["negative_pool"]
    log.info("real-audio report written to %s: %s false events per 24 h on %.2f h of negatives",
             args.out / "real-audio.md", pool["false_events_per_24h"], pool["hours"])
    return 0


def eval_command(args, config) -> int:
    import json

    from shared_models.bundle import BundleError, default_bundle_dir
    from training.eval import EvalError, evaluate_bundle
    from training.sources import DatasetError

    try:
        report = evaluate_bundle(args.models or default_bundle_dir(), args.data, config.cloud)
    except (BundleError, DatasetError, EvalError) as exc:
        log.error("%s", exc)
        return 1
    if args.out:
        if args.out.is_dir():
            args.out = args.out / "eval.json"
        report["plots"] = _eval_plots(report, args.out.parent)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


def calibrate_command(args, config) -> int:
    import json

    from shared_models.bundle import BundleError
    from training.recalibrate import CalibrateError, recalibrate
    from training.sources import DatasetError

    try:
        manifest = recalibrate(args.models, args.out, budget_per_24h=args.false_events_per_24h,
                               max_min_windows=args.max_min_windows, command=" ".join(["soundfleet", *sys.argv[1:]]))
    except (BundleError, CalibrateError, DatasetError) as exc:
        log.error("%s", exc)
        return 1
    print(json.dumps({"model_version": manifest["model_version"], "thresholds": manifest["thresholds"],
                      "min_windows": manifest["min_windows"], "calibration": manifest["training"]["calibration"]},
                     indent=2))
    return 0


def _eval_plots(report: dict, out_dir: Path) -> dict[str, str]:
    """confusion.png and per_class.png for an eval report; none without matplotlib (`train` extra)."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        log.warning("matplotlib is not installed (pip install 'soundfleet[train]'): no plots written")
        return {}
    from training.plots import confusion_matrix_from_table, plot_confusion, plot_per_class

    metrics = report["metrics"]
    name = f"{report['model_version']} on {Path(report['data']['path']).name}"
    matrix, rows, cols = confusion_matrix_from_table(metrics["confusion"], list(metrics["per_class"]))
    plots = {
        "confusion": plot_confusion(matrix, rows, cols, out_dir / "confusion.png", f"Confusion: {name}"),
        "per_class": plot_per_class(metrics["per_class"], out_dir / "per_class.png", f"Per class: {name}"),
    }
    log.info("plots written: %s", ", ".join(str(p) for p in plots.values()))
    return {key: str(p) for key, p in plots.items()}
