"""A bounded on-disk spool (write-ahead log) for the agent's outgoing frames messages.

The agent appends each payload here *before* publishing it; a sender thread reads the
unacked records in seq order, publishes them at QoS 1 and calls :meth:`Spool.ack` on each
PUBACK. While the broker is away records pile up on disk; they are replayed in order on
reconnect and after a restart. When the spool is full the oldest go first, and are counted.

On disk, a segment log as in Kafka::

    <dir>/<first_seq:010d>.seg   append-only segments of at most ``segment_bytes``
    <dir>/state.json             {"acked": W, "dropped": N, "next_seq": S, "reserved_seq": R,
                                  "boot_id": B}, replaced atomically

A record is a ``<III`` header (payload length, seq, crc32 of the payload) and the payload
(:mod:`edge.spool_recovery`). Seqs strictly increase through the log and may have gaps (an
append that failed). The ack watermark ``W`` is the highest seq such that every record at
or below it is acked or dropped; a segment is deleted once its last seq is at or below ``W``.
Memory holds per-segment facts (first/last seq, count, size, seq gaps) and the acks above
``W``, never an index: a day offline (86,400 records) costs bytes.

fsync policy (``fsync=``):

- ``"always"``: fsync the segment after every append and the directory after creating a
  segment: a power cut loses nothing that ``append`` returned True for.
- ``"interval"`` (default): fsync at most every ``fsync_interval_s`` -- on an append once
  that long has passed since the last fsync -- and in ``flush()``/``close()``: a power cut
  loses at most the last ``fsync_interval_s`` of unacked records.
- ``"never"``: leave it to the OS (``flush()`` still fsyncs when asked).

Each append is one unbuffered ``write`` into the page cache, which outlives the process, so
SIGKILL or a crash loses nothing under any policy. The watermark goes to state.json at most
every ``STATE_WRITE_INTERVAL_S`` when acks moved it, and on flush/close: acks not yet
persisted when the process dies are replayed after the restart, which is safe because the
cloud drops repeated seqs. Opening a spool recovers it (:func:`edge.spool_recovery.recover`):
a segment is cut at its first torn or corrupt record, and what was lost is counted.

A seq is never handed out twice, even across a power cut that took records the broker had
already acknowledged: before an append passes ``reserved_seq``, the spool reserves the next
``SEQ_RESERVATION`` seqs in state.json (fsynced), and recovery after a reboot starts past the
reservation (:mod:`edge.spool_recovery`). That costs one state write per ``SEQ_RESERVATION``
appends, and at most that many skipped seqs after a power cut.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from edge.spool_recovery import (
    HEADER,
    STATE_FILE,
    Segment,
    boot_id,
    read_record,
    recover,
    unlink_logged,
)

log = logging.getLogger(__name__)

MAX_SEQ = 0xFFFFFFFF
FSYNC_POLICIES = ("always", "interval", "never")
STATE_WRITE_INTERVAL_S = 0.5  # acks arrive ~1/s; losing the last few only causes replays
# Seqs reserved per state write: after a power cut at most this many are skipped. Below the
# cloud's seq-jump bound (64 + the messages the elapsed time explains, cloud/device_log.py),
# so the first message after the reboot is never refused as a forged jump.
SEQ_RESERVATION = 32


class SpoolCorruptError(RuntimeError):
    """A segment changed under the spool after recovery had checked it."""


@dataclass
class SpoolStats:
    """A snapshot of the spool, for the agent's status heartbeat."""

    depth: int  # unacked records on disk
    bytes: int  # total size of segment files
    dropped: int  # records dropped ever (persisted across restarts)
    torn: int  # torn/corrupt records truncated at recovery (this process)
    write_errors: int  # appends that hit an OSError (this process); the lost ones are in dropped
    appended: int  # records appended (this process)
    next_seq: int | None  # last appended seq + 1, or None if the spool never held a record
    skipped_seqs: int = 0  # seqs given up at recovery after a reboot without a clean close (this process)


class Spool:
    """The write-ahead spool. One lock: ``append`` (capture thread), ``read_from`` and
    ``first_unacked`` (sender thread) and ``ack`` (paho's network thread) may run at once."""

    def __init__(self, directory: str | Path, *, max_bytes: int = 64 * 1024 * 1024,
                 segment_bytes: int = 1024 * 1024, fsync: str = "interval",
                 fsync_interval_s: float = 1.0):
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}, got {fsync!r}")
        if not HEADER.size < segment_bytes <= max_bytes // 4:
            raise ValueError(f"segment_bytes ({segment_bytes}) must be <= max_bytes // 4 "
                             f"({max_bytes // 4}), so that dropping old segments makes room")
        self.directory = Path(directory)
        self.max_bytes, self.segment_bytes = max_bytes, segment_bytes
        self.fsync, self.fsync_interval_s = fsync, fsync_interval_s
        self._lock = threading.Lock()
        self._segments: list[Segment] = []
        self._active_fd: int | None = None  # appends go to _segments[-1]; None: roll first
        self._total_bytes = 0
        self._watermark = -1
        self._acks_above: set[int] = set()  # acked seqs above the watermark
        self._next_seq: int | None = None
        self._reserved: int | None = None  # seqs below it may be in use (persisted before use)
        self._boot_id = boot_id()
        self._dropped = self._torn = self._write_errors = self._appended = self._skipped_seqs = 0
        self._state_dirty = self._data_dirty = self._dir_dirty = False
        self._last_state_write = self._last_fsync = time.monotonic()
        self._reader: tuple[Segment, int, int] | None = None  # (segment, offset, next seq)
        self._read_file = None
        self._read_segment: Segment | None = None
        self._closed = False
        self.directory.mkdir(parents=True, exist_ok=True)
        self._recover()

    # --- public API -------------------------------------------------------------------
    def append(self, seq: int, payload: bytes) -> bool:
        """Add one record; True once it is in the spool. An OSError (disk full) never
        escapes: the oldest segment is dropped and the write retried once, else the record
        is counted as dropped and False returned. Either way the seq is used up."""
        if not 0 <= seq <= MAX_SEQ:
            raise ValueError(f"seq must be a uint32, got {seq}")
        if HEADER.size + len(payload) > self.segment_bytes:
            raise ValueError(f"a {len(payload)}-byte payload does not fit a "
                             f"{self.segment_bytes}-byte segment")
        record = HEADER.pack(len(payload), seq, zlib.crc32(payload)) + bytes(payload)
        with self._lock:
            if self._closed:
                raise ValueError("the spool is closed")
            if self._next_seq is not None and seq < self._next_seq:
                raise ValueError(f"seq {seq} is not greater than the last appended "
                                 f"({self._next_seq - 1})")
            self._next_seq = seq + 1
            if self._reserved is None or self._next_seq > self._reserved:
                self._reserve(self._next_seq + SEQ_RESERVATION)
            kept = self._append_with_retry(seq, record)
            if kept:
                self._appended += 1
                while self._total_bytes > self.max_bytes and len(self._segments) > 1:
                    self._drop_segment(self._segments[0], "the spool is full")
            now = time.monotonic()
            if self.fsync == "interval" and now - self._last_fsync >= self.fsync_interval_s:
                self._sync(force=False)
            if now - self._last_state_write >= STATE_WRITE_INTERVAL_S:
                self._write_state()
            return kept

    def read_from(self, seq: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to ``limit`` unacked (seq, payload) records with seq >= ``seq``, in seq order.
        Asking for the seq after the last one returned continues where that read stopped;
        any other seq scans its segment from the start."""
        with self._lock:
            out: list[tuple[int, bytes]] = []
            seq = max(seq, self._watermark + 1)
            if limit <= 0 or not self._segments:
                return out
            if self._reader is not None and self._reader[2] == seq:
                index, offset = self._segments.index(self._reader[0]), self._reader[1]
            else:
                index = bisect.bisect_right(self._segments, seq, key=lambda s: s.first_seq)
                index, offset = max(0, index - 1), 0
            next_seq = seq
            for segment in self._segments[index:]:
                for record_seq, payload, end in self._records(segment, offset):
                    offset = end
                    if record_seq >= seq and record_seq not in self._acks_above:
                        out.append((record_seq, payload))
                        next_seq = record_seq + 1
                        if len(out) == limit:
                            break
                self._reader = (segment, offset, next_seq)
                if len(out) == limit:
                    break
                offset = 0
            return out

    def first_unacked(self) -> int | None:
        """The lowest unacked seq on disk, None when there is none."""
        with self._lock:
            return self._next_existing(self._watermark)

    def ack(self, seq: int) -> None:
        """The broker has the record. Idempotent; unknown or dropped seqs are ignored."""
        with self._lock:
            if self._closed or seq <= self._watermark or not self._exists(seq):
                return
            self._acks_above.add(seq)
            self._advance_watermark()
            self._delete_acked_segments(include_active=False)
            if time.monotonic() - self._last_state_write >= STATE_WRITE_INTERVAL_S:
                self._write_state()

    def stats(self) -> SpoolStats:
        with self._lock:
            acked = sum(s.existing(s.first_seq, self._watermark) for s in self._segments)
            depth = sum(s.count for s in self._segments) - acked - len(self._acks_above)
            return SpoolStats(depth=depth, bytes=self._total_bytes, dropped=self._dropped,
                              torn=self._torn, write_errors=self._write_errors,
                              appended=self._appended, next_seq=self._next_seq,
                              skipped_seqs=self._skipped_seqs)

    def flush(self) -> None:
        """fsync the data (whatever the policy) and persist the watermark, now."""
        with self._lock:
            if not self._closed:
                self._persist()

    def close(self) -> None:
        """Flush, delete the active segment too if it is fully acked, release the files."""
        with self._lock:
            if self._closed:
                return
            self._reserved = self._next_seq  # a clean close: the next start needs skip nothing
            self._persist()
            self._delete_acked_segments(include_active=True)
            self._close_active()
            self._close_reader()
            self._closed = True

    # --- appending ----------------------------------------------------------------------
    def _append_with_retry(self, seq: int, record: bytes) -> bool:
        try:
            self._write_record(seq, record)
            return True
        except OSError as exc:
            self._write_errors += 1
            self._abandon_active()
            log.warning("spool write of seq %d failed (%s): dropping the oldest segment", seq, exc)
        if self._segments:
            self._drop_segment(self._segments[0], "a write failed")
        try:
            self._write_record(seq, record)
            return True
        except OSError as exc:
            self._abandon_active()
            self._dropped += 1
            self._state_dirty = True
            log.error("spool cannot keep seq %d (%s): dropped", seq, exc)
            return False

    def _write_record(self, seq: int, record: bytes) -> None:
        active = self._segments[-1] if self._active_fd is not None else None
        if active is None or active.size_bytes + len(record) > self.segment_bytes:
            active = self._roll(seq)
        view = memoryview(record)
        while view:  # short writes are rare on files, but RLIMIT_FSIZE or ENOSPC make them
            view = view[os.write(self._active_fd, view):]
        if self.fsync == "always":  # before the bookkeeping, so that a failure cuts it off
            os.fsync(self._active_fd)
        if active.count and seq > active.last_seq + 1:
            active.gaps.append((active.last_seq + 1, seq - 1))
        active.last_seq, active.count = seq, active.count + 1
        active.size_bytes += len(record)
        self._total_bytes += len(record)
        self._data_dirty = self.fsync != "always"

    def _roll(self, seq: int) -> Segment:
        if self._active_fd is not None and self._data_dirty and self.fsync != "never":
            os.fsync(self._active_fd)  # the segment being sealed is as durable as promised
        self._close_active()
        path = self.directory / f"{seq:010d}.seg"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        segment = Segment(path, first_seq=seq, last_seq=seq - 1)
        self._segments.append(segment)
        self._active_fd, self._data_dirty, self._dir_dirty = fd, False, True
        if self.fsync == "always":
            self._sync_dir()
        self._delete_acked_segments(include_active=False)
        return segment

    def _abandon_active(self) -> None:
        """After a failed write: cut off the partial record and seal the segment (the next
        append rolls), or delete it if it holds no record."""
        if self._active_fd is None:
            return
        active = self._segments[-1]
        try:
            os.ftruncate(self._active_fd, active.size_bytes)
        except OSError as exc:
            log.error("cannot truncate %s after a failed write: %s", active.path, exc)
        self._close_active()
        if active.count == 0:
            self._segments.pop()
            unlink_logged(active.path)

    # --- acks and deleting segments -----------------------------------------------------
    def _exists(self, seq: int) -> bool:
        index = bisect.bisect_right(self._segments, seq, key=lambda s: s.first_seq) - 1
        return index >= 0 and self._segments[index].existing(seq, seq) == 1

    def _next_existing(self, after: int) -> int | None:
        """The lowest seq on disk above ``after``, or None."""
        index = bisect.bisect_right(self._segments, after, key=lambda s: s.last_seq)
        if index == len(self._segments):
            return None
        segment = self._segments[index]
        candidate = max(after + 1, segment.first_seq)
        for g0, g1 in segment.gaps:  # sorted, and strictly inside the segment
            if g0 <= candidate <= g1:
                candidate = g1 + 1
        return candidate

    def _advance_watermark(self) -> None:
        while self._acks_above:
            following = self._next_existing(self._watermark)
            if following not in self._acks_above:
                break
            self._acks_above.discard(following)
            self._watermark = following
            self._state_dirty = True

    def _delete_acked_segments(self, *, include_active: bool) -> None:
        done = []
        for segment in self._segments:
            if segment.last_seq > self._watermark or (
                    segment is self._segments[-1] and not include_active):
                break
            done.append(segment)
        if not done:
            return
        self._state_dirty = True  # next_seq must outlive the last segment: persist it first
        if not self._write_state() and done[-1] is self._segments[-1]:
            done.pop()
        for segment in done:
            self._remove_segment(segment)

    def _drop_segment(self, segment: Segment, reason: str) -> None:
        lost = segment.count - segment.existing(segment.first_seq, self._watermark)
        lost -= sum(1 for seq in self._acks_above if seq <= segment.last_seq)
        if lost:
            self._dropped += lost
            log.warning("spool dropped %d unacked records (seq %d..%d): %s", lost,
                        max(segment.first_seq, self._watermark + 1), segment.last_seq, reason)
        self._watermark = max(self._watermark, segment.last_seq)
        self._acks_above = {seq for seq in self._acks_above if seq > self._watermark}
        self._advance_watermark()
        self._state_dirty = True
        self._write_state()
        self._remove_segment(segment)

    def _remove_segment(self, segment: Segment) -> None:
        if segment is self._segments[-1]:
            self._close_active()
        if self._read_segment is segment:
            self._close_reader()
        if self._reader is not None and self._reader[0] is segment:
            self._reader = None
        self._segments.remove(segment)
        self._total_bytes -= segment.size_bytes
        unlink_logged(segment.path)

    # --- reading ------------------------------------------------------------------------
    def _records(self, segment: Segment, offset: int):
        """Yield (seq, payload, offset after it) from ``offset`` to the segment's end."""
        if self._read_segment is not segment:
            self._close_reader()
            self._read_file = open(segment.path, "rb")  # kept open for the sender's next read
            self._read_segment = segment
        self._read_file.seek(offset)
        while offset < segment.size_bytes:
            record = read_record(self._read_file)
            if record is None:
                raise SpoolCorruptError(f"{segment.path} changed at offset {offset}")
            offset += HEADER.size + len(record[1])
            yield record[0], record[1], offset

    # --- durability ---------------------------------------------------------------------
    def _persist(self) -> None:
        self._sync(force=True)
        self._state_dirty = True
        self._write_state(force_fsync=True)

    def _sync(self, *, force: bool) -> None:
        """fsync the active segment and the directory; ``force``: even if nothing changed."""
        try:
            if self._active_fd is not None and (force or self._data_dirty):
                os.fsync(self._active_fd)
            if force or self._dir_dirty:
                self._sync_dir()
        except OSError as exc:
            log.error("spool fsync failed: %s", exc)
        self._data_dirty = False
        self._last_fsync = time.monotonic()

    def _sync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._dir_dirty = False

    def _write_state(self, *, force_fsync: bool = False) -> bool:
        """Replace state.json if it changed; False if that failed (logged, never raised)."""
        if not self._state_dirty:
            return True
        state = {"acked": self._watermark, "dropped": self._dropped, "next_seq": self._next_seq,
                 "reserved_seq": self._reserved, "boot_id": self._boot_id}
        tmp = self.directory / (STATE_FILE + ".tmp")
        durable = force_fsync or self.fsync != "never"
        try:
            with open(tmp, "w") as f:
                json.dump(state, f)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, self.directory / STATE_FILE)
            if durable:
                self._sync_dir()
        except OSError as exc:
            log.error("cannot write %s: %s", self.directory / STATE_FILE, exc)
            return False
        self._state_dirty = False
        self._last_state_write = time.monotonic()
        return True

    def _reserve(self, bound: int) -> None:
        """Persist (fsynced) that every seq below ``bound`` may be in use, before any is."""
        self._reserved = bound
        self._state_dirty = True
        if not self._write_state(force_fsync=True):  # logged; a power cut now could reuse seqs
            self._reserved = None  # try again on the next append

    def _close_active(self) -> None:
        if self._active_fd is not None:
            fd, self._active_fd = self._active_fd, None
            try:
                os.close(fd)
            except OSError as exc:
                log.error("closing the active spool segment failed: %s", exc)

    def _close_reader(self) -> None:
        if self._read_file is not None:
            self._read_file.close()
        self._read_file = self._read_segment = None


    # --- recovery -----------------------------------------------------------------------
    def _recover(self) -> None:
        found = recover(self.directory)
        self._segments, self._total_bytes = found.segments, found.total_bytes
        self._watermark, self._dropped, self._torn = found.watermark, found.dropped, found.torn
        self._next_seq = found.next_seq
        self._reserved, self._skipped_seqs = found.next_seq, found.skipped_seqs
        self._state_dirty = True
        self._write_state()
        self._delete_acked_segments(include_active=True)
        if self._segments:
            self._active_fd = os.open(self._segments[-1].path, os.O_WRONLY | os.O_APPEND)
        log.info("spool at %s: %d segments, %d bytes, first unacked seq %s, next seq %s",
                 self.directory, len(self._segments), self._total_bytes,
                 self._next_existing(self._watermark), self._next_seq)
