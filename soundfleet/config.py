"""One typed configuration for every component, with file and environment overrides.

Precedence (lowest first): defaults here -> a TOML file -> environment
variables ``SOUNDFLEET_<SECTION>__<FIELD>`` -> command-line flags.

Stdlib dataclasses rather than pydantic on purpose: the edge agent must install
with numpy + onnxruntime + paho-mqtt only, and it reads this same config.
Every field documents its unit; validation errors name the field and, for
values from a file, the file and line.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.spool import FSYNC_POLICIES
from shared_models.constants import DEFAULT_FRAMES_PER_MESSAGE

ENV_PREFIX = "SOUNDFLEET_"


class ConfigError(ValueError):
    """A configuration value is unknown, has the wrong type, or breaks a rule."""


PAYLOAD_MODES = ("codes", "codes+loudness", "codes+embeddings")


@dataclass
class EdgeConfig:
    broker_url: str = field(default="mqtt://127.0.0.1:1883", metadata={"doc": "MQTT broker URL (mqtt:// or mqtts:// for TLS, optional user:pass@)"})
    username: str = field(default="", metadata={"doc": "MQTT username (overrides the URL's); prefer env SOUNDFLEET_EDGE__USERNAME"})
    password: str = field(default="", metadata={"doc": "MQTT password (overrides the URL's); prefer env SOUNDFLEET_EDGE__PASSWORD over a file"})
    tls_ca_file: str = field(default="", metadata={"doc": "CA certificates (PEM) that sign the broker's certificate, for mqtts://; empty = the system trust store"})
    tls_cert_file: str = field(default="", metadata={"doc": "client certificate (PEM) for brokers that require mutual TLS"})
    tls_key_file: str = field(default="", metadata={"doc": "private key (PEM) of the client certificate"})
    tls_insecure: bool = field(default=False, metadata={"doc": "do not check the broker's host name against its certificate (self-signed test brokers only)"})
    site: str = field(default="home", metadata={"doc": "site id used in topics ([A-Za-z0-9_-], 1-64 chars)"})
    device: str = field(default="edge-1", metadata={"doc": "device id used in topics"})
    source: str = field(default="synthetic", metadata={"doc": "audio source: 'mic' or 'mic:<index or name>' (PortAudio), a WAV/FLAC path, '-' for s16le PCM on stdin, or 'synthetic'"})
    input_rate_hz: int = field(default=16000, metadata={"doc": "sample rate of PCM on stdin, Hz (resampled to 16 kHz)"})
    input_channels: int = field(default=1, metadata={"doc": "channels of PCM on stdin (mixed to mono)"})
    bundle_dir: str = field(default="", metadata={"doc": "model bundle directory; empty = the bundle shipped in the package (a model rolled out over MQTT replaces either)"})
    frames_per_message: int = field(default=DEFAULT_FRAMES_PER_MESSAGE, metadata={"doc": "25 ms frames per MQTT message (40 = one message per second)"})
    payload: str = field(default="codes", metadata={"doc": "what each frame carries: 'codes' (about 0.9 kbit/s), 'codes+loudness' or 'codes+embeddings' (float16)"})
    gate_dbfs: float | None = field(default=None, metadata={"doc": "loudness gate in dBFS: frames quieter than this are sent as silent runs, not codes; unset = off (e.g. -60)"})
    realtime: bool = field(default=True, metadata={"doc": "pace file/synthetic sources at real time"})
    max_seconds: float = field(default=0.0, metadata={"doc": "stop after this much audio in seconds (0 = until the source ends)"})
    synthetic_seed: int = field(default=0, metadata={"doc": "seed of the synthetic source"})
    state_dir: str = field(default="", metadata={"doc": "spool, sequence numbers and rolled-out models; empty = $STATE_DIRECTORY (systemd), else $XDG_STATE_HOME/soundfleet or ~/.local/state/soundfleet"})
    spool_max_mb: float = field(default=64.0, metadata={"doc": "disk spool bound in MB (64 MB = about 6 days of codes-only audio); when full the oldest frames are dropped and counted"})
    spool_fsync: str = field(default="interval", metadata={"doc": "spool durability: 'always' (fsync each message), 'interval' (at most every spool_fsync_interval_s) or 'never' (the OS decides); SIGKILL loses nothing under any"})
    spool_fsync_interval_s: float = field(default=1.0, metadata={"doc": "seconds between spool fsyncs under 'interval': what a power cut can lose of unsent frames"})
    max_inflight: int = field(default=32, metadata={"doc": "frames messages sent but not yet acknowledged by the broker, at most"})
    reconnect_min_s: float = field(default=1.0, metadata={"doc": "first reconnect delay in seconds; doubles per failure (with jitter) up to reconnect_max_s"})
    reconnect_max_s: float = field(default=60.0, metadata={"doc": "longest reconnect delay in seconds"})
    heartbeat_s: float = field(default=30.0, metadata={"doc": "seconds between retained status heartbeats (uptime, spool depth, CPU, RSS)"})
    follow_models: bool = field(default=True, metadata={"doc": "follow the retained model announcement: fetch, verify and hot-swap new edge models"})
    drain_timeout_s: float = field(default=30.0, metadata={"doc": "when a finite source ends, wait this long for the broker to ack what is spooled (the rest is sent on the next start)"})

    def validate(self) -> None:
        if not 1 <= self.frames_per_message <= 4000:
            raise ConfigError("edge.frames_per_message must be within 1..4000")
        if self.max_seconds < 0:
            raise ConfigError("edge.max_seconds must be >= 0")
        if self.payload not in PAYLOAD_MODES:
            raise ConfigError(f"edge.payload must be one of {', '.join(PAYLOAD_MODES)}, got {self.payload!r}")
        if self.spool_fsync not in FSYNC_POLICIES:
            raise ConfigError(f"edge.spool_fsync must be one of {', '.join(FSYNC_POLICIES)}, got {self.spool_fsync!r}")
        if self.gate_dbfs is not None and not -120.0 <= self.gate_dbfs <= 0.0:
            raise ConfigError("edge.gate_dbfs must be within -120..0 dBFS (or unset)")
        if self.spool_max_mb < 0.1:
            raise ConfigError("edge.spool_max_mb must be >= 0.1")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ConfigError("edge needs 0 < reconnect_min_s <= reconnect_max_s")
        if self.max_inflight < 1 or self.heartbeat_s <= 0 or self.drain_timeout_s < 0:
            raise ConfigError("edge.max_inflight must be >= 1, heartbeat_s > 0 and drain_timeout_s >= 0")
        if not 1000 <= self.input_rate_hz <= 384_000 or not 1 <= self.input_channels <= 64:
            raise ConfigError("edge.input_rate_hz must be within 1000..384000 and input_channels within 1..64")


@dataclass
class CloudConfig:
    broker_url: str = field(default="mqtt://127.0.0.1:1883", metadata={"doc": "MQTT broker URL the ingest subscribes to"})
    redis_url: str = field(default="redis://127.0.0.1:6379/0", metadata={"doc": "Redis URL for device state, context and events"})
    bundle_dir: str = field(default="", metadata={"doc": "model bundle directory; empty = the shipped bundle"})
    http_host: str = field(default="127.0.0.1", metadata={"doc": "HTTP API bind address"})
    http_port: int = field(default=8000, metadata={"doc": "HTTP API port"})
    key_prefix: str = field(default="sf:", metadata={"doc": "prefix of every Redis key the cloud writes"})
    on_threshold: float | None = field(default=None, metadata={"doc": "probability at which an event starts; unset = the bundle's per-label calibrated thresholds"})
    off_threshold: float = field(default=0.3, metadata={"doc": "probability below which an active event ends (hysteresis)"})
    min_windows: int | None = field(default=None, metadata={"doc": "consecutive 1 s windows above on_threshold before an event starts; unset = the bundle's per-label calibrated minimum (1 where it has none)"})
    hold_windows: int = field(default=1, metadata={"doc": "windows below off_threshold an active event survives (bridges short pauses)"})
    cooldown_s: float = field(default=2.0, metadata={"doc": "seconds after an event ends before the same label can start again on a device"})
    events_maxlen: int = field(default=100_000, metadata={"doc": "approximate retention of the Redis event stream, in entries"})
    ingest_replicas: int = field(default=1, metadata={"doc": "ingest replicas; > 1 joins them in one MQTT shared subscription (the broker must support $share, e.g. Mosquitto)"})
    ingest_share_group: str = field(default="soundfleet-ingest", metadata={"doc": "MQTT shared subscription group of the ingest replicas (used when ingest_replicas > 1)"})
    reorder_window_s: float = field(default=2.0, metadata={"doc": "how long a device's late frame is waited for before the gap is counted as lost and the stream goes on"})
    max_pending: int = field(default=30, metadata={"doc": "frames messages parked behind a gap per device before the gap is given up"})
    archive_sites: str = field(default="", metadata={"doc": "fleet archive, opt-in: comma-separated sites whose code sequences are kept as training data ('*' = all, empty = none)"})
    archive_maxlen: int = field(default=1_000_000, metadata={"doc": "archive stream bound in messages (about 120 MB of codes-only); roll it to Parquet with `soundfleet fleet archive`"})
    ha_discovery_prefix: str = field(default="homeassistant", metadata={"doc": "Home Assistant MQTT discovery prefix: an event entity per device is announced there (empty = off)"})
    ingest_manual_ack: bool = field(default=True, metadata={"doc": "acknowledge a frame to the broker only once it is in Redis, on a persistent session with a stable client id (cloud/mqtt_session.py): an ingest crash, a Redis stall or an overload means redelivery and lag, never loss; false = paho's ack on receipt (the old behaviour, kept for bench cloud's side-by-side)"})
    ingest_workers: int = field(default=2, metadata={"doc": "threads processing frames in each ingest replica (devices are pinned to one); each works in rounds of everything waiting in its queue, so two keep a model request in flight while the other round does Redis (on 2 cores, 2 beat 1 and 4 in bench cloud)"})
    ingest_batch_size: int = field(default=256, metadata={"doc": "most messages one ingest worker takes per round (one Redis round trip per step and one model request for all of them); 1 turns the ingest's batching off"})
    ingest_queue: int = field(default=10_000, metadata={"doc": "bounded ingest queue length, in messages (backpressure beyond it)"})
    ingest_stuck_after_s: float = field(default=30.0, metadata={"doc": "/readyz fails when an ingest round has not finished for this long (Redis away, a model not answering): the work is waiting, not lost"})
    ingest_lag_warn_s: float = field(default=10.0, metadata={"doc": "/readyz warns when frames are classified this long after capture (soundfleet_ingest_lag_seconds): the fleet outruns the cloud, or a device replays its spool"})
    model_max_replicas: int = field(default=1, metadata={"doc": "replicas per model deployment: 1 = fixed; more = Serve autoscaling between 1 and this (on GPUs or many cores)"})
    max_batch_size: int = field(default=32, metadata={"doc": "Serve dynamic batching: most requests (each with a round's windows) merged into one model call"})
    batch_wait_timeout_s: float = field(default=0.0, metadata={"doc": "Serve dynamic batching: longest wait to fill a batch, in seconds (0: merge only the requests already waiting; the ingest's rounds are batches already)"})

    def validate(self) -> None:
        if not 0.0 < self.off_threshold < 1.0:
            raise ConfigError("cloud.off_threshold must be within (0, 1)")
        if self.on_threshold is not None and not self.off_threshold <= self.on_threshold < 1.0:
            raise ConfigError("cloud thresholds need 0 < off_threshold <= on_threshold < 1")
        if self.ingest_replicas < 1 or self.model_max_replicas < 1 or self.max_pending < 1 or self.reorder_window_s < 0:
            raise ConfigError("cloud.ingest_replicas, model_max_replicas and max_pending must be >= 1, reorder_window_s >= 0")
        if (self.min_windows is not None and self.min_windows < 1) or self.ingest_workers < 1 \
                or self.ingest_queue < 1 or self.ingest_batch_size < 1:
            raise ConfigError("cloud.min_windows, ingest_workers, ingest_queue and ingest_batch_size must be >= 1")
        if not (self.ingest_stuck_after_s > 0 and self.ingest_lag_warn_s > 0):
            raise ConfigError("cloud.ingest_stuck_after_s and ingest_lag_warn_s must be > 0")


@dataclass
class TrainConfig:
    workers: int = field(default=2, metadata={"doc": "Ray Train workers per stage (DDP when > 1)"})
    use_gpu: str = field(default="auto", metadata={"doc": "'auto' (use GPUs when Ray sees them), 'true' or 'false'"})
    seed: int = field(default=0, metadata={"doc": "seed of every random choice in training"})
    codebook_size: int = field(default=256, metadata={"doc": "K, the number of VQ codes"})
    kmeans_minibatch: int = field(default=0, metadata={"doc": "points per mini-batch k-means step; 0 = full-batch Lloyd's (use mini-batches for K in the thousands)"})
    frontend: str = field(default="dense", metadata={"doc": "edge front end: 'dense' (S3 learned front end on raw 25 ms patches) or 'autoencoder' (S2 log-mel patch autoencoder)"})
    frontend_hidden: int = field(default=256, metadata={"doc": "front-end hidden units (the S3 paper uses 2000)"})
    frontend_epochs: int = field(default=20, metadata={"doc": "front-end training epochs"})
    code_lm_epochs: int = field(default=12, metadata={"doc": "code Transformer training epochs"})
    classifier_epochs: int = field(default=6, metadata={"doc": "classifier training epochs"})
    classifier_pooling: str = field(default="meanmax", metadata={"doc": "classifier pooling of intermediate embeddings: 'meanmax' or 'wavelet' (S3's parameter-free multi-scale pooling)"})
    split_by_source: bool = field(default=True, metadata={"doc": "keep every clip of one source (a Debian package, the cuts of one file: files named <source>__<rest>.wav) in one of train / validation / test, so validation and test hold sources the models never heard"})
    pretrain_on: str = field(default="all", metadata={"doc": "clips the label-free stages (front end, codebook, code LM) learn from: 'all' training clips, labelled or not (S2's label-free pretraining), or only the 'labelled' ones (its ablation)"})
    holdout_fraction: float = field(default=0.15, metadata={"doc": "fraction of clips held out for evaluation"})
    augment_per_label: int = field(default=160, metadata={"doc": "mixtures per label of weakly labelled event recordings (a folder of real barks) into the dataset's real negatives, for training (a quarter as many for validation); 0 = none"})
    false_events_per_24h: float = field(default=1.0, metadata={"doc": "false-alarm budget the per-label thresholds are calibrated for, on the validation clips' negatives (all labels together)"})
    calibration_max_min_windows: int = field(default=3, metadata={"doc": "the calibration also tries 1 .. this many consecutive 1 s windows before an event starts, per label, and keeps the one with the best recall within the budget"})
    few_shot_negative_minutes: float = field(default=30.0, metadata={"doc": "`train --base`: minutes of the synthetic corpus generated as negatives for a user's new classes"})
    few_shot_epochs: int = field(default=10, metadata={"doc": "`train --base`: epochs of the new classifier outputs"})
    checkpoint_every: int = field(default=1, metadata={"doc": "epochs between Ray Train checkpoints"})
    storage_path: str = field(default="", metadata={"doc": "Ray Train storage for checkpoints; empty = OUT/ray_runs"})

    def validate(self) -> None:
        if self.workers < 1:
            raise ConfigError("train.workers must be >= 1")
        if self.use_gpu not in ("auto", "true", "false"):
            raise ConfigError("train.use_gpu must be 'auto', 'true' or 'false'")
        if self.kmeans_minibatch < 0:
            raise ConfigError("train.kmeans_minibatch must be >= 0")
        if self.frontend not in ("dense", "autoencoder"):
            raise ConfigError("train.frontend must be 'dense' or 'autoencoder'")
        if self.pretrain_on not in ("all", "labelled"):
            raise ConfigError("train.pretrain_on must be 'all' or 'labelled'")
        if self.classifier_pooling not in ("meanmax", "wavelet"):
            raise ConfigError("train.classifier_pooling must be 'meanmax' or 'wavelet'")
        if not 2 <= self.codebook_size <= 65536:
            raise ConfigError("train.codebook_size must be within 2..65536 (codes are uint16)")
        if self.augment_per_label < 0:
            raise ConfigError("train.augment_per_label must be >= 0")
        if not self.false_events_per_24h >= 0:
            raise ConfigError("train.false_events_per_24h must be >= 0")
        if not 1 <= self.calibration_max_min_windows <= 10:
            raise ConfigError("train.calibration_max_min_windows must be in [1, 10]")
        if not self.few_shot_negative_minutes > 0 or self.few_shot_epochs < 1:
            raise ConfigError("train.few_shot_negative_minutes must be > 0 and train.few_shot_epochs >= 1")


@dataclass
class Config:
    edge: EdgeConfig = field(default_factory=EdgeConfig)
    cloud: CloudConfig = field(default_factory=CloudConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Defaults, then the TOML file at ``path`` (if any), then ``SOUNDFLEET_*`` env vars."""
    config = Config()
    env = os.environ if env is None else env
    if path is None and env.get(ENV_PREFIX + "CONFIG"):
        path = env[ENV_PREFIX + "CONFIG"]
    if path is not None:
        path = Path(path)
        text = path.read_text()
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        for section, values in data.items():
            target = _section(config, section, f"{path}")
            if not isinstance(values, dict):
                raise ConfigError(f"{path}:{_line_of(text, section)}: [{section}] must be a table")
            for key, value in values.items():
                _assign(target, section, key, value, f"{path}:{_line_of(text, key)}")
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        _assign(_section(config, section, f"env {name}"), section, key, raw, f"env {name}")
    for section in dataclasses.fields(config):
        getattr(config, section.name).validate()
    return config


def apply_flags(section: Any, overrides: dict[str, Any]) -> None:
    """Command-line flags given (not None) override the config section's fields: the last
    step of the precedence (defaults, TOML file, environment, flags)."""
    for name, value in overrides.items():
        if value is not None:
            setattr(section, name, value)


def field_docs(section_cls: type) -> dict[str, str]:
    """Field name -> doc string, used to write --help texts."""
    return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(section_cls)}


def _section(config: Config, name: str, where: str) -> Any:
    if name not in {f.name for f in dataclasses.fields(config)}:
        known = ", ".join(f.name for f in dataclasses.fields(config))
        raise ConfigError(f"{where}: unknown config section {name!r} (known: {known})")
    return getattr(config, name)


def _assign(target: Any, section: str, key: str, value: Any, where: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(target)}
    if key not in fields:
        raise ConfigError(f"{where}: unknown field {section}.{key} (known: {', '.join(fields)})")
    hint = typing.get_type_hints(type(target))[key]
    setattr(target, key, _coerce(value, hint, f"{where}: {section}.{key}"))


def _coerce(value: Any, hint: Any, what: str) -> Any:
    if isinstance(hint, types.UnionType):  # e.g. str | None
        if value in (None, "", "none", "None"):
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{what}: expected a boolean, got {value!r}")
    try:
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return hint(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: expected {hint.__name__}, got {value!r}") from None


def _line_of(text: str, key: str) -> int:
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith(key) or stripped.startswith(f"[{key}"):
            return number
    return 0
