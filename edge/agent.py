"""The edge agent: audio blocks -> frames messages -> disk spool -> MQTT at QoS 1.

The audio thread reads a source, cuts one message of frames at a time, runs
the ONNX front end + VQ (`EdgeEncoder`), marks frames under the loudness gate
as silent, packs the message (`shared_models.wire`) and appends it to the
spool. It never waits on the network: the publisher's sender thread delivers
spooled messages in order (see `edge.publisher`). A model rolled out on the
retained ``soundfleet/v1/models/edge`` topic is fetched and verified on a
third thread; the audio thread swaps to it between two messages, so no frame
is lost and every frame after the swap carries the new codebook id.

State under ``<state_dir>/<site>.<device>/``: ``spool/`` (unsent frames and
the next sequence number), ``models/`` (rolled-out bundles) and
``current_model`` (the one in use, kept across restarts).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from edge.encoder import EdgeEncoder, Encoded
from edge.link import LinkSettings
from edge.model_update import (
    ModelUpdateError,
    fetch_model,
    prune_models,
    read_current,
    write_current,
)
from edge.procstat import BYTES_PER_MB, CpuMeter, rss_mb
from edge.publisher import DryRunPublisher, Publisher, SpoolingPublisher
from edge.spool import Spool
from shared_models.bundle import BundleError
from shared_models.callbacks import CallbackGuard
from shared_models.constants import HOP_SAMPLES, NS_PER_SECOND, PATCH_SAMPLES, SAMPLE_RATE_HZ
from shared_models.wire import (
    MODELS_EDGE_TOPIC,
    FramesMessage,
    ModelAnnouncement,
    StatusMessage,
    WireError,
    frames_topic,
    status_topic,
    validate_name,
)
from soundfleet.config import EdgeConfig

log = logging.getLogger(__name__)

AGENT_VERSION = "0.2.0"


@dataclass
class AgentStats:
    messages: int = 0
    frames: int = 0
    silent_frames: int = 0
    payload_bytes: int = 0
    audio_seconds: float = 0.0
    first_seq: int | None = None
    last_seq: int | None = None
    spool_rejected: int = 0  # messages the spool could not keep (disk full, nothing left to drop)
    unsent: int = 0  # still spooled when the run ended (sent on the next start)
    model_swaps: int = 0


def default_state_dir() -> Path:
    """systemd's StateDirectory=, else the XDG state directory."""
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "soundfleet"


def message_chunks(blocks: Iterator[np.ndarray], samples_per_message: int) -> Iterator[np.ndarray]:
    """Re-cut audio blocks of any length into one chunk of ``samples_per_message`` per message.

    The last chunk is cut to whole patches and may be shorter; less than one patch is dropped.
    """
    buffer = np.zeros(0, dtype=np.float32)
    for block in blocks:
        buffer = np.concatenate([buffer, block])
        while len(buffer) >= samples_per_message:
            chunk, buffer = buffer[:samples_per_message], buffer[samples_per_message:]
            yield chunk
    tail = len(buffer) // PATCH_SAMPLES * PATCH_SAMPLES
    if tail:
        yield buffer[:tail]


def pack_frames(
    encoded: Encoded,
    codebook_id: int,
    seq: int,
    t_start_ns: int,
    *,
    payload: str = "codes",
    gate_dbfs: float | None = None,
) -> FramesMessage:
    """One chunk's encoder output as the message the agent publishes.

    ``payload`` is a `soundfleet.config.PAYLOAD_MODES` name; frames quieter than
    ``gate_dbfs`` go on the wire as silent runs instead of codes."""
    silent = None
    if gate_dbfs is not None:
        silent = encoded.loudness_dbfs < gate_dbfs
        if not silent.any():
            silent = None
    return FramesMessage(
        codebook_id=codebook_id,
        seq=seq,
        t_start_ns=t_start_ns,
        codes=encoded.codes,
        loudness_dbfs=encoded.loudness_dbfs if payload == "codes+loudness" else None,
        embeddings=encoded.embeddings if payload == "codes+embeddings" else None,
        silent=silent,
    )


class EdgeAgent:
    def __init__(
        self,
        config: EdgeConfig,
        encoder: EdgeEncoder | None = None,
        state_dir: Path | None = None,
        *,
        dry_run_out: TextIO | None = None,
    ):
        """``dry_run_out``: print each message there as JSON instead of sending it."""
        config.validate()
        validate_name(config.site)
        validate_name(config.device)
        self.config = config
        self.started_mono = time.monotonic()
        base = Path(state_dir or config.state_dir or default_state_dir())
        self.device_dir = base / f"{config.site}.{config.device}"
        self.models_dir = self.device_dir / "models"
        self.encoder = encoder or EdgeEncoder(self._startup_bundle())
        self.stats = AgentStats()
        self.model_error = ""
        self.callback_guard = CallbackGuard(log)  # the broker link's callbacks; counted in the status
        self._next_encoder: EdgeEncoder | None = None  # handed over by the model thread
        self._announcements: queue.Queue[ModelAnnouncement] = queue.Queue(maxsize=1)
        self._refused: set[tuple[str, str]] = set()  # (model_version, sha256) already refused
        self._cpu = CpuMeter()
        self._topic = frames_topic(config.site, config.device)
        if dry_run_out is not None:
            self.spool = None
            self.publisher: Publisher = DryRunPublisher(dry_run_out, self._topic)
        else:
            self.spool = Spool(
                self.device_dir / "spool",
                max_bytes=int(config.spool_max_mb * BYTES_PER_MB),
                segment_bytes=max(4096, min(1 << 20, int(config.spool_max_mb * BYTES_PER_MB) // 8)),
                fsync=config.spool_fsync,
                fsync_interval_s=config.spool_fsync_interval_s,
            )
            subscriptions = {MODELS_EDGE_TOPIC: self._on_announcement} if config.follow_models else {}
            self.publisher = SpoolingPublisher(
                self.spool,
                self._link_settings(),
                frames_topic=self._topic,
                status_topic=status_topic(config.site, config.device),
                status=self._status,
                heartbeat_s=config.heartbeat_s,
                subscriptions=subscriptions,
                callback_guard=self.callback_guard,
            )

    def _startup_bundle(self) -> Path | None:
        """The last model rolled out to this device, if it still verifies; else the configured one."""
        if self.config.follow_models and (current := read_current(self.device_dir)) is not None:
            log.info("using the rolled-out model at %s", current)
            return current
        return Path(self.config.bundle_dir) if self.config.bundle_dir else None

    def _link_settings(self) -> LinkSettings:
        c = self.config
        return LinkSettings(
            broker_url=c.broker_url,
            client_id=f"sf-edge-{c.site}-{c.device}",
            username=c.username,
            password=c.password,
            tls_ca_file=c.tls_ca_file,
            tls_cert_file=c.tls_cert_file,
            tls_key_file=c.tls_key_file,
            tls_insecure=c.tls_insecure,
            reconnect_min_s=c.reconnect_min_s,
            reconnect_max_s=c.reconnect_max_s,
            max_inflight=c.max_inflight,
        )

    # --- status -------------------------------------------------------------------------
    def _status(self, state: str) -> bytes:
        """"online" (a heartbeat), "offline" (a clean stop) or "will": the MQTT last will, offline
        with t_ns 0 ("unknown", docs/WIRE.md), since the broker publishes it at some later time."""
        spool = self.spool.stats() if self.spool is not None else None
        live = state == "online"
        return StatusMessage(
            state="offline" if state == "will" else state,
            agent_version=AGENT_VERSION,
            model_version=self.encoder.model_version,
            codebook_id=self.encoder.codebook_id,
            t_ns=0 if state == "will" else time.time_ns(),
            uptime_s=round(time.monotonic() - self.started_mono, 1) if live else 0.0,
            spool_depth=spool.depth if spool else 0,
            spool_dropped=spool.dropped if spool else 0,
            cpu_percent=round(self._cpu.percent(), 1) if live else 0.0,
            rss_mb=round(rss_mb(), 1) if live else 0.0,
            model_error=self.model_error,
            callback_errors=self.callback_guard.errors,
        ).to_bytes()

    # --- model rollout --------------------------------------------------------------------
    def _on_announcement(self, payload: bytes) -> None:  # paho's network thread: no I/O here
        if not payload:
            return  # the retained announcement was cleared
        try:
            announcement = ModelAnnouncement.from_bytes(payload)
        except WireError as exc:
            self._refuse("?", f"malformed model announcement: {exc}")
            return
        try:
            self._announcements.get_nowait()  # only the newest matters
        except queue.Empty:
            pass
        self._announcements.put_nowait(announcement)

    def _model_loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                announcement = self._announcements.get(timeout=0.2)
            except queue.Empty:
                continue
            self._apply(announcement)

    def _apply(self, a: ModelAnnouncement) -> None:
        current = self._next_encoder or self.encoder
        if (a.model_version, a.codebook_id) == (current.model_version, current.codebook_id):
            return  # the retained announcement of the model already running (every reconnect)
        if (a.model_version, a.sha256) in self._refused:
            return
        log.info("model %s announced (codebook %d); fetching %s", a.model_version, a.codebook_id, a.url)
        try:
            bundle_dir = fetch_model(a, self.models_dir)
            encoder = EdgeEncoder(bundle_dir)
        except (ModelUpdateError, BundleError, OSError) as exc:
            self._refused.add((a.model_version, a.sha256))
            self._refuse(a.model_version, str(exc))
            return
        except Exception as exc:  # a model that crashes onnxruntime must not take the agent down
            log.exception("unexpected failure loading model %s", a.model_version)
            self._refused.add((a.model_version, a.sha256))
            self._refuse(a.model_version, f"{type(exc).__name__}: {exc}")
            return
        write_current(self.device_dir, bundle_dir)
        prune_models(self.models_dir, keep={bundle_dir, current.bundle_dir})
        self.model_error = ""
        self._next_encoder = encoder  # the audio thread swaps between two messages

    def _refuse(self, version: str, reason: str) -> None:
        self.model_error = f"{version}: {reason}"[:500]
        log.error("refused model %s; keeping %s", self.model_error, self.encoder.model_version)
        self.publisher.request_status()

    def _maybe_swap(self) -> None:
        encoder, self._next_encoder = self._next_encoder, None
        if encoder is None:
            return
        log.info("swapped model %s (codebook %d) -> %s (codebook %d)", self.encoder.model_version,
                 self.encoder.codebook_id, encoder.model_version, encoder.codebook_id)
        self.encoder = encoder
        self.stats.model_swaps += 1
        self.publisher.request_status()

    # --- streaming --------------------------------------------------------------------------
    def run(self, blocks: Iterator[np.ndarray]) -> AgentStats:
        """Stream ``blocks`` of 16 kHz mono audio until they end; returns what was sent."""
        stop = threading.Event()
        model_thread = threading.Thread(target=self._model_loop, args=(stop,), name="edge-models", daemon=True)
        self.publisher.start()
        model_thread.start()
        try:
            self._stream(blocks)
            self.stats.unsent = self.publisher.drain(self.config.drain_timeout_s)
        finally:
            stop.set()
            model_thread.join(timeout=5)
            self.publisher.close()
        s = self.stats
        log.info("read %.1f s of audio: %d messages (seq %s..%s), %d frames (%d silent), %d payload bytes",
                 s.audio_seconds, s.messages, s.first_seq, s.last_seq, s.frames, s.silent_frames, s.payload_bytes)
        if s.unsent:
            log.warning("%d messages not yet acknowledged by the broker stay in the spool at %s; "
                        "they are sent on the next start", s.unsent, self.device_dir / "spool")
        return s

    def _stream(self, blocks: Iterator[np.ndarray]) -> None:
        per_message = self.config.frames_per_message * HOP_SAMPLES
        t0_ns, t0_mono = time.time_ns(), time.monotonic()
        self.t0_ns = t0_ns  # capture time of the first sample; frame timestamps count from here
        sent_samples = 0
        seq = self._first_seq()
        for chunk in message_chunks(blocks, per_message):
            self._maybe_swap()
            t_start_ns = t0_ns + sent_samples * NS_PER_SECOND // SAMPLE_RATE_HZ
            self._submit(seq, chunk, t_start_ns)
            seq += 1
            sent_samples += len(chunk)
            if self.config.realtime and len(chunk) == per_message:
                # publish no earlier than the audio could have been captured (not after the tail)
                delay = t0_mono + sent_samples / SAMPLE_RATE_HZ - time.monotonic()
                if delay > 0:
                    time.sleep(delay)

    def _first_seq(self) -> int:
        """Sequence numbers continue across restarts (the cloud drops a seq it has seen)."""
        if self.spool is None:
            return 0
        return self.spool.stats().next_seq or 0

    def _submit(self, seq: int, chunk: np.ndarray, t_start_ns: int) -> None:
        encoded = self.encoder.encode(chunk.reshape(-1, PATCH_SAMPLES))  # (N, PATCH_SAMPLES)
        message = pack_frames(encoded, self.encoder.codebook_id, seq, t_start_ns,
                              payload=self.config.payload, gate_dbfs=self.config.gate_dbfs)
        payload = message.to_bytes()
        if not self.publisher.submit(seq, payload):
            self.stats.spool_rejected += 1
        s = self.stats
        s.first_seq = seq if s.first_seq is None else s.first_seq
        s.last_seq = seq
        s.messages += 1
        s.frames += message.frame_count
        s.silent_frames += int(message.silent.sum()) if message.silent is not None else 0
        s.payload_bytes += len(payload)
        s.audio_seconds += len(chunk) / SAMPLE_RATE_HZ
