"""The soundfleet wire format: every payload byte that crosses MQTT is packed and parsed here.

Stdlib + numpy only (the edge imports it). One frozen dataclass per message, with
``to_bytes``/``from_bytes``; bad input raises a named :class:`WireError`, never returns
None. Byte layout, topics and JSON examples: ``docs/WIRE.md``."""

from __future__ import annotations

import json
import re
import struct
import zlib
from dataclasses import MISSING, asdict, dataclass, fields
from datetime import UTC, datetime, timedelta
from numbers import Real
from typing import Any, Literal, Self

import numpy as np

from shared_models.constants import HOP_SAMPLES, NS_PER_SECOND, SAMPLE_RATE_HZ, SILENCE_DBFS


# --- errors ----------------------------------------------------------------
class WireError(ValueError):
    """A payload or a field that breaks the wire contract; the subclass names the failure."""


class BadMagic(WireError): ...  # the payload does not start with MAGIC


class UnsupportedVersion(WireError): ...  # the header's version is not in SUPPORTED_VERSIONS


class Truncated(WireError): ...  # shorter than header + crc, or than the header says


class TrailingBytes(WireError): ...  # longer than the header says


class ChecksumMismatch(WireError): ...  # the CRC32 does not match the bytes before it


class PayloadTooLarge(WireError): ...  # over the size limit (payload, or a message's encoding)


class InvalidField(WireError): ...  # a field out of range, inconsistent or malformed


# --- frames payload layout -----------------------------------------------------
MAGIC = b"SFC1"
WIRE_VERSION = 1
SUPPORTED_VERSIONS: tuple[int, ...] = (WIRE_VERSION,)
MAX_PAYLOAD_BYTES = 256 * 1024  # bytes, for every message type, produced or accepted
MAX_FRAMES_PER_MESSAGE = 4000  # 100 s at 40 frames/s; the edge sends 40 (1 s) per message
FLAG_LOUDNESS = 0x01  # per-frame float16 loudness (dBFS) follows the codes
FLAG_EMBEDDINGS = 0x02  # per-frame float16 embeddings follow (after the loudness, if any)
FLAG_SILENCE = 0x04  # silent-frame runs follow the header; silent frames send nothing else
KNOWN_FLAGS = FLAG_LOUDNESS | FLAG_EMBEDDINGS | FLAG_SILENCE

# Silent frames (below the edge's loudness gate) are sent as runs, not as codes. In memory a
# FramesMessage keeps full-length arrays and holds these fill values at the silent positions.
# Codebooks have at most 65535 entries (0..65534), so SILENT_CODE is never a real code.
SILENT_CODE = 0xFFFF
SILENT_LOUDNESS_DBFS = SILENCE_DBFS  # the loudness floor: a silent frame reads as quiet, not 0 dBFS
SILENT_EMBEDDING = 0.0

# magic, version, flags, codebook_id, seq, t_start_ns, sample_rate_hz, hop, frame_count, emb. dim
HEADER = struct.Struct("<4sBBIIQIHHH")
HEADER_BYTES = HEADER.size  # 32
RUN_COUNT = struct.Struct("<H")  # n_runs, first in the body when FLAG_SILENCE is set
RUN = struct.Struct("<HH")  # start_frame, length: one run of silent frames
CRC = struct.Struct("<I")
CRC_BYTES = CRC.size  # 4
MIN_PAYLOAD_BYTES = HEADER_BYTES + CRC_BYTES  # 36: a valid payload has a code or a run more

_U16 = 1 << 16
_U32 = 1 << 32
_INT64_MAX = (1 << 63) - 1
_FLOAT_MAX = float.fromhex("0x1.fffffffffffffp+1023")  # the largest finite float
_CODE_DTYPE = np.dtype("<u2")
_FLOAT16_DTYPE = np.dtype("<f2")


def _check_int(name: str, value: Any, low: int, high: int) -> int:
    """``value`` as a Python int in ``[low, high]``, else InvalidField naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InvalidField(f"{name} must be an integer, got {type(value).__name__}")
    if not low <= int(value) <= high:
        raise InvalidField(f"{name} must be in [{low}, {high}], got {_preview(value)}")
    return int(value)


def _check_nonnegative(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= value < _FLOAT_MAX:
        raise InvalidField(f"{name} must be a finite number >= 0, got {_preview(value)}")
    return float(value)


def _preview(value: Any, limit: int = 40) -> str:
    """``repr(value)`` cut to ``limit`` characters: an error message never echoes a whole payload."""
    if isinstance(value, int) and abs(value) >= 10**limit:  # repr of a 5,000-digit int raises
        return f"<a {value.bit_length()}-bit integer>"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_float16(
    name: str, value: Any, shape: tuple[int, ...], silent: np.ndarray | None, fill: float
) -> np.ndarray:
    """A read-only float16 copy of ``value`` of exactly ``shape``, all finite, with ``fill``
    in the rows of the ``silent`` frames (they are not sent)."""
    arr = np.asarray(value)
    if arr.shape != shape or arr.dtype.kind not in "iuf":
        raise InvalidField(f"{name} must be numbers of shape {shape}, got {arr.dtype} {arr.shape}")
    with np.errstate(over="ignore"):
        arr16 = arr.astype(np.float16)  # a copy, even when arr is float16 already
    if not np.isfinite(arr16).all():
        raise InvalidField(f"{name} must be finite and within float16 range (|x| <= 65504)")
    if silent is not None:
        arr16[silent] = fill
    arr16.flags.writeable = False
    return arr16


def silent_runs(mask: Any) -> list[tuple[int, int]]:
    """``(start_frame, length)`` of each stretch of True in a 1-D bool mask, in order and
    merged (runs never touch): the FLAG_SILENCE run table. Inverse of :func:`silent_mask`."""
    mask = np.asarray(mask)
    if mask.ndim != 1 or mask.dtype != np.bool_:
        raise InvalidField(f"silent must be a 1-D bool mask, got {mask.dtype} {mask.shape}")
    edges = np.diff(mask.astype(np.int8), prepend=0, append=0)  # (N + 1,): +1 run start, -1 end
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return [(int(start), int(end - start)) for start, end in zip(starts, ends, strict=True)]


def silent_mask(runs: Any, frame_count: int) -> np.ndarray:
    """(frame_count,) bool mask, True inside ``runs``; InvalidField unless the runs are what
    :func:`silent_runs` produces: length >= 1, within frame_count, sorted, not overlapping and
    not adjacent (adjacent runs must be merged into one)."""
    mask = np.zeros(frame_count, dtype=bool)
    prev_start, prev_end = -1, -1  # frames [prev_start, prev_end) of the previous run
    for i, (start, length) in enumerate(runs):
        start = _check_int(f"silence run {i} start_frame", start, 0, _U16 - 1)
        length = _check_int(f"silence run {i} length", length, 1, _U16 - 1)
        where = f"silence run {i} (start_frame {start}, length {length})"
        if start + length > frame_count:
            raise InvalidField(f"{where} passes frame_count {frame_count}")
        if start <= prev_start:
            raise InvalidField(f"{where} is not after run {i - 1}: runs must be sorted")
        if start < prev_end:
            raise InvalidField(f"{where} overlaps run {i - 1}, which ends at frame {prev_end}")
        if start == prev_end:
            raise InvalidField(f"{where} touches run {i - 1}: adjacent runs must be merged")
        mask[start : start + length] = True
        prev_start, prev_end = start, start + length
    return mask


@dataclass(frozen=True, eq=False)
class FramesMessage:
    """One batch of consecutive code frames from one device (edge -> cloud, binary).

    Arrays are kept as read-only copies (codes uint16, loudness and embeddings float16),
    so a decoded message equals (``==``) the one encoded. Frames marked ``silent`` (below the
    edge's loudness gate) are sent as runs, without code, loudness or embedding; in memory the
    arrays keep all N rows and hold SILENT_CODE, SILENT_LOUDNESS_DBFS and SILENT_EMBEDDING at
    the silent positions (whatever was passed there is replaced)."""

    codebook_id: int
    """u32 id of the codebook the codes index (sha256 prefix of the centroids)."""
    seq: int
    """u32 per-device message number, +1 per message; the cloud dedups and reorders on it."""
    t_start_ns: int
    """Capture time of the first sample of frame 0, unix time in ns (u64 on the wire, < 2**63)."""
    codes: np.ndarray
    """(N,) uint16 codebook indices, one per frame, 1 <= N <= MAX_FRAMES_PER_MESSAGE;
    SILENT_CODE at silent frames, and (in a message with silent frames) nowhere else."""
    sample_rate_hz: int = SAMPLE_RATE_HZ
    """u32 sample rate of the audio the codes were computed from, in Hz (> 0)."""
    hop_samples: int = HOP_SAMPLES
    """u16 frame hop in samples (> 0); one frame lasts hop_samples / sample_rate_hz s."""
    loudness_dbfs: np.ndarray | None = None
    """(N,) float16 per-frame loudness in dB relative to full scale, or None."""
    embeddings: np.ndarray | None = None
    """(N, D) float16 per-frame front-end embeddings (unitless, 1 <= D < 65536), or None."""
    silent: np.ndarray | None = None
    """(N,) bool, True for frames below the edge's loudness gate (not sent: FLAG_SILENCE);
    None when no frame is silent (an all-False mask is stored as None)."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: normalise the fields once, here
        set_(self, "codebook_id", _check_int("codebook_id", self.codebook_id, 0, _U32 - 1))
        set_(self, "seq", _check_int("seq", self.seq, 0, _U32 - 1))
        set_(self, "t_start_ns", _check_int("t_start_ns", self.t_start_ns, 0, _INT64_MAX))
        set_(self, "sample_rate_hz", _check_int("sample_rate_hz", self.sample_rate_hz, 1, _U32 - 1))
        set_(self, "hop_samples", _check_int("hop_samples", self.hop_samples, 1, _U16 - 1))
        codes = np.array(self.codes)
        if codes.ndim != 1:
            raise InvalidField(f"codes must be 1-D (N,), got shape {codes.shape}")
        if not 1 <= codes.size <= MAX_FRAMES_PER_MESSAGE:
            raise InvalidField(f"frame_count {codes.size} not in [1, {MAX_FRAMES_PER_MESSAGE}]")
        if codes.dtype.kind not in "iu" or codes.min() < 0 or codes.max() >= _U16:
            raise InvalidField(f"codes must be integers in [0, {_U16 - 1}]")
        codes = codes.astype(np.uint16)
        n = codes.size
        silent = None
        if self.silent is not None:
            silent = np.array(self.silent)
            if silent.shape != (n,) or silent.dtype != np.bool_:
                got = f"{silent.dtype} {silent.shape}"
                raise InvalidField(f"silent must be a ({n},) bool mask, got {got}")
            if silent.any():
                silent.flags.writeable = False
                codes[silent] = SILENT_CODE
                if (codes[~silent] == SILENT_CODE).any():
                    raise InvalidField(f"code {SILENT_CODE} is reserved for silent frames")
            else:
                silent = None  # nothing silent: the message is sent without FLAG_SILENCE
        set_(self, "silent", silent)
        codes.flags.writeable = False
        set_(self, "codes", codes)
        if self.loudness_dbfs is not None:
            loudness = _check_float16(
                "loudness_dbfs", self.loudness_dbfs, (n,), silent, SILENT_LOUDNESS_DBFS
            )
            set_(self, "loudness_dbfs", loudness)
        if self.embeddings is not None:
            shape = np.shape(self.embeddings)
            if len(shape) != 2 or not 1 <= shape[1] < _U16:
                raise InvalidField(f"embeddings must be (N, D) with 1 <= D < {_U16}, got {shape}")
            embeddings = _check_float16(
                "embeddings", self.embeddings, (n, shape[1]), silent, SILENT_EMBEDDING
            )
            set_(self, "embeddings", embeddings)
        if self.t_end_ns > _INT64_MAX:
            raise InvalidField("t_end_ns must fit in int64: t_start_ns is too large")

    @property
    def frame_count(self) -> int:
        """Number of frames N."""
        return int(self.codes.size)

    @property
    def embedding_dim(self) -> int:
        """Embedding width D, 0 when the message carries no embeddings."""
        return 0 if self.embeddings is None else int(self.embeddings.shape[1])

    @property
    def frame_duration_ns(self) -> int:
        """Duration of one frame in ns, floored (25_000_000 for 400 samples at 16 kHz)."""
        return self.hop_samples * NS_PER_SECOND // self.sample_rate_hz

    @property
    def t_end_ns(self) -> int:
        """Capture time just past the last sample of the last frame, unix ns (exclusive end)."""
        span_ns = self.frame_count * self.hop_samples * NS_PER_SECOND // self.sample_rate_hz
        return self.t_start_ns + span_ns

    def frame_times_ns(self) -> np.ndarray:
        """(N,) int64 capture time of the first sample of each frame, unix ns."""
        offsets = np.arange(self.frame_count, dtype=np.int64) * (self.hop_samples * NS_PER_SECOND)
        return self.t_start_ns + offsets // self.sample_rate_hz  # (N,)

    def _body(self) -> bytes:
        """Header, runs and arrays, everything the CRC covers; canonical, so also used for ==."""
        flags = (
            (FLAG_LOUDNESS if self.loudness_dbfs is not None else 0)
            | (FLAG_EMBEDDINGS if self.embeddings is not None else 0)
            | (FLAG_SILENCE if self.silent is not None else 0)
        )
        header = HEADER.pack(
            MAGIC, WIRE_VERSION, flags, self.codebook_id, self.seq, self.t_start_ns,
            self.sample_rate_hz, self.hop_samples, self.frame_count, self.embedding_dim,
        )  # fmt: skip
        runs = b""
        sent = slice(None)  # every frame, unless some are silent
        if self.silent is not None:
            table = silent_runs(self.silent)
            runs = RUN_COUNT.pack(len(table)) + b"".join(RUN.pack(*run) for run in table)
            sent = ~self.silent
        floats = [a for a in (self.loudness_dbfs, self.embeddings) if a is not None]
        parts = [self.codes.astype(_CODE_DTYPE)] + [a.astype(_FLOAT16_DTYPE) for a in floats]
        arrays = b"".join(a[sent].tobytes() for a in parts)  # embeddings row-major (N_sent, D)
        return header + runs + arrays

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FramesMessage):
            return NotImplemented
        return self._body() == other._body()  # (defining __eq__ also makes it unhashable)

    def to_bytes(self) -> bytes:
        """Encode as header | [silence runs] | codes | [loudness] | [embeddings] | crc32, the
        three arrays without the silent frames (see docs/WIRE.md)."""
        body = self._body()
        size = len(body) + CRC_BYTES
        if size > MAX_PAYLOAD_BYTES:
            raise PayloadTooLarge(f"message encodes to {size} bytes > limit {MAX_PAYLOAD_BYTES}")
        return body + CRC.pack(zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data: bytes, *, max_bytes: int = MAX_PAYLOAD_BYTES) -> FramesMessage:
        """Decode one payload; any defect raises a WireError subclass, checked in this order:
        size limit, minimum length, magic, version, CRC, flags, silence runs, exact length,
        field values."""
        if len(data) > max_bytes:
            raise PayloadTooLarge(f"payload is {len(data)} bytes > limit {max_bytes}")
        data = bytes(data)
        if len(data) < MIN_PAYLOAD_BYTES:
            raise Truncated(f"payload is {len(data)} bytes < {MIN_PAYLOAD_BYTES} (header + crc)")
        (magic, version, flags, codebook_id, seq, t_start_ns, sample_rate_hz, hop_samples,
         n, dim) = HEADER.unpack_from(data)  # fmt: skip
        if magic != MAGIC:
            raise BadMagic(f"magic is {magic!r}, expected {MAGIC!r}")
        if version not in SUPPORTED_VERSIONS:
            supported = ", ".join(map(str, SUPPORTED_VERSIONS))
            raise UnsupportedVersion(f"wire version {version} unsupported; supported: {supported}")
        (crc,) = CRC.unpack_from(data, len(data) - CRC_BYTES)
        if crc != zlib.crc32(memoryview(data)[:-CRC_BYTES]):
            raise ChecksumMismatch(f"crc32 {crc:#010x} does not match the payload")
        if flags & ~KNOWN_FLAGS:
            raise InvalidField(f"unknown flag bits {flags & ~KNOWN_FLAGS:#04x}")
        if bool(flags & FLAG_EMBEDDINGS) != (dim > 0):
            raise InvalidField(f"embedding_dim {dim} disagrees with flags {flags:#04x}")

        silent, arrays_at = None, HEADER_BYTES
        if flags & FLAG_SILENCE:
            silent, arrays_at = _read_silent_runs(data, n)
        n_sent = n if silent is None else n - int(silent.sum())  # frames with code etc.
        n_loudness = n_sent if flags & FLAG_LOUDNESS else 0
        expected = arrays_at + 2 * (n_sent + n_loudness + n_sent * dim) + CRC_BYTES
        if len(data) != expected:
            error = Truncated if len(data) < expected else TrailingBytes
            raise error(f"payload is {len(data)} bytes, its header describes {expected}")

        # Every array element is a 2-byte little-endian word (codes, then float16 loudness and
        # embeddings), so one uint16 view covers the whole rest between runs and crc.
        words = np.frombuffer(data[arrays_at:-CRC_BYTES], _CODE_DTYPE)
        floats = words[n_sent:].view(_FLOAT16_DTYPE)  # (n_loudness + N_sent * D,)
        loudness = floats[:n_sent] if flags & FLAG_LOUDNESS else None  # (N_sent,), maybe empty
        embeddings = floats[n_loudness:].reshape(n_sent, dim) if dim else None  # (N_sent, D)
        return cls(
            codebook_id=codebook_id, seq=seq, t_start_ns=t_start_ns,
            sample_rate_hz=sample_rate_hz, hop_samples=hop_samples,
            codes=_unsend(words[:n_sent], silent, SILENT_CODE),
            loudness_dbfs=_unsend(loudness, silent, SILENT_LOUDNESS_DBFS),
            embeddings=_unsend(embeddings, silent, SILENT_EMBEDDING), silent=silent,
        )  # fmt: skip


def _read_silent_runs(data: bytes, frame_count: int) -> tuple[np.ndarray, int]:
    """The FLAG_SILENCE run table right after the header -> (silent mask, offset of the codes)."""
    table_at = HEADER_BYTES + RUN_COUNT.size
    if table_at > len(data) - CRC_BYTES:
        raise Truncated("payload ends before the silence run count")
    (n_runs,) = RUN_COUNT.unpack_from(data, HEADER_BYTES)
    if n_runs == 0:
        raise InvalidField("FLAG_SILENCE is set but there are 0 silence runs")
    arrays_at = table_at + n_runs * RUN.size
    if arrays_at > len(data) - CRC_BYTES:
        raise Truncated(f"payload ends inside its table of {n_runs} silence runs")
    return silent_mask(RUN.iter_unpack(data[table_at:arrays_at]), frame_count), arrays_at


def _unsend(sent: np.ndarray | None, silent: np.ndarray | None, fill: float) -> np.ndarray | None:
    """Rows of the sent frames (N_sent, ...) -> all N rows, ``fill`` at the silent frames."""
    if sent is None or silent is None:
        return sent
    full = np.full((silent.size, *sent.shape[1:]), fill, dtype=sent.dtype)  # (N, ...)
    full[~silent] = sent
    return full


# --- JSON messages -------------------------------------------------------------
def _check_str(name: str, value: Any, *, empty_ok: bool = True) -> None:
    if not isinstance(value, str) or not (value or empty_ok):
        raise InvalidField(f"{name} must be a {'' if empty_ok else 'non-empty '}string")
    try:
        value.encode("utf-8")  # a lone surrogate ("\\ud800" in JSON) is not text: Redis, logs, MQTT refuse it
    except UnicodeEncodeError:
        raise InvalidField(f"{name} is not valid Unicode text (a lone surrogate)") from None


# JSON payloads are small flat objects; a number literal longer than this is hostile, not data
MAX_JSON_NUMBER_CHARS = 32


def _json_int(text: str) -> int:
    if len(text) > MAX_JSON_NUMBER_CHARS:
        raise InvalidField(f"a JSON integer of {len(text)} characters (limit {MAX_JSON_NUMBER_CHARS})")
    return int(text)


def _json_float(text: str) -> float:
    if len(text) > MAX_JSON_NUMBER_CHARS:
        raise InvalidField(f"a JSON number of {len(text)} characters (limit {MAX_JSON_NUMBER_CHARS})")
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise InvalidField(f"JSON number {text} overflows a float")
    return value


def _json_constant(text: str) -> float:
    raise InvalidField(f"{text} is not a JSON number")  # json.loads would accept NaN/Infinity


def loads_json_object(data: bytes, *, max_bytes: int = MAX_PAYLOAD_BYTES) -> dict[str, Any]:
    """One hostile payload -> a JSON object, or a WireError: bounded size, nesting (the
    interpreter's recursion limit, caught), number length and range, UTF-8 text."""
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"payload is {len(data)} bytes > limit {max_bytes}")
    try:
        obj = json.loads(bytes(data).decode("utf-8"), parse_int=_json_int,
                         parse_float=_json_float, parse_constant=_json_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidField(f"payload is not UTF-8 JSON: {err}") from None
    except RecursionError:
        raise InvalidField("payload JSON is nested too deeply") from None
    if not isinstance(obj, dict):
        raise InvalidField(f"payload must be a JSON object, got {type(obj).__name__}")
    return obj


class _JsonMessage:
    """Shared encoding of the JSON messages: one compact UTF-8 JSON object per payload."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Self:
        """Build from a dict; unknown (and derived) keys are ignored, missing required raise."""
        known = fields(cls)  # type: ignore[arg-type]  # every subclass is a dataclass
        missing = [f.name for f in known if f.default is MISSING and f.name not in obj]
        if missing:
            raise InvalidField(f"{cls.__name__} JSON is missing: {', '.join(missing)}")
        return cls(**{f.name: obj[f.name] for f in known if f.name in obj})

    @classmethod
    def from_bytes(cls, data: bytes, *, max_bytes: int = MAX_PAYLOAD_BYTES) -> Self:
        """Parse one payload; size, UTF-8, JSON and field errors raise WireError subclasses."""
        return cls.from_dict(loads_json_object(data, max_bytes=max_bytes))


@dataclass(frozen=True)
class StatusMessage(_JsonMessage):
    """Device presence (edge -> cloud, retained JSON; the MQTT last will says "offline")."""

    state: Literal["online", "offline"]
    """"online" while the agent runs; "offline" on clean exit or from the last will."""
    agent_version: str = ""
    """Version of the edge agent software."""
    model_version: str = ""
    """Version of the edge model bundle in use ("" if none)."""
    codebook_id: int = 0
    """u32 id of the codebook the agent's codes index (0 if unknown)."""
    t_ns: int = 0
    """When the status was produced, unix ns (0 when unknown, e.g. in a last will)."""
    uptime_s: float = 0.0
    """Seconds since the agent process started (heartbeat; 0 in a last will)."""
    spool_depth: int = 0
    """Frames messages on the agent's disk spool not yet acknowledged by the broker."""
    spool_dropped: int = 0
    """Frames messages the full spool dropped (oldest first) since the spool was created."""
    cpu_percent: float = 0.0
    """Agent process CPU use since the previous heartbeat, percent of one core."""
    rss_mb: float = 0.0
    """Agent process resident memory, MB (10^6 bytes)."""
    model_error: str = ""
    """Why the last announced model was refused ("" when none was); the old model keeps running."""
    callback_errors: int = 0
    """Exceptions the agent's MQTT callbacks caught (a hostile message, a bug) since it started."""

    def __post_init__(self) -> None:
        if not isinstance(self.state, str) or self.state not in ("online", "offline"):
            raise InvalidField(f"state must be 'online' or 'offline', got {_preview(self.state)}")
        _check_str("agent_version", self.agent_version)
        _check_str("model_version", self.model_version)
        _check_str("model_error", self.model_error)
        set_ = object.__setattr__
        set_(self, "codebook_id", _check_int("codebook_id", self.codebook_id, 0, _U32 - 1))
        set_(self, "t_ns", _check_int("t_ns", self.t_ns, 0, _INT64_MAX))
        set_(self, "spool_depth", _check_int("spool_depth", self.spool_depth, 0, _INT64_MAX))
        set_(self, "spool_dropped", _check_int("spool_dropped", self.spool_dropped, 0, _INT64_MAX))
        set_(self, "callback_errors", _check_int("callback_errors", self.callback_errors, 0, _INT64_MAX))
        for name in ("uptime_s", "cpu_percent", "rss_mb"):
            set_(self, name, _check_nonnegative(name, getattr(self, name)))


@dataclass(frozen=True)
class ModelAnnouncement(_JsonMessage):
    """The current edge model (cloud -> edge, retained JSON on ``MODELS_EDGE_TOPIC``).

    ``url`` points at an edge archive (a tar of the bundle's manifest.json, edge.onnx and
    codebook.npy); agents fetch it, check ``size`` and ``sha256`` of the archive, then the
    manifest's own per-file hashes, wire version and codebook id, and swap between frames."""

    model_version: str
    """Version of the bundle, as in its manifest (e.g. "sf1-a9143974")."""
    codebook_id: int
    """u32 id of the codebook the new model's codes index."""
    wire_version: int
    """Wire format version the model's frames use (agents refuse one they do not speak)."""
    sha256: str
    """Hex SHA-256 of the archive at ``url``."""
    size: int
    """Size of the archive in bytes."""
    url: str
    """Where to fetch the archive: file://, http:// or https://."""
    t_ns: int = 0
    """When the announcement was made, unix ns."""

    def __post_init__(self) -> None:
        _check_str("model_version", self.model_version, empty_ok=False)
        _check_str("url", self.url, empty_ok=False)
        if not isinstance(self.sha256, str) or re.fullmatch(r"[0-9a-f]{64}", self.sha256) is None:
            raise InvalidField(f"sha256 must be 64 lowercase hex digits, got {_preview(self.sha256)}")
        if not self.url.startswith(("file://", "http://", "https://")):
            raise InvalidField(f"url must be file://, http:// or https://, got {_preview(self.url)}")
        set_ = object.__setattr__
        set_(self, "codebook_id", _check_int("codebook_id", self.codebook_id, 0, _U32 - 1))
        set_(self, "wire_version", _check_int("wire_version", self.wire_version, 0, 255))
        set_(self, "size", _check_int("size", self.size, 1, _INT64_MAX))
        set_(self, "t_ns", _check_int("t_ns", self.t_ns, 0, _INT64_MAX))



def iso8601_ms(t_ns: int) -> str:
    """Unix ns -> ISO 8601 UTC, milliseconds floored, "Z" suffix: 2023-11-14T22:13:20.123Z."""
    seconds, rem_ns = divmod(t_ns, NS_PER_SECOND)
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{rem_ns // 1_000_000:03d}Z"


@dataclass(frozen=True)
class SoundEvent(_JsonMessage):
    """One detected sound event (cloud -> users: JSON on MQTT, the Redis Stream and HTTP)."""

    event_id: str
    """Unique id of the event (non-empty, e.g. a uuid4 hex)."""
    site: str
    """Site id, as in the topic (1-64 chars of [A-Za-z0-9_-])."""
    device: str
    """Device id, as in the topic (1-64 chars of [A-Za-z0-9_-])."""
    label: str
    """Event class name, e.g. "siren" (see constants.EVENT_LABELS)."""
    score: float
    """Classifier confidence, a probability in [0, 1]."""
    start_ns: int
    """Capture time the event starts, unix ns."""
    end_ns: int
    """Capture time the event ends, unix ns (>= start_ns)."""
    model_version: str
    """Version of the cloud model bundle that detected it."""
    codebook_id: int
    """u32 id of the codebook of the frames it was detected from."""
    seq_first: int
    """u32 seq of the first frames message the event came from."""
    seq_last: int
    """u32 seq of the last frames message the event came from."""

    def __post_init__(self) -> None:
        _check_str("event_id", self.event_id, empty_ok=False)
        validate_name(self.site)
        validate_name(self.device)
        _check_str("label", self.label, empty_ok=False)
        _check_str("model_version", self.model_version)
        score = self.score
        if isinstance(score, bool) or not isinstance(score, Real) or not 0 <= score <= 1:
            raise InvalidField(f"score must be a number in [0, 1], got {_preview(score)}")  # or NaN
        set_ = object.__setattr__
        set_(self, "score", float(self.score))
        set_(self, "start_ns", _check_int("start_ns", self.start_ns, 0, _INT64_MAX))
        set_(self, "end_ns", _check_int("end_ns", self.end_ns, self.start_ns, _INT64_MAX))
        set_(self, "codebook_id", _check_int("codebook_id", self.codebook_id, 0, _U32 - 1))
        set_(self, "seq_first", _check_int("seq_first", self.seq_first, 0, _U32 - 1))
        set_(self, "seq_last", _check_int("seq_last", self.seq_last, 0, _U32 - 1))

    def to_dict(self) -> dict[str, Any]:
        """Every field, plus ISO 8601 ``start`` / ``end`` derived from ``start_ns`` / ``end_ns``."""
        out = asdict(self)
        out["start"], out["end"] = iso8601_ms(self.start_ns), iso8601_ms(self.end_ns)
        return out


# --- topics ----------------------------------------------------------------------
TOPIC_ROOT = "soundfleet/v1"
FRAMES_SUBSCRIPTION = f"{TOPIC_ROOT}/+/+/frames"
STATUS_SUBSCRIPTION = f"{TOPIC_ROOT}/+/+/status"
EVENTS_SUBSCRIPTION = f"{TOPIC_ROOT}/+/+/events"
MODELS_EDGE_TOPIC = f"{TOPIC_ROOT}/models/edge"  # ModelAnnouncement JSON, QoS 1, retained
DEVICE_TOPIC_KINDS: tuple[str, ...] = ("frames", "status", "events")
_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def validate_name(name: str) -> str:
    """``name`` if a site/device id (1-64 of [A-Za-z0-9_-]: no MQTT + # / or empty levels)."""
    if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        raise InvalidField(f"site/device id must be 1-64 chars of [A-Za-z0-9_-], got {_preview(name)}")
    return name


def frames_topic(site: str, device: str) -> str:
    """``soundfleet/v1/{site}/{device}/frames``: binary FramesMessage, QoS 1, not retained."""
    return f"{TOPIC_ROOT}/{validate_name(site)}/{validate_name(device)}/frames"


def status_topic(site: str, device: str) -> str:
    """``soundfleet/v1/{site}/{device}/status``: StatusMessage JSON, QoS 1, retained."""
    return f"{TOPIC_ROOT}/{validate_name(site)}/{validate_name(device)}/status"


def events_topic(site: str, device: str) -> str:
    """``soundfleet/v1/{site}/{device}/events``: SoundEvent JSON, QoS 1, not retained."""
    return f"{TOPIC_ROOT}/{validate_name(site)}/{validate_name(device)}/events"


def parse_device_topic(topic: str) -> tuple[str, str, str]:
    """``soundfleet/v1/{site}/{device}/{kind}`` -> (site, device, kind), else InvalidField."""
    parts = topic.split("/") if isinstance(topic, str) else []
    if len(parts) != 5 or "/".join(parts[:2]) != TOPIC_ROOT or parts[4] not in DEVICE_TOPIC_KINDS:
        raise InvalidField(f"not a {TOPIC_ROOT}/{{site}}/{{device}}/{{kind}} topic: {topic!r}")
    return validate_name(parts[2]), validate_name(parts[3]), parts[4]
