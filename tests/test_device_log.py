"""The per-device ordered work queue in the real Redis: reorder, drop duplicates, give up gaps,
and hand a device over safely when the replica processing it dies."""

from __future__ import annotations

import time

import numpy as np
import pytest

from cloud.device_log import DeviceLog, WorkItem
from cloud.store import CloudStore

SITE, DEVICE = "logtest", "d1"


@pytest.fixture
def log(redis_url, redis_prefix, redis_client) -> DeviceLog:
    store = CloudStore(redis_url, redis_prefix)
    return DeviceLog(store.r, store.key, events_maxlen=100, reorder_window_ms=1000, max_pending=5, lease_ms=300)


def _item(seq: int) -> WorkItem:
    return WorkItem(seq, 1_000 + seq, 0, np.full(4, seq, dtype=np.uint16))


def _ready(log: DeviceLog) -> list[int]:
    lease = log.lease(SITE, DEVICE)
    items, _, _ = log.peek(lease, 100)
    log.r.delete(log.key("lease", SITE, DEVICE))
    return [i.seq for i in items]


def test_late_frames_are_put_back_in_order_and_duplicates_dropped(log):
    assert log.accept(SITE, DEVICE, _item(0), now_ms=0).released == 1
    assert log.accept(SITE, DEVICE, _item(2), now_ms=10).released == 0  # 1 is missing: parked
    assert log.accept(SITE, DEVICE, _item(2), now_ms=20).new is False  # parked already: duplicate
    assert log.accept(SITE, DEVICE, _item(1), now_ms=30).released == 2  # fills the gap: 1 and 2 go
    assert log.accept(SITE, DEVICE, _item(1), now_ms=40).new is False  # accepted already: duplicate
    assert _ready(log) == [0, 1, 2]


def test_a_gap_not_filled_within_the_window_is_counted_lost_and_the_stream_goes_on(log):
    log.accept(SITE, DEVICE, _item(0), now_ms=0)
    log.accept(SITE, DEVICE, _item(3), now_ms=100)
    assert log.accept(SITE, DEVICE, _item(4), now_ms=500).released == 0  # still within 1 s
    late = log.accept(SITE, DEVICE, _item(5), now_ms=1200)
    assert late.released == 3 and late.lost == 2  # seqs 1 and 2 never came
    assert _ready(log) == [0, 3, 4, 5]
    assert log.accept(SITE, DEVICE, _item(1), now_ms=1300).new is False  # too late now


def test_too_many_parked_frames_give_up_the_gap_before_the_window(log):
    log.accept(SITE, DEVICE, _item(0), now_ms=0)
    for seq in range(2, 7):
        assert log.accept(SITE, DEVICE, _item(seq), now_ms=1).released == 0
    burst = log.accept(SITE, DEVICE, _item(7), now_ms=2)  # 6 parked > max_pending 5
    assert burst.lost == 1 and burst.released == 6


def _timed(seq: int, t_end_ms: int) -> WorkItem:
    """An item of 4 frames (100 ms) that ends at ``t_end_ms``."""
    return WorkItem(seq, t_end_ms * 1_000_000, 0, np.zeros(4, dtype=np.uint16))


def test_a_forged_seq_jump_is_refused_and_the_real_stream_goes_on(log):
    """31 forged frames with seq near 2**32 used to turn the device's next real frames into
    "duplicates" and add 4.29e9 to its lost count."""
    now = 1_700_000_000_000  # ms
    for seq in range(3):
        assert log.accept(SITE, DEVICE, _timed(seq, now + seq * 100), now_ms=now + seq * 100).new
    for k in range(31):
        forged = log.accept(SITE, DEVICE, _timed(2**32 - 1 - k, now + 300), now_ms=now + 300)
        assert forged.seq_jump and not forged.new and forged.released == 0
    # a claimed capture time far in the future buys no allowance either
    assert log.accept(SITE, DEVICE, _timed(100_000, now + 10**9), now_ms=now + 300).seq_jump
    assert log.accept(SITE, DEVICE, _timed(3, now + 400), now_ms=now + 400).released == 1
    state = log.r.hgetall(log.key("dev", SITE, DEVICE))
    assert state[b"last_seq"] == b"3" and int(state[b"seq_jumps"]) == 32
    assert int(state.get(b"lost", 0)) == 0 and int(state.get(b"duplicates", 0)) == 0
    assert _ready(log) == [0, 1, 2, 3]


def test_a_jump_that_the_time_explains_is_a_gap_not_a_forgery(log):
    """A device offline for a minute whose full spool dropped its oldest messages comes back
    600 messages (of 100 ms) further on: taken, and the gap is counted lost after the window."""
    now = 1_700_000_000_000
    log.accept(SITE, DEVICE, _timed(0, now), now_ms=now)
    back = now + 60_000
    jump = log.accept(SITE, DEVICE, _timed(600, back), now_ms=back)
    assert jump.new and not jump.seq_jump and jump.released == 0  # parked behind the gap
    late = log.accept(SITE, DEVICE, _timed(601, back + 100), now_ms=back + 1500)  # past the 1 s window
    assert late.lost == 599 and late.released == 2


def test_only_the_lease_holder_commits_and_a_dead_holders_item_is_redone(log):
    log.accept(SITE, DEVICE, _item(0), now_ms=0)
    first = log.lease(SITE, DEVICE)
    assert first is not None and log.lease(SITE, DEVICE) is None  # one holder at a time
    (item,), context, states = log.peek(first, 8)
    time.sleep(0.4)  # the holder "dies" mid-item: its lease expires
    second = log.lease(SITE, DEVICE)
    assert second is not None
    assert log.commit(first, [item], item.codes, {}, []) is False  # the late holder is fenced off
    (again,), _, _ = log.peek(second, 8)
    assert again.seq == 0  # the item was not lost
    assert log.commit(second, [again], again.codes, {"siren": {"active": False}}, [])
    assert log.release(second)
    assert _ready(log) == [] and log.active_devices() == []
    assert log.r.hget(log.key("dev", SITE, DEVICE), "processed") == b"1"


def test_release_keeps_the_lease_while_work_arrived_meanwhile(log):
    log.accept(SITE, DEVICE, _item(0), now_ms=0)
    lease = log.lease(SITE, DEVICE)
    (item,), _, _ = log.peek(lease, 8)
    log.accept(SITE, DEVICE, _item(1), now_ms=1)  # pushed by another replica while we work
    assert log.commit(lease, [item], item.codes, {}, [])
    assert log.release(lease) is False  # not empty: keep draining, nothing is stranded
    assert [i.seq for i in log.peek(lease, 8)[0]] == [1]


def test_a_redis_that_lost_its_scripts_gets_them_again(log):
    """After a Redis restart the script cache is empty: the next call reloads it and runs."""
    log.r.script_flush()
    assert log.accept(SITE, DEVICE, _item(0), now_ms=0).released == 1
    lease = log.lease(SITE, DEVICE)
    (item,), _, _ = log.peek(lease, 8)
    log.r.script_flush()
    assert log.commit(lease, [item], item.codes, {}, [])
    log.r.script_flush()
    assert log.release(lease)


def test_the_device_waiting_longest_is_found_and_leaves_once_its_work_is_committed(log):
    """/readyz fails on a device whose work nobody processes: this is how it finds one."""
    now_ns = 100 * 10**9
    assert log.waiting_longest(now_ns) is None
    fresh = WorkItem(0, 1_000, now_ns - 10**8, np.zeros(4, np.uint16))  # received 0.1 s ago
    stale = WorkItem(0, 1_000, now_ns - 45 * 10**9, np.zeros(4, np.uint16))  # 45 s ago
    log.accept(SITE, "fresh", fresh, now_ms=0)
    log.accept(SITE, "stale", stale, now_ms=0)
    site, device, item, waited_s = log.waiting_longest(now_ns)
    assert (site, device, item.seq, waited_s) == (SITE, "stale", 0, 45.0)
    lease = log.lease(SITE, "stale")
    items, _, _ = log.peek(lease, 10)
    assert log.commit(lease, items, None, {}, []) and log.release(lease)
    assert log.waiting_longest(now_ns)[1] == "fresh"
