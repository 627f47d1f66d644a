"""Edge benchmark: the agent's real path, measured (``soundfleet bench edge``).

Two processes, so that the memory figure is the agent's own:

- the edge process, ``python -m edge.bench WAV``, runs what the agent runs minus the network:
  :func:`~edge.sources.file_source` -> :func:`~edge.agent.message_chunks` (one chunk of
  25 ms patches per message) -> :class:`~edge.encoder.EdgeEncoder` (onnxruntime front end +
  VQ, one thread) -> :func:`~edge.agent.pack_frames` -> ``FramesMessage.to_bytes``. It times
  the path with ``time.process_time`` (CPU seconds of the whole process, every thread), reports
  its peak RSS and never imports torch (it says so: ``torch_loaded``);
- the parent (:func:`run_edge_bench`) writes the audio once, starts the edge process, runs the
  same path with the torch eager model in its own process on one thread for comparison, and
  assembles one report against the targets of SPEC section 3.

Not measured: the MQTT publish and the agent's per-message sequence-file write.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime

from edge.agent import message_chunks, pack_frames
from edge.encoder import EdgeEncoder
from edge.procstat import BYTES_PER_MB, peak_rss_mb, status_kb
from edge.sources import SourceError, file_source
from shared_models import bundle
from shared_models.constants import (
    DEFAULT_FRAMES_PER_MESSAGE,
    HOP_SAMPLES,
    NS_PER_SECOND,
    PATCH_SAMPLES,
    SAMPLE_RATE_HZ,
)
from soundfleet.config import PAYLOAD_MODES

log = logging.getLogger(__name__)

DEFAULT_SECONDS = 60.0
DEFAULT_REPEATS = 3
SCENE_SECONDS = 10.0  # length of each synthetic scene in the benchmark audio
UNIQUE_AUDIO_SECONDS = 60.0  # longer runs repeat the first minute (synthesis is slow)
PCM16_BPS = SAMPLE_RATE_HZ * 16  # 256_000 bit/s: the raw 16-bit mono audio the codes replace

TARGETS: dict[str, float] = {  # SPEC section 3, edge
    "realtime_factor_per_core": 1000,  # at least, audio seconds per CPU second
    "peak_rss_mb": 80,  # at most, resident memory of the edge process
    "codes_bitrate_bps": 1000,  # at most, upstream per stream in codes-only mode
}


class BenchError(RuntimeError):
    """The benchmark cannot run: bad arguments or a failed edge process."""


# --- the edge path (runs in the edge process; the parent reuses it with torch) ------------
def run_edge_path(
    encoder: Any, wav_path: Path, frames_per_message: int, mode: str = "codes"
) -> tuple[int, int, int]:
    """The agent's loop without the network: (audio samples, messages, payload bytes).

    ``encoder`` is anything with ``encode(patches) -> Encoded`` and ``codebook_id``."""
    per_message = frames_per_message * HOP_SAMPLES  # samples
    t0_ns = time.time_ns()
    samples = messages = payload_bytes = 0
    for chunk in message_chunks(file_source(str(wav_path), per_message), per_message):
        encoded = encoder.encode(chunk.reshape(-1, PATCH_SAMPLES))  # (N, PATCH_SAMPLES)
        t_start_ns = t0_ns + samples * NS_PER_SECOND // SAMPLE_RATE_HZ
        message = pack_frames(encoded, encoder.codebook_id, messages, t_start_ns, payload=mode)
        payload_bytes += len(message.to_bytes())
        samples += len(chunk)
        messages += 1
    return samples, messages, payload_bytes


def measure_path(
    encoder: Any, wav_path: Path, frames_per_message: int, repeats: int, name: str
) -> dict[str, Any]:
    """Payload bytes of every mode (untimed; also the warm-up), then ``repeats`` timed runs."""
    payload_bytes = {}
    for mode in PAYLOAD_MODES:
        samples, messages, payload_bytes[mode] = run_edge_path(
            encoder, wav_path, frames_per_message, mode
        )
    audio_s = samples / SAMPLE_RATE_HZ
    cpu_s = []
    for i in range(repeats):
        start = time.process_time()
        run_edge_path(encoder, wav_path, frames_per_message)
        cpu_s.append(time.process_time() - start)
        log.info("%s repeat %d/%d: %.1f s of audio in %.4f CPU s (%.0fx real time)",
                 name, i + 1, repeats, audio_s, cpu_s[-1], audio_s / max(cpu_s[-1], 1e-9))  # fmt: skip
    return {
        "audio_seconds": audio_s,
        "frames": samples // HOP_SAMPLES,
        "messages": messages,
        "payload_bytes": payload_bytes,
        "cpu_seconds_repeats": cpu_s,
    }


def edge_main(argv: list[str] | None = None) -> int:
    """``python -m edge.bench WAV``: measure the edge path in this process, print one JSON line."""
    parser = argparse.ArgumentParser(
        prog="python -m edge.bench",
        description="Measure the edge path on WAV in this (torch-free) process; "
        "`soundfleet bench edge` runs this in a fresh subprocess.",
    )
    parser.add_argument("wav", type=Path, help="16 kHz mono WAV to run through the path")
    parser.add_argument("--bundle", type=Path, help="model bundle (default: the shipped bundle)")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="timed repeats")
    parser.add_argument(
        "--frames-per-message",
        type=int,
        default=DEFAULT_FRAMES_PER_MESSAGE,
        help="frames per message",
    )
    parser.add_argument("--log-level", default="info", help="logging threshold")
    parser.add_argument("--log-format", default="text", choices=["text", "json"], help="log format")
    args = parser.parse_args(argv)
    from soundfleet.logs import setup_logging

    setup_logging(args.log_level, args.log_format)
    logging.getLogger("edge.sources").setLevel(logging.WARNING)  # one line per pass is noise
    rss_after_imports_mb = peak_rss_mb()
    try:
        encoder = EdgeEncoder(args.bundle, threads=1)
        result = measure_path(encoder, args.wav, args.frames_per_message, args.repeats, "onnx")
    except (bundle.BundleError, SourceError) as exc:
        log.error("%s", exc)
        return 1
    result.update(
        model_version=encoder.model_version,
        codebook_id=encoder.codebook_id,
        codebook_size=encoder.manifest.get("codebook_size"),
        peak_rss_mb=peak_rss_mb(),
        rss_after_imports_mb=rss_after_imports_mb,
        torch_loaded="torch" in sys.modules,
        onnxruntime=onnxruntime.__version__,
        numpy=np.__version__,
    )
    print(json.dumps(result))
    return 0


# --- the parent: audio, edge process, torch comparison, report -----------------------------
def write_bench_audio(path: Path, seconds: float, seed: int = 0) -> None:
    """``seconds`` of random labelled scenes from the built-in synthesiser as a 16-bit WAV."""
    from shared_models.synth import random_scene
    from shared_models.wavio import write_wav

    rng = np.random.default_rng(seed)
    unique = round(min(seconds, UNIQUE_AUDIO_SECONDS) * SAMPLE_RATE_HZ)
    scenes: list[np.ndarray] = []
    while sum(map(len, scenes)) < unique:
        scenes.append(random_scene(rng, duration_s=SCENE_SECONDS).audio)
        log.info("synthesising benchmark audio: %.0f s", sum(map(len, scenes)) / SAMPLE_RATE_HZ)
    audio = np.concatenate(scenes)[:unique]
    audio = np.resize(audio, round(seconds * SAMPLE_RATE_HZ))  # repeats it when longer
    write_wav(path, audio, SAMPLE_RATE_HZ)


def _run_edge_process(
    wav: Path, bundle_dir: Path, repeats: int, frames: int, log_level: str, log_format: str
) -> dict[str, Any]:
    """``python -m edge.bench`` in a fresh interpreter: its JSON line, or BenchError."""
    cmd = [sys.executable, "-m", "edge.bench", str(wav), "--bundle", str(bundle_dir),
           "--repeats", str(repeats), "--frames-per-message", str(frames),
           "--log-level", log_level, "--log-format", log_format]  # fmt: skip
    root = str(Path(__file__).resolve().parent.parent)  # the edge package this parent imported
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }
    log.info("edge process: %s", " ".join(cmd[1:]))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)  # stderr: our log
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise BenchError(f"the edge benchmark process failed (exit {proc.returncode}); see its log")
    return json.loads(lines[-1])


def _run_agent_process(wav: Path, bundle_dir: Path, frames: int, broker_url: str) -> dict[str, Any]:
    """The whole agent (`soundfleet edge run`: source, encoder, spool, MQTT session, sender and
    model threads) on ``wav``; its peak RSS is read from /proc while it runs (VmHWM only grows).
    With no broker at ``broker_url`` it spools everything, which is the agent's offline path."""
    with tempfile.TemporaryDirectory(prefix="soundfleet-bench-agent-") as state:
        cmd = [sys.executable, "-m", "soundfleet.cli", "edge", "run", "--source", str(wav), "--no-realtime",
               "--bundle", str(bundle_dir), "--frames-per-message", str(frames), "--broker", broker_url,
               "--state-dir", state, "--device", "bench", "--no-follow-models", "--drain-timeout-s", "10",
               "--log-level", "warning"]  # fmt: skip
        log.info("agent process: soundfleet edge run --source %s --broker %s", wav.name, broker_url)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        peak_kb = 0
        while proc.poll() is None:
            peak_kb = max(peak_kb, status_kb("VmHWM", proc.pid) or 0)  # None: exiting, or not Linux
            time.sleep(0.02)
        stderr = proc.stderr.read() if proc.stderr else ""
    if proc.returncode not in (0, 3):  # 3: finished with frames left in the spool (no broker)
        raise BenchError(f"the agent process failed (exit {proc.returncode}): {stderr[-500:]}")
    return {
        "peak_rss_mb": peak_kb * 1024 / BYTES_PER_MB if peak_kb else None,
        "broker": "acknowledged every message" if proc.returncode == 0 else "unreachable: spooled to disk",
    }


def machine_info() -> dict[str, Any]:
    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def run_edge_bench(
    bundle_dir: str | Path | None = None,
    seconds: float | None = None,
    repeats: int | None = None,
    frames_per_message: int = DEFAULT_FRAMES_PER_MESSAGE,
    log_level: str = "info",
    log_format: str = "text",
    measure_torch: Callable[[Path, Path, int, int], dict[str, Any]] | None = None,
    broker_url: str = "mqtt://127.0.0.1:1883",
) -> dict[str, Any]:
    """Run the edge benchmark; returns the report (see :func:`build_report`).

    ``measure_torch(wav, bundle_dir, repeats, frames_per_message)`` times the same path in
    torch eager (``training.bench_torch.measure_torch_eager``); it lives outside ``edge/``
    because the edge never imports torch. Without it the torch fields are null.
    """
    seconds = DEFAULT_SECONDS if seconds is None else seconds
    repeats = DEFAULT_REPEATS if repeats is None else repeats
    if not seconds * SAMPLE_RATE_HZ >= PATCH_SAMPLES:
        raise BenchError(f"--seconds must be at least one 25 ms patch, got {seconds}")
    if repeats < 1:
        raise BenchError(f"--repeats must be >= 1, got {repeats}")
    bundle_dir = Path(bundle_dir) if bundle_dir else bundle.default_bundle_dir()
    bundle.verify_bundle(bundle_dir, files=(bundle.EDGE_MODEL, bundle.CODEBOOK))  # names the path
    machine = machine_info()  # load average before we add to it
    with tempfile.TemporaryDirectory(prefix="soundfleet-bench-") as tmp:
        wav = Path(tmp) / "bench.wav"
        write_bench_audio(wav, seconds)
        edge = _run_edge_process(
            wav, bundle_dir, repeats, frames_per_message, log_level, log_format
        )
        agent = _run_agent_process(wav, bundle_dir, frames_per_message, broker_url)
        torch_eager = (
            measure_torch(wav, bundle_dir, repeats, frames_per_message)
            if measure_torch
            else {"available": False, "reason": "no torch comparison was requested"}
        )
    return build_report(edge, agent, torch_eager, machine, bundle_dir, repeats, frames_per_message)


def build_report(
    edge: dict,
    agent: dict,
    torch_eager: dict,
    machine: dict,
    bundle_dir: Path,
    repeats: int,
    frames_per_message: int,
) -> dict[str, Any]:
    audio_s = edge["audio_seconds"]
    bitrate = {mode: n * 8 / audio_s for mode, n in edge["payload_bytes"].items()}
    bitrate["pcm16"] = PCM16_BPS
    cpu_s = statistics.median(edge["cpu_seconds_repeats"])
    rtf = audio_s / max(cpu_s, 1e-9)
    torch_ok = torch_eager["available"]
    torch_cpu_s = statistics.median(torch_eager["cpu_seconds_repeats"]) if torch_ok else None
    torch_rtf = audio_s / max(torch_cpu_s, 1e-9) if torch_ok else None
    # the agent process is what the target is about; /proc polling can miss it off Linux
    peak_rss = agent["peak_rss_mb"] if agent["peak_rss_mb"] is not None else edge["peak_rss_mb"]
    source_of_peak = "agent process (soundfleet edge run)" if agent["peak_rss_mb"] is not None else "path process"
    report = {
        "benchmark": "edge",
        "measured": "WAV read (file_source) + 25 ms patches + onnxruntime front end/VQ (1 thread) "
        "+ FramesMessage.to_bytes, codes-only, timed without the network; peak RSS from the whole agent process (soundfleet edge run) on the same WAV",
        "realtime_factor_per_core": rtf,
        "torch_eager_realtime_factor_per_core": torch_rtf,
        "speedup_onnx_vs_torch": rtf / torch_rtf if torch_rtf else None,
        "torch_eager_unavailable_reason": None if torch_ok else torch_eager["reason"],
        "torch_onnx_code_agreement": torch_eager.get("code_agreement"),
        "peak_rss_mb": peak_rss,
        "peak_rss_source": source_of_peak,
        "agent_process": agent,
        "path_process_peak_rss_mb": edge["peak_rss_mb"],
        "rss_after_imports_mb": edge["rss_after_imports_mb"],
        "bitrate_bps": bitrate,
        "compression_vs_pcm16": {mode: PCM16_BPS / bps for mode, bps in bitrate.items()},
        "audio_seconds": audio_s,
        "cpu_seconds": cpu_s,
        "cpu_seconds_repeats": edge["cpu_seconds_repeats"],
        "torch_eager_cpu_seconds": torch_cpu_s,
        "repeats": repeats,
        "frames": edge["frames"],
        "messages": edge["messages"],
        "frames_per_message": frames_per_message,
        "model_version": edge["model_version"],
        "codebook_id": edge["codebook_id"],
        "codebook_size": edge["codebook_size"],
        "bundle_dir": str(bundle_dir),
        "edge_process": {"torch_loaded": edge["torch_loaded"]},
        "machine": {
            **machine,
            "onnxruntime": edge["onnxruntime"],
            "numpy": edge["numpy"],
            "torch": torch_eager.get("torch"),
        },
        "targets": dict(TARGETS),
    }
    report["meets_targets"] = {
        "realtime_factor_per_core": rtf >= TARGETS["realtime_factor_per_core"],
        "peak_rss_mb": peak_rss <= TARGETS["peak_rss_mb"],
        "codes_bitrate_bps": bitrate["codes"] <= TARGETS["codes_bitrate_bps"],
    }
    return report


def _yes(met: bool) -> str:
    return "yes" if met else "NO"


def format_table(report: dict[str, Any]) -> str:
    """A short human-readable summary of a report."""
    r, t, ok = report, report["targets"], report["meets_targets"]
    torch_rtf, speedup = r["torch_eager_realtime_factor_per_core"], r["speedup_onnx_vs_torch"]
    rows = [  # (what, measured, target, met)
        ("real time per core, onnx", f"{r['realtime_factor_per_core']:.0f}x",
         f">= {t['realtime_factor_per_core']}x", _yes(ok["realtime_factor_per_core"])),
        ("real time per core, torch eager", f"{torch_rtf:.0f}x" if torch_rtf else "n/a", "", ""),
        ("speedup onnx vs torch", f"{speedup:.1f}x" if speedup else "n/a", "", ""),
        ("peak RSS, edge process", f"{r['peak_rss_mb']:.1f} MB", f"<= {t['peak_rss_mb']} MB",
         _yes(ok["peak_rss_mb"])),
    ]  # fmt: skip
    for mode, bps in r["bitrate_bps"].items():
        codes = mode == "codes"
        rows.append((f"bitrate {mode}", f"{bps:.0f} bps ({r['compression_vs_pcm16'][mode]:.0f}:1)",
                     f"<= {t['codes_bitrate_bps']} bps" if codes else "",
                     _yes(ok["codes_bitrate_bps"]) if codes else ""))  # fmt: skip
    head = (
        f"soundfleet bench edge: {report['model_version']}, K={report['codebook_size']}, "
        f"{report['audio_seconds']:.1f} s of audio, median of {report['repeats']}, "
        f"{report['machine']['cpu_model']}"
    )
    if report["torch_eager_unavailable_reason"]:
        head += f"\n(torch eager: {report['torch_eager_unavailable_reason']})"
    lines = [head, f"{'':34}{'measured':>22}  {'target':>12}  met"]
    lines += [f"{name:34}{value:>22}  {target:>12}  {met}" for name, value, target, met in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(edge_main())
