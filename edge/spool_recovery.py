"""Reading a spool directory back: the record format on disk and recovery after a restart.

:class:`edge.spool.Spool` writes; this module holds what both writing and reading must
agree on (the record header, the state file's name, a segment's in-memory facts) and
:func:`recover`, which rebuilds those facts from the files when a spool opens.

Record format: a little-endian header ``<III`` = (payload length in bytes: u32, seq: u32,
zlib.crc32 of the payload: u32), then the payload. Duplicates are safe, loss is not, so a
corrupt state.json means "replay everything". Recovery cuts a segment at its first torn or
corrupt record (short, bad CRC, seq out of order): that record counts as ``torn``, the
records after it in that segment as ``dropped`` (estimated from the seq gap to the next
segment or to the persisted next_seq, as seqs are consecutive in normal operation).

Seqs are never reused, even after a power cut. A seq that was published may be in the
cloud already although its record never reached the disk (appends are fsynced every
``fsync_interval_s`` at most): taking the next seq from what survived on disk would reuse
it, and the cloud would drop the new frame as a duplicate. So the spool persists (fsynced)
a *reservation* ``reserved_seq`` ahead of every seq it hands out, with the kernel's boot id.
Recovery in the same boot (the process died, the page cache did not: every appended record
is on disk) takes the exact next seq; after a reboot it starts at the reservation instead,
unless the spool was closed cleanly (``close`` gives the reservation back). The seqs in
between are skipped: the cloud counts them as lost, which the ones cut off by the power
cut are.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

HEADER = struct.Struct("<III")  # (payload length in bytes, seq, crc32 of payload)
STATE_FILE = "state.json"


@dataclass(eq=False)
class Segment:
    """One ``<first_seq:010d>.seg`` file, as facts: no index of its records is kept."""

    path: Path
    first_seq: int
    last_seq: int  # first_seq - 1 while empty
    count: int = 0
    size_bytes: int = 0
    gaps: list[tuple[int, int]] = field(default_factory=list)  # missing seqs inside, inclusive

    def existing(self, lo: int, hi: int) -> int:
        """How many records this segment holds with lo <= seq <= hi."""
        lo, hi = max(lo, self.first_seq), min(hi, self.last_seq)
        if hi < lo:
            return 0
        return hi - lo + 1 - sum(max(0, min(hi, g1) - max(lo, g0) + 1) for g0, g1 in self.gaps)


@dataclass
class Recovered:
    """What :func:`recover` found on disk, for the spool to carry on from."""

    segments: list[Segment]  # in seq order, torn tails cut off, empty ones deleted
    total_bytes: int  # size of all segment files
    watermark: int  # every seq at or below it is acked or dropped; -1 if none
    dropped: int  # records dropped ever, including those lost behind a corrupt one
    torn: int  # torn or corrupt records truncated now
    next_seq: int | None  # the seq the next append must exceed; None if the spool never held one
    skipped_seqs: int = 0  # seqs given up after a reboot without a clean close (never reused)


BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str | None:
    """This boot of the machine (Linux); None where the kernel does not say."""
    try:
        return BOOT_ID_FILE.read_text().strip() or None
    except OSError:
        return None


def recover(directory: Path) -> Recovered:
    """Check every segment in ``directory`` and truncate it at its first bad record."""
    watermark, dropped, persisted_next, reserved, persisted_boot = _load_state(directory)
    found = []
    for path in directory.iterdir():
        if path.suffix == ".seg" and path.stem.isdigit() and path.is_file():
            found.append((int(path.stem), path))
        elif path.name == STATE_FILE + ".tmp":
            unlink_logged(path)  # a state write that a crash interrupted
        elif path.name != STATE_FILE:
            log.warning("ignoring a stray file in the spool directory: %s", path)
    found.sort()
    result = Recovered(segments=[], total_bytes=0, watermark=watermark, dropped=dropped, torn=0,
                       next_seq=persisted_next)
    previous_seq = -1
    for i, (name_seq, path) in enumerate(found):
        segment, bad_offset = _scan(path, name_seq, previous_seq)
        if bad_offset is not None:
            log.warning("spool: torn or corrupt record in %s at offset %d: truncated there",
                        path, bad_offset)
            result.torn += 1
            bound = found[i + 1][0] if i + 1 < len(found) else persisted_next
            result.dropped += _count_lost_after(segment, bound, watermark)
            os.truncate(path, bad_offset)
        if segment.count == 0:
            unlink_logged(path)
            continue
        result.segments.append(segment)
        result.total_bytes += segment.size_bytes
        previous_seq = segment.last_seq
    if result.segments:
        result.next_seq = max(result.segments[-1].last_seq + 1, persisted_next or 0)
    same_boot = persisted_boot is not None and persisted_boot == boot_id()
    if reserved is not None and not same_boot and reserved > (result.next_seq or 0):
        result.skipped_seqs = reserved - (result.next_seq or 0)
        log.warning("spool: the machine restarted without closing the spool (a power cut?): seqs %d..%d "
                    "may have been published without reaching the disk; continuing at %d so none is reused",
                    result.next_seq or 0, reserved - 1, reserved)
        result.next_seq = reserved
    return result


def read_record(f) -> tuple[int, bytes] | None:
    """The next (seq, payload) in a segment file; None if it is cut short or fails its CRC."""
    header = f.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    length, seq, crc = HEADER.unpack(header)
    payload = f.read(length)
    if len(payload) < length or zlib.crc32(payload) != crc:
        return None
    return seq, payload


def unlink_logged(path: Path) -> None:
    """Delete a spool file; a failure is logged, never raised."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.error("cannot delete %s: %s", path, exc)


def _load_state(directory: Path) -> tuple[int, int, int | None, int | None, str | None]:
    """(watermark, dropped, next_seq, reserved_seq, boot_id) from state.json; (-1, 0, None,
    None, None) if it is missing or bad. A state file from before reservations has neither."""
    path = directory / STATE_FILE
    if not path.exists():
        return -1, 0, None, None, None
    try:
        state = json.loads(path.read_text())
        acked, dropped, next_seq = state["acked"], state["dropped"], state.get("next_seq")
        reserved, boot = state.get("reserved_seq"), state.get("boot_id")
        if not all(isinstance(v, int) for v in (acked, dropped, next_seq or 0, reserved or 0)) \
                or not isinstance(boot, str | None):
            raise ValueError(f"unexpected types in {state!r}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("corrupt %s (%s): replaying everything on disk", path, exc)
        return -1, 0, None, None, None
    return acked, dropped, next_seq, reserved, boot


def _count_lost_after(segment: Segment, bound: int | None, watermark: int) -> int:
    """The records behind a corrupt one are gone: how many seqs up to ``bound`` that was."""
    if bound is None:
        return 0
    lost = range(max(segment.last_seq, watermark) + 1, bound)
    count = len(lost) - (segment.last_seq + 1 in lost)  # the corrupt one counts as torn
    if count <= 0:
        return 0
    log.warning("spool: about %d records behind the corrupt one are lost", count)
    return count


def _scan(path: Path, first_seq: int, previous_seq: int) -> tuple[Segment, int | None]:
    """Check a segment record by record; returns it and the offset of its first bad record."""
    segment = Segment(path, first_seq=first_seq, last_seq=first_seq - 1)
    size = path.stat().st_size
    with open(path, "rb") as f:
        while segment.size_bytes < size:
            record = read_record(f)
            if record is None or record[0] <= previous_seq or record[0] < first_seq:
                return segment, segment.size_bytes
            seq, payload = record
            if not segment.count:
                segment.first_seq = seq
            elif seq > segment.last_seq + 1:
                segment.gaps.append((segment.last_seq + 1, seq - 1))
            segment.last_seq, segment.count = seq, segment.count + 1
            segment.size_bytes += HEADER.size + len(payload)
            previous_seq = seq
    return segment, None
