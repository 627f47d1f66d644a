"""The edge's disk spool: order, acks, restarts (clean, SIGKILL, torn writes), bounds, threads.

Real files in tmp_path throughout; the crash and write-error cases run in a child process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from pathlib import Path

import pytest

from edge.spool import HEADER, Spool

REPO_ROOT = Path(__file__).resolve().parents[1]
PAYLOAD_BYTES = 100
RECORD_BYTES = HEADER.size + PAYLOAD_BYTES


def payload_for(seq: int, size: int = PAYLOAD_BYTES) -> bytes:
    """A payload that names its seq, so a mix-up between records shows."""
    return (f"seq={seq};".encode() * size)[:size]


def fill(spool: Spool, seqs) -> None:
    for seq in seqs:
        assert spool.append(seq, payload_for(seq))


def replay(spool: Spool) -> list[int]:
    records = spool.read_from(0, 1_000_000)
    for seq, payload in records:
        assert payload == payload_for(seq)
    return [seq for seq, _ in records]


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def run_child(code: str, directory: Path) -> subprocess.CompletedProcess:
    script = "import sys; sys.path.insert(0, sys.argv[1]); directory = sys.argv[2]\n"
    script += textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script, str(REPO_ROOT), str(directory)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)


def test_round_trip_in_order_and_out_of_order_acks_move_watermark_only_over_contiguous(tmp_path):
    spool = Spool(tmp_path, max_bytes=64 * 1024, segment_bytes=1024, fsync="always")
    assert spool.first_unacked() is None and spool.stats().next_seq is None
    fill(spool, range(1, 31))  # 3+ segments of 9 records
    assert replay(spool) == list(range(1, 31))
    assert spool.stats().depth == 30

    spool.ack(3)
    spool.ack(1)
    assert spool.first_unacked() == 2
    assert [seq for seq, _ in spool.read_from(0, 3)] == [2, 4, 5]
    spool.ack(2)
    assert spool.first_unacked() == 4
    spool.ack(2)  # idempotent
    spool.ack(999)  # never appended
    assert spool.stats().depth == 27

    # the sender's pattern: continue after the last record returned, across segments
    got = []
    cursor = spool.first_unacked()
    while batch := spool.read_from(cursor, 4):
        got += [seq for seq, _ in batch]
        cursor = batch[-1][0] + 1
    assert got == list(range(4, 31))
    for seq in (20, 12, 15):  # out of order, above the watermark: skipped, watermark stays
        spool.ack(seq)
    assert spool.first_unacked() == 4
    assert 12 not in replay(spool) and 20 not in replay(spool)
    assert spool.stats().depth == 24
    spool.close()


def test_seq_gaps_from_failed_appends_do_not_stall_the_watermark(tmp_path):
    # the agent moves on to seq + 1 even when an append failed, so seqs can skip
    spool = Spool(tmp_path, max_bytes=64 * 1024, segment_bytes=1024)
    fill(spool, [1, 2, 5, 6, 9])
    spool.ack(3)  # never appended: ignored
    for seq in (5, 2, 1):
        spool.ack(seq)
    assert spool.first_unacked() == 6 and spool.stats().depth == 2
    spool.close()

    spool = Spool(tmp_path, max_bytes=64 * 1024, segment_bytes=1024)
    assert replay(spool) == [6, 9]
    spool.ack(9)
    spool.ack(6)
    assert spool.first_unacked() is None and spool.stats().depth == 0
    spool.close()


def test_reopen_replays_unacked_in_order_and_not_acked(tmp_path):
    spool = Spool(tmp_path, max_bytes=64 * 1024, segment_bytes=1024)
    fill(spool, range(10, 40))
    for seq in [*range(10, 20), 25, 26]:
        spool.ack(seq)
    spool.close()

    spool = Spool(tmp_path, max_bytes=64 * 1024, segment_bytes=1024)
    # acks above the watermark are not persisted: 25 and 26 may come again, 10..19 may not
    assert replay(spool) == list(range(20, 40))
    assert spool.stats().next_seq == 40
    with pytest.raises(ValueError, match="not greater"):
        spool.append(39, b"x")
    assert spool.append(40, payload_for(40))
    assert replay(spool)[-1] == 40
    spool.close()


def test_next_seq_survives_when_everything_was_acked_and_deleted(tmp_path):
    spool = Spool(tmp_path, max_bytes=64 * 1024, segment_bytes=1024)
    fill(spool, range(100, 130))
    for seq in range(100, 130):
        spool.ack(seq)
    spool.close()
    assert segment_files(tmp_path) == []  # the active segment goes too once fully acked

    spool = Spool(tmp_path, max_bytes=64 * 1024, segment_bytes=1024)
    assert spool.first_unacked() is None
    assert spool.stats().next_seq == 130 and spool.stats().depth == 0
    with pytest.raises(ValueError):
        spool.append(129, b"late")
    assert spool.append(130, payload_for(130))
    assert replay(spool) == [130]
    spool.close()


def test_sigkill_loses_nothing_unacked_and_acked_before_flush_stay_acked(tmp_path):
    child = run_child("""
        import os, signal
        from edge.spool import Spool
        spool = Spool(directory, max_bytes=1 << 20, segment_bytes=4096, fsync="never")
        for seq in range(1, 201):
            assert spool.append(seq, (f"seq={seq};".encode() * 100)[:100])
        for seq in range(1, 81):
            spool.ack(seq)
        spool.flush()
        for seq in range(81, 121):  # may not reach state.json before the kill
            spool.ack(seq)
        os.kill(os.getpid(), signal.SIGKILL)
    """, tmp_path)
    assert child.returncode == -signal.SIGKILL, child.stderr

    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=4096)
    replayed = replay(spool)
    assert replayed == sorted(set(replayed))
    assert set(range(121, 201)) <= set(replayed)
    assert not set(range(1, 81)) & set(replayed)
    assert spool.stats().next_seq == 201 and spool.stats().torn == 0
    spool.close()


def _reboot(monkeypatch, tmp_path: Path) -> None:
    """From here on the spool sees another boot of the machine (the kernel's boot id)."""
    import edge.spool_recovery

    boot_file = tmp_path.parent / f"{tmp_path.name}-boot_id"
    boot_file.write_text("a-later-boot\n")
    monkeypatch.setattr(edge.spool_recovery, "BOOT_ID_FILE", boot_file)


def test_a_power_cut_never_makes_the_spool_hand_out_a_published_seq_again(tmp_path, monkeypatch):
    """Records appended (and published) after the last data fsync die with the page cache in a
    power cut. The seqs they used must not be handed out again: the cloud already has some of
    them and would drop the new frames as duplicates. Before the reservation, state.json did not
    move on append, so the spool restarted at seq 2 here and reused 2..10."""
    child = run_child("""
        import os, signal
        from edge.spool import Spool
        spool = Spool(directory, max_bytes=1 << 20, segment_bytes=4096, fsync="interval", fsync_interval_s=3600)
        for seq in range(1, 11):  # published at once by the sender; none of it fsynced yet
            assert spool.append(seq, (f"seq={seq};".encode() * 100)[:100])
        os.kill(os.getpid(), signal.SIGKILL)
    """, tmp_path)
    assert child.returncode == -signal.SIGKILL, child.stderr
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["reserved_seq"] > 10  # fsynced before the seqs were used
    for segment in segment_files(tmp_path):  # the power cut: nothing unsynced reached the disk
        segment.unlink()
    _reboot(monkeypatch, tmp_path)

    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=4096)
    stats = spool.stats()
    assert stats.next_seq == state["reserved_seq"] and stats.next_seq > 10
    assert stats.skipped_seqs == state["reserved_seq"] - state["next_seq"] <= 32  # within the cloud's jump bound
    with pytest.raises(ValueError, match="not greater"):
        spool.append(10, b"reused")
    assert spool.append(stats.next_seq, payload_for(stats.next_seq))
    spool.close()


def test_a_restart_in_the_same_boot_or_after_a_clean_close_skips_no_seq(tmp_path, monkeypatch):
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=4096)
    fill(spool, range(1, 101))  # reservations: a state write every 32 appends, not every append
    assert json.loads((tmp_path / "state.json").read_text())["reserved_seq"] > 100
    del spool  # a crash without close(), same boot: the page cache kept every record
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=4096)
    assert spool.stats().next_seq == 101 and spool.stats().skipped_seqs == 0
    spool.close()  # gives the reservation back
    _reboot(monkeypatch, tmp_path)
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=4096)
    assert spool.stats().next_seq == 101 and spool.stats().skipped_seqs == 0
    assert replay(spool) == list(range(1, 101))
    spool.close()


def test_torn_tail_is_truncated_and_the_segment_takes_appends_again(tmp_path):
    spool = Spool(tmp_path, max_bytes=64 * 1024, segment_bytes=4096)
    fill(spool, range(1, 6))
    spool.close()
    [segment] = segment_files(tmp_path)
    os.truncate(segment, 4 * RECORD_BYTES + HEADER.size + 30)  # seq 5 cut mid-payload

    spool = Spool(tmp_path, max_bytes=64 * 1024, segment_bytes=4096)
    assert replay(spool) == [1, 2, 3, 4]
    assert spool.stats().torn == 1 and spool.stats().dropped == 0
    assert spool.stats().next_seq == 6  # seq 5 is never reused
    assert spool.append(6, payload_for(6))
    spool.close()

    assert segment_files(tmp_path) == [segment]
    spool = Spool(tmp_path, max_bytes=64 * 1024, segment_bytes=4096)
    assert replay(spool) == [1, 2, 3, 4, 6]
    assert spool.stats().torn == 0
    spool.close()


def test_flipped_payload_byte_is_caught_by_the_crc(tmp_path):
    spool = Spool(tmp_path, max_bytes=64 * 1024, segment_bytes=4096)
    fill(spool, range(1, 6))
    spool.close()
    [segment] = segment_files(tmp_path)
    data = bytearray(segment.read_bytes())
    data[2 * RECORD_BYTES + HEADER.size + 7] ^= 0x01  # seq 3's payload
    segment.write_bytes(bytes(data))

    spool = Spool(tmp_path, max_bytes=64 * 1024, segment_bytes=4096)
    assert replay(spool) == [1, 2]
    stats = spool.stats()
    assert stats.torn == 1
    assert stats.dropped == 2  # seqs 4 and 5 sat behind the corrupt record
    assert segment.stat().st_size == 2 * RECORD_BYTES
    spool.close()


def test_corruption_in_an_older_segment_counts_what_followed_it_as_dropped(tmp_path):
    spool = Spool(tmp_path, max_bytes=64 * 1024, segment_bytes=9 * RECORD_BYTES)
    fill(spool, range(1, 19))  # two segments: 1..9, 10..18
    spool.close()
    first, second = segment_files(tmp_path)
    data = bytearray(first.read_bytes())
    data[5 * RECORD_BYTES + HEADER.size] ^= 0xFF  # seq 6
    first.write_bytes(bytes(data))

    spool = Spool(tmp_path, max_bytes=64 * 1024, segment_bytes=9 * RECORD_BYTES)
    assert replay(spool) == [1, 2, 3, 4, 5, *range(10, 19)]
    assert spool.stats().torn == 1 and spool.stats().dropped == 3  # 7, 8, 9
    spool.close()


def test_full_spool_drops_oldest_first_and_counts_them_persistently(tmp_path):
    kwargs = dict(max_bytes=4096, segment_bytes=1024)  # 9 records a segment, 4 segments fit
    spool = Spool(tmp_path, **kwargs)
    fill(spool, range(1, 9))
    for seq in (1, 2, 3, 4, 5, 8):  # acked ones are not "dropped" when their segment goes
        spool.ack(seq)
    fill(spool, range(9, 101))
    stats = spool.stats()
    assert stats.bytes <= 4096
    assert stats.bytes == sum(p.stat().st_size for p in segment_files(tmp_path))
    kept = replay(spool)
    assert kept == list(range(kept[0], 101))  # the newest all there, in order
    assert kept[0] > 1
    assert stats.dropped == kept[0] - 1 - 6
    assert stats.depth == len(kept)
    spool.close()

    spool = Spool(tmp_path, **kwargs)
    assert spool.stats().dropped == kept[0] - 1 - 6
    assert replay(spool) == kept
    spool.close()


def test_segments_are_deleted_once_fully_acked(tmp_path):
    spool = Spool(tmp_path, max_bytes=64 * 1024, segment_bytes=1024)
    fill(spool, range(1, 46))  # 5 segments of 9
    assert len(segment_files(tmp_path)) == 5
    before = spool.stats().bytes
    for seq in range(1, 28):  # the first three segments
        spool.ack(seq)
    assert len(segment_files(tmp_path)) == 2
    assert spool.stats().bytes == before - 3 * 9 * RECORD_BYTES
    assert spool.stats().depth == 18
    spool.ack(28)  # part of a segment: it stays
    assert len(segment_files(tmp_path)) == 2
    spool.close()


def test_write_error_drops_the_oldest_segment_and_retries_then_gives_up(tmp_path):
    # RLIMIT_FSIZE makes the kernel refuse to grow any file past 1000 bytes: a real EFBIG,
    # after a short write of what still fits
    child = run_child("""
        import json, resource, signal
        from edge.spool import Spool
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
        spool = Spool(directory, max_bytes=64 * 1024, segment_bytes=1500)
        sizes = {1: 300, 2: 300, 3: 888, 4: 300, 5: 1100}
        kept = [spool.append(seq, (f"seq={seq};".encode() * 1100)[:size])
                for seq, size in sizes.items()]
        s = spool.stats()
        spool.close()
        print(json.dumps([kept, s.dropped, s.write_errors]))
    """, tmp_path)
    assert child.returncode == 0, child.stderr
    kept, dropped, write_errors = json.loads(child.stdout)
    # 1, 2 fill a segment; 3 (900 bytes) rolls to a new one; 4 fits the segment but not the
    # file limit: its partial write is cut off, the oldest segment (1, 2) dropped, and the
    # retry lands in a fresh segment. 5 can never be written: 3 is dropped, then 5 itself.
    assert kept == [True, True, True, True, False]
    assert dropped == 2 + 1 + 1 and write_errors == 2

    spool = Spool(tmp_path, max_bytes=64 * 1024, segment_bytes=1500)
    assert [seq for seq, _ in spool.read_from(0, 10)] == [4]
    assert spool.stats().torn == 0  # the short write did not stay behind as a torn record
    assert spool.stats().dropped == 4 and spool.stats().next_seq == 6
    spool.close()


def test_invalid_arguments_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="fsync"):
        Spool(tmp_path, fsync="sometimes")
    with pytest.raises(ValueError, match="max_bytes // 4"):
        Spool(tmp_path, max_bytes=4096, segment_bytes=2048)
    spool = Spool(tmp_path, max_bytes=64 * 1024, segment_bytes=1024)
    assert spool.append(5, b"a")
    with pytest.raises(ValueError):
        spool.append(5, b"again")
    with pytest.raises(ValueError):
        spool.append(4, b"older")
    with pytest.raises(ValueError):
        spool.append(6, b"x" * 2000)  # bigger than a segment
    spool.close()


def test_corrupt_state_replays_everything_and_stray_files_are_left_alone(tmp_path):
    spool = Spool(tmp_path, max_bytes=64 * 1024, segment_bytes=1024)
    fill(spool, range(1, 11))
    for seq in range(1, 6):
        spool.ack(seq)
    spool.close()
    (tmp_path / "state.json").write_text("{not json")
    (tmp_path / "notes.txt").write_text("hello")

    spool = Spool(tmp_path, max_bytes=64 * 1024, segment_bytes=1024)
    assert replay(spool) == list(range(1, 11))  # duplicates are safe, loss is not
    assert spool.stats().next_seq == 11
    spool.close()
    assert (tmp_path / "notes.txt").read_text() == "hello"
    assert json.loads((tmp_path / "state.json").read_text())["next_seq"] == 11


def test_concurrent_append_read_and_ack_deliver_every_seq_once(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=16 * 1024, fsync="never")
    total = 2000
    delivered: Counter[int] = Counter()
    acks: list[int] = []
    ack_ready = threading.Condition()
    appended_all = threading.Event()

    def capture():
        for seq in range(1, total + 1):
            assert spool.append(seq, payload_for(seq, 40))
        appended_all.set()

    def sender():
        cursor = 1
        while cursor <= total:
            batch = spool.read_from(cursor, 32)
            for seq, payload in batch:
                assert payload == payload_for(seq, 40)
                delivered[seq] += 1
            if batch:
                cursor = batch[-1][0] + 1
                with ack_ready:
                    acks.extend(reversed([seq for seq, _ in batch]))  # PUBACKs out of order
                    ack_ready.notify()

    def network():
        acked = 0
        while acked < total:
            with ack_ready:
                ack_ready.wait_for(lambda: acks, timeout=5)
                batch, acks[:] = list(acks), []
            for seq in batch:
                spool.ack(seq)
            acked += len(batch)

    threads = [threading.Thread(target=f, daemon=True) for f in (capture, sender, network)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    assert appended_all.is_set()
    assert delivered == Counter(range(1, total + 1))
    stats = spool.stats()
    assert stats.depth == 0 and stats.appended == total
    assert spool.first_unacked() is None
    assert len(segment_files(tmp_path)) <= 1  # acked segments went as the sender caught up
    spool.close()
