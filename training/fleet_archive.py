"""The fleet archive: label-free code sequences from the fleet, as hive-partitioned Parquet.

The cloud appends the frames each device sent (:func:`write_fleet_shard`);
code-LM training reads them back as per-device sequences
(:func:`read_fleet_archive`). The layout and schema are in ``docs/DATA.md``.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote, unquote

import numpy as np

from shared_models.constants import HOP_SAMPLES, NS_PER_SECOND, SAMPLE_RATE_HZ

log = logging.getLogger(__name__)


# --- fleet archive -------------------------------------------------------------------


class FleetArchiveError(ValueError):
    """A fleet archive file does not match its partition or the schema; the message names it."""


@dataclass(frozen=True)
class FleetRow:
    """One archived frames message: whose it is, its wire header fields and its codes."""

    site: str
    device: str
    seq: int
    """u32 per-device message number."""
    t_start_ns: int
    """Capture time of the first sample of frame 0, unix ns."""
    codes: np.ndarray
    """(N,) uint16 codebook indices."""
    codebook_id: int
    hop_samples: int = HOP_SAMPLES
    sample_rate_hz: int = SAMPLE_RATE_HZ

    @classmethod
    def from_message(cls, site: str, device: str, msg) -> FleetRow:
        """From a decoded ``shared_models.wire.FramesMessage``."""
        fields = ("seq", "t_start_ns", "codes", "codebook_id", "hop_samples", "sample_rate_hz")
        return cls(site, device, **{name: getattr(msg, name) for name in fields})


class FleetSequence(NamedTuple):
    """Consecutive messages (seq, seq+1, ...) of one device, their codes concatenated."""

    site: str
    device: str
    seq_first: int
    t_start_ns: int
    codes: np.ndarray  # (N,) uint16
    codebook_id: int


_PART = re.compile(r"part-(\d+)\.parquet")


def fleet_schema():
    """The columns of every part file (one row per frames message)."""
    import pyarrow as pa  # training-only dependency, imported on use

    return pa.schema(
        [
            ("site", pa.string()),
            ("device", pa.string()),
            ("seq", pa.uint32()),
            ("t_start_ns", pa.int64()),
            ("hop_samples", pa.uint16()),
            ("sample_rate_hz", pa.uint32()),
            ("codebook_id", pa.uint32()),
            ("codes", pa.binary()),
        ]
    )


def fleet_partitioning():
    """The archive's hive partitioning, typed, for ``pyarrow.dataset.dataset(root, ...)``.

    Generic readers need it: the partition keys are also file columns, and an
    inferred ``codebook_id`` (int32) would clash with the stored uint32.
    """
    import pyarrow as pa
    import pyarrow.dataset as pads

    keys = [("codebook_id", pa.uint32()), ("site", pa.string()), ("date", pa.string())]
    return pads.partitioning(pa.schema(keys), flavor="hive")


def write_fleet_shard(root: Path, rows: Iterable[FleetRow | Mapping]) -> list[Path]:
    """Append ``rows`` to the archive at ``root``: one new part file per partition touched.

    Partitions are ``codebook_id=<id>/site=<site>/date=<UTC date of t_start_ns>``;
    a file appears whole or not at all (written aside, then linked into place).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    groups: dict[tuple[int, str, str], list[FleetRow]] = {}
    for row in rows:
        row = row if isinstance(row, FleetRow) else FleetRow(**row)
        day = datetime.fromtimestamp(row.t_start_ns // NS_PER_SECOND, tz=UTC).date().isoformat()
        groups.setdefault((int(row.codebook_id), row.site, day), []).append(row)
    written = []
    for (codebook_id, site, day), group in sorted(groups.items()):
        schema = fleet_schema()
        columns = {name: [getattr(r, name) for r in group] for name in schema.names}
        columns["codes"] = [_codes_bytes(codes) for codes in columns["codes"]]
        table = pa.table(columns, schema=schema)
        folder = (
            Path(root)
            / f"codebook_id={codebook_id}"
            / f"site={quote(site, safe='')}"
            / f"date={day}"
        )
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".tmp-{uuid.uuid4().hex}.parquet"  # hidden: readers skip it
        pq.write_table(table, tmp, compression="zstd")
        written.append(_link_next_part(tmp, folder))
    return written


def _codes_bytes(codes) -> bytes:
    arr = np.asarray(codes)
    if arr.ndim != 1 or arr.size == 0 or arr.dtype.kind not in "iu":
        raise ValueError(
            f"codes must be a non-empty 1-D integer array, got {arr.dtype} {arr.shape}"
        )
    if arr.min() < 0 or arr.max() > 0xFFFF:
        raise ValueError("codes must fit uint16 (0..65535)")
    return arr.astype("<u2").tobytes()


def _link_next_part(tmp: Path, folder: Path) -> Path:
    """Give ``tmp`` the next free part-<n> name; a concurrent writer just takes the next n."""
    taken = [int(m.group(1)) for p in folder.iterdir() if (m := _PART.fullmatch(p.name))]
    n = max(taken, default=-1) + 1
    while True:
        target = folder / f"part-{n}.parquet"
        try:
            os.link(tmp, target)  # fails if the name exists, unlike rename
        except FileExistsError:
            n += 1
            continue
        tmp.unlink()
        return target


def read_fleet_archive(root: Path, codebook_id: int | None = None) -> Iterator[FleetSequence]:
    """Every device's code sequences, ordered by codebook id, site, device, seq.

    Only ``codebook_id=<id>`` partitions are read when ``codebook_id`` is given.
    Messages with consecutive seqs (and the same hop and rate) are joined; a gap
    starts a new sequence; a repeated seq (a redelivery) is kept once. One site's
    rows are in memory at a time.
    """
    import pyarrow as pa

    pattern = "codebook_id=*" if codebook_id is None else f"codebook_id={int(codebook_id)}"
    for cb_dir in sorted(Path(root).glob(pattern), key=lambda p: int(p.name.split("=", 1)[1])):
        for site_dir in sorted(cb_dir.glob("site=*")):
            files = sorted(site_dir.glob("date=*/part-*.parquet"))
            if not files:
                continue
            tables = [_read_part(f) for f in files]
            expect = (int(cb_dir.name.split("=", 1)[1]), unquote(site_dir.name.split("=", 1)[1]))
            for f, t in zip(files, tables, strict=True):
                got = set(zip(t["codebook_id"].to_pylist(), t["site"].to_pylist(), strict=True))
                if got - {expect}:
                    raise FleetArchiveError(
                        f"{f}: rows {sorted(got - {expect})} outside partition {expect}"
                    )
            yield from _sequences(pa.concat_tables(tables).to_pydict(), *expect)


def _read_part(path: Path):
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path).read()  # the file alone: no partition columns from the path
    schema = fleet_schema()
    if set(table.column_names) != set(schema.names):
        raise FleetArchiveError(f"{path}: columns {table.column_names}, expected {schema.names}")
    try:
        return table.select(schema.names).cast(schema)
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise FleetArchiveError(f"{path}: does not fit the fleet schema: {exc}") from None


def _sequences(cols: dict[str, list], codebook_id: int, site: str) -> Iterator[FleetSequence]:
    rows = sorted(range(len(cols["seq"])), key=lambda i: (cols["device"][i], cols["seq"][i]))
    current: list[int] = []

    def emit() -> FleetSequence:
        first = current[0]
        codes = np.frombuffer(b"".join(cols["codes"][i] for i in current), dtype="<u2")
        return FleetSequence(
            site,
            cols["device"][first],
            cols["seq"][first],
            cols["t_start_ns"][first],
            codes.astype(np.uint16),
            codebook_id,
        )

    for i in rows:
        if len(cols["codes"][i]) % 2:
            raise FleetArchiveError(
                f"site {site!r} device {cols['device'][i]!r} seq "
                f"{cols['seq'][i]}: codes hold an odd number of bytes"
            )
        if current:
            last = current[-1]
            same = [
                cols[k][i] == cols[k][last] for k in ("device", "hop_samples", "sample_rate_hz")
            ]
            if all(same) and cols["seq"][i] == cols["seq"][last]:
                if cols["codes"][i] != cols["codes"][last]:
                    log.warning(
                        "site %r device %r seq %d archived twice with different codes; "
                        "keeping the first",
                        site,
                        cols["device"][i],
                        cols["seq"][i],
                    )
                continue  # the same message archived twice (a QoS 1 redelivery)
            if all(same) and cols["seq"][i] == cols["seq"][last] + 1:
                current.append(i)
                continue
            yield emit()
        current = [i]
    if current:
        yield emit()
