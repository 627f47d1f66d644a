"""The fleet archive, cloud side: opt-in per site, each device's code sequences kept as
label-free training data for the code LM.

The ingest appends every processed frames message of an archived site to the
``archive`` Redis Stream (bounded: ``archive_maxlen`` entries, oldest trimmed);
`roll_archive` moves what is there into Parquet shards in the layout training
reads (``training/fleet_archive.py``, docs/DATA.md §2) and trims what it wrote.
Rolling is at least once: a crash between writing a shard and trimming the stream
writes those messages again, and `read_fleet_archive` keeps a repeated seq once.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from cloud.device_log import WorkItem
from cloud.store import CloudStore
from shared_models.constants import FRAME_DURATION_NS

log = logging.getLogger(__name__)

ROLL_BATCH = 5000  # stream entries per Parquet shard write


def archived_sites(setting: str) -> frozenset[str] | None:
    """``archive_sites`` config -> the sites to archive; None = every site ("*"), empty = none."""
    names = {s.strip() for s in setting.split(",") if s.strip()}
    return None if "*" in names else frozenset(names)


class ArchiveWriter:
    """What the ingest calls after each committed message."""

    def __init__(self, store: CloudStore, setting: str, codebook_id: int, maxlen: int):
        self.store, self.sites, self.codebook_id, self.maxlen = store, archived_sites(setting), codebook_id, maxlen

    def wants(self, site: str) -> bool:
        return self.sites is None or site in self.sites

    def append(self, site: str, device: str, item: WorkItem) -> None:
        t_start_ns = item.t_end_ns - len(item.codes) * FRAME_DURATION_NS
        self.store.r.xadd(
            self.store.key("archive"),
            {"site": site, "device": device, "seq": item.seq, "t_start_ns": t_start_ns,
             "codebook_id": self.codebook_id, "codes": item.codes.astype("<u2").tobytes()},
            maxlen=self.maxlen, approximate=True,
        )


def roll_archive(store: CloudStore, root: Path) -> int:
    """Move the archive stream into Parquet shards under ``root``; returns messages written."""
    from training.fleet_archive import FleetRow, write_fleet_shard  # pyarrow: cloud/train extras

    key, written, start = store.key("archive"), 0, "-"
    while True:
        entries = store.r.xrange(key, min=start, count=ROLL_BATCH)
        if not entries:
            return written
        rows = [FleetRow(site=f[b"site"].decode(), device=f[b"device"].decode(), seq=int(f[b"seq"]),
                         t_start_ns=int(f[b"t_start_ns"]), codebook_id=int(f[b"codebook_id"]),
                         codes=np.frombuffer(f[b"codes"], "<u2").astype(np.uint16))
                for _, f in entries]
        write_fleet_shard(Path(root), rows)
        last_id = entries[-1][0].decode()
        store.r.xtrim(key, minid=_next_id(last_id))  # drop only what is now on disk
        written += len(rows)
        log.info("fleet archive: %d messages rolled into %s", written, root)
        start = _next_id(last_id)


def _next_id(entry_id: str) -> str:
    ms, seq = entry_id.split("-")
    return f"{ms}-{int(seq) + 1}"
