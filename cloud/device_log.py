"""Exactly once, in order, per device, across any number of ingest replicas: Redis does it.

The frames topic is split between ingest replicas by an MQTT shared subscription,
so consecutive messages of one device can land on different replicas, late,
twice, or out of order. Three atomic steps (Lua scripts) put them back in line:

1. ``accept`` (whoever received the message): drop it if its seq was already
   accepted or is already parked; park it in the device's reorder buffer
   (``pend``, a sorted set by seq); then release, in seq order, every parked
   message that is next in line onto the device's work list (``work``). A gap
   that is not filled within ``reorder_window_ms`` (or with more than
   ``max_pending`` parked behind it) is given up: counted as lost, and the
   stream goes on from the next parked message.
2. ``lease``: one replica at a time processes a device (``SET NX PX`` with a
   random token). The holder peeks at the head of the work list together with
   the device's context and event-logic state, runs the models, and
3. ``commit``: only if it still holds the lease and the head is still the run
   of items it processed: pop them, store the new context and event state,
   append the events to the stream, count. A replica that dies mid-item commits nothing;
   its lease expires and the next replica re-processes the same item, so a
   frame is neither lost nor processed twice. ``release`` gives the lease back
   only if the work list is empty (else the holder keeps draining), so an item
   pushed while the holder was finishing is never stranded.

Keys, under the store's prefix: ``dev:{s}:{d}`` (hash: last_seq, pending clock,
counters), ``pend:{s}:{d}``, ``work:{s}:{d}``, ``lease:{s}:{d}``, ``ctx:{s}:{d}``
(the code context, uint16 LE), ``evstate:{s}:{d}``, ``events`` (stream),
``active`` (set of devices with work, for the sweeper that picks up the work of
a replica that died).

Every step also comes in a ``*_many`` form that sends one pipelined round
trip for many devices: the ingest works in rounds of many messages, and the
single-device forms are those with one entry.
"""

from __future__ import annotations

import json
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import redis

from shared_models.constants import FRAME_DURATION_NS

# a seq may run this far ahead of the newest one seen with no time passed (reordering, restarts)
SEQ_JUMP_SLACK = 64

ITEM_HEADER = struct.Struct("<IQQ")  # seq u32, t_end_ns u64, received_ns u64; then the codes, uint16 LE

ACCEPT = """
local dev, pend, work, active = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local seq, item, now = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local window, max_pending, device = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local t_end, duration, slack = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local last = tonumber(redis.call('HGET', dev, 'last_seq') or '-1')
if seq == 0 and last > 0 then  -- the agent lost its state and starts over at 0
  redis.call('DEL', pend)
  redis.call('HDEL', dev, 'newest_seq', 'newest_t_end_ms')
  redis.call('HINCRBY', dev, 'restarts', 1)
  last = -1
end
if seq <= last or #redis.call('ZRANGEBYSCORE', pend, seq, seq, 'LIMIT', 0, 1) > 0 then
  redis.call('HINCRBY', dev, 'duplicates', 1)
  return {0, 0, 0}
end
-- a jump past the newest seq must be explained by the time that passed since it (a device
-- whose full spool dropped messages skips them; a forged huge seq would make every real frame
-- after it a "duplicate"); a claimed capture time in the future buys nothing
local newest = tonumber(redis.call('HGET', dev, 'newest_seq') or '-1')
if newest >= 0 and seq > newest + slack then
  local since = math.min(t_end - duration, now) - tonumber(redis.call('HGET', dev, 'newest_t_end_ms') or now)
  if seq - newest > slack + math.max(0, since) / duration then
    redis.call('HINCRBY', dev, 'seq_jumps', 1)
    return {2, 0, 0}
  end
end
if seq > newest then redis.call('HSET', dev, 'newest_seq', seq, 'newest_t_end_ms', t_end) end
if redis.call('ZCARD', pend) == 0 then redis.call('HSET', dev, 'pending_since_ms', now) end
redis.call('ZADD', pend, seq, item)
local released, lost = 0, 0
while true do
  local head = redis.call('ZRANGE', pend, 0, 0, 'WITHSCORES')
  if #head == 0 then break end
  local hseq = tonumber(head[2])
  local in_line = (hseq == last + 1) or (last == -1 and hseq == 0)
  if not in_line then
    local waited = now - tonumber(redis.call('HGET', dev, 'pending_since_ms') or now)
    if waited < window and redis.call('ZCARD', pend) <= max_pending then break end
    if last >= 0 then lost = lost + (hseq - last - 1) end  -- given up: counted, never silent
  end
  redis.call('ZREMRANGEBYRANK', pend, 0, 0)
  redis.call('RPUSH', work, head[1])
  last = hseq
  released = released + 1
  redis.call('HSET', dev, 'pending_since_ms', now)
end
redis.call('HSET', dev, 'last_seq', last)
if lost > 0 then redis.call('HINCRBY', dev, 'lost', lost) end
if released > 0 then redis.call('SADD', active, device) end
return {1, released, lost}
"""

COMMIT = """
local lease, work, ctx, evstate, events, metrics, dev = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local token, first, last, count, frames = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local ttl, maxlen, replica = ARGV[6], ARGV[7], ARGV[8]
if redis.call('GET', lease) ~= token then return 0 end
if count > 0 then
  -- the work list holds increasing seqs and only the lease holder pops it: checking both ends
  -- of the run it processed proves it is still exactly the head
  local head, tail = redis.call('LINDEX', work, 0), redis.call('LINDEX', work, count - 1)
  if not head or not tail or struct.unpack('<I4', head) ~= first or struct.unpack('<I4', tail) ~= last then
    return 0
  end
  redis.call('LTRIM', work, count, -1)
  redis.call('SET', ctx, ARGV[9])
  redis.call('HINCRBY', dev, 'processed', count)
  redis.call('HINCRBY', dev, 'frames', frames)
  redis.call('HSET', dev, 'processed_seq', last)
  redis.call('HINCRBY', metrics, 'processed', count)
  if replica ~= '' then redis.call('HINCRBY', metrics, 'processed_by:' .. replica, count) end
end
local states = cjson.decode(ARGV[10])
for label, state in pairs(states) do redis.call('HSET', evstate, label, state) end
local n_events = tonumber(ARGV[11])
for i = 0, n_events - 1 do
  local base = 12 + i * 4
  redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 'site', ARGV[base], 'device', ARGV[base + 1],
             'label', ARGV[base + 2], 'json', ARGV[base + 3])
end
if n_events > 0 then redis.call('HINCRBY', metrics, 'events', n_events) end
redis.call('PEXPIRE', lease, ttl)
return 1
"""

RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
if redis.call('LLEN', KEYS[2]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[3], ARGV[3])
return 1
"""

SCRIPTS = {"accept": ACCEPT, "commit": COMMIT, "release": RELEASE}


@dataclass(frozen=True)
class WorkItem:
    seq: int
    t_end_ns: int
    received_ns: int
    codes: np.ndarray  # (N,) uint16

    def to_bytes(self) -> bytes:
        return ITEM_HEADER.pack(self.seq, self.t_end_ns, self.received_ns) + self.codes.astype("<u2").tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> WorkItem:
        seq, t_end_ns, received_ns = ITEM_HEADER.unpack_from(data)
        return cls(seq, t_end_ns, received_ns, np.frombuffer(data, "<u2", offset=ITEM_HEADER.size).copy())


@dataclass(frozen=True)
class Accepted:
    new: bool  # False: a duplicate or a refused seq jump, dropped
    released: int  # items that became ready, in order (0: parked behind a gap)
    lost: int  # messages given up as lost in this call
    seq_jump: bool = False  # refused: its seq ran further ahead than the time since the newest allows


@dataclass
class Lease:
    site: str
    device: str
    token: str


@dataclass
class Peek:
    """The head of a leased device's work list, with the state processing starts from."""

    lease: Lease
    items: list[WorkItem]
    context: np.ndarray  # (T,) uint16 codes, oldest first
    states: dict[str, dict]  # label -> event-logic state


@dataclass
class Commit:
    """The outcome of processing ``items`` (the head of the work list, in order; none for
    closing events on offline): the new context and event state, and the events."""

    lease: Lease
    items: list[WorkItem]
    context: np.ndarray | None
    states: dict[str, dict]
    events: list[tuple[str, str, str, bytes]]  # site, device, label, event JSON


class DeviceLog:
    """The per-device ordered work queue (see the module docstring)."""

    def __init__(self, r: redis.Redis, key: Callable[..., str], events_maxlen: int,
                 reorder_window_ms: int = 2000, max_pending: int = 30, lease_ms: int = 10_000):
        self.r, self.key, self.events_maxlen = r, key, events_maxlen
        self.reorder_window_ms, self.max_pending, self.lease_ms = reorder_window_ms, max_pending, lease_ms
        self._sha: dict[str, str] = {}
        self._load_scripts()

    def _load_scripts(self) -> None:
        self._sha = {name: self.r.script_load(source) for name, source in SCRIPTS.items()}

    def _run_scripts(self, calls: list[tuple[str, list, list]]) -> list:
        """(script name, keys, args) calls in one pipelined round trip, by SHA. redis-py's
        Script objects would ask SCRIPT EXISTS before every pipeline (a round trip more);
        instead a Redis that lost its script cache (restarted) answers NOSCRIPT to every
        call, nothing ran, and the scripts are loaded again and the calls sent once more."""
        for attempt in range(2):
            pipe = self.r.pipeline(transaction=False)
            for name, keys, args in calls:
                pipe.evalsha(self._sha[name], len(keys), *keys, *args)
            try:
                return pipe.execute()
            except redis.exceptions.NoScriptError:
                if attempt:
                    raise
                self._load_scripts()
        raise AssertionError("unreachable")

    def _keys(self, kind: str, site: str, device: str) -> str:
        return self.key(kind, site, device)

    def accept_many(self, entries: list[tuple[str, str, WorkItem]], now_ms: int) -> list[Accepted]:
        """Accept (site, device, item) entries, in order, in one round trip."""
        calls = [("accept",
                  [self._keys("dev", site, device), self._keys("pend", site, device),
                   self._keys("work", site, device), self.key("active")],
                  [item.seq, item.to_bytes(), now_ms, self.reorder_window_ms, self.max_pending, f"{site}/{device}",
                   item.t_end_ns // 1_000_000, item.codes.size * FRAME_DURATION_NS / 1e6, SEQ_JUMP_SLACK])
                 for site, device, item in entries]
        return [Accepted(status == 1, int(released), int(lost), seq_jump=status == 2)
                for status, released, lost in self._run_scripts(calls)]

    def accept(self, site: str, device: str, item: WorkItem, now_ms: int) -> Accepted:
        return self.accept_many([(site, device, item)], now_ms)[0]

    def lease_many(self, devices: list[tuple[str, str]]) -> list[Lease | None]:
        """Try to lease each (site, device); None where another holder has it."""
        pipe = self.r.pipeline(transaction=False)
        leases = [Lease(site, device, uuid.uuid4().hex) for site, device in devices]
        for lease in leases:
            pipe.set(self._keys("lease", lease.site, lease.device), lease.token, nx=True, px=self.lease_ms)
        return [lease if ok else None for lease, ok in zip(leases, pipe.execute(), strict=True)]

    def lease(self, site: str, device: str) -> Lease | None:
        return self.lease_many([(site, device)])[0]

    def peek_many(self, leases: list[Lease], limit: int) -> list[Peek]:
        """Up to ``limit`` items from the head of each leased device's work list, with its
        context and event state."""
        pipe = self.r.pipeline(transaction=False)
        for lease in leases:
            pipe.lrange(self._keys("work", lease.site, lease.device), 0, limit - 1)
            pipe.get(self._keys("ctx", lease.site, lease.device))
            pipe.hgetall(self._keys("evstate", lease.site, lease.device))
        replies = pipe.execute()
        peeks = []
        for i, lease in enumerate(leases):
            raw_items, ctx, states = replies[3 * i : 3 * i + 3]
            peeks.append(Peek(lease, [WorkItem.from_bytes(b) for b in raw_items],
                              np.frombuffer(ctx or b"", "<u2").copy(),
                              {k.decode(): json.loads(v) for k, v in states.items()}))
        return peeks

    def peek(self, lease: Lease, limit: int) -> tuple[list[WorkItem], np.ndarray, dict[str, dict]]:
        peek = self.peek_many([lease], limit)[0]
        return peek.items, peek.context, peek.states

    def commit_many(self, commits: list[Commit], replica: str = "") -> list[bool]:
        """Each commit all or nothing: pop its items, store the context and the event state,
        append the events, count them as processed (and by ``replica``, if named). False where
        the lease was lost (another replica took over): that holder must stop."""
        calls = []
        for c in commits:
            s, d = c.lease.site, c.lease.device
            first, last = (c.items[0].seq, c.items[-1].seq) if c.items else (-1, -1)
            frames = sum(len(item.codes) for item in c.items)
            flat: list[object] = [field for event in c.events for field in event]
            calls.append((
                "commit",
                [self._keys("lease", s, d), self._keys("work", s, d), self._keys("ctx", s, d),
                 self._keys("evstate", s, d), self.key("events"), self.key("metrics"), self._keys("dev", s, d)],
                [c.lease.token, first, last, len(c.items), frames, self.lease_ms, self.events_maxlen, replica,
                 b"" if c.context is None else c.context.astype("<u2").tobytes(),
                 json.dumps({k: json.dumps(v) for k, v in c.states.items()}), len(c.events), *flat],
            ))
        return [bool(ok) for ok in self._run_scripts(calls)]

    def commit(self, lease: Lease, items: list[WorkItem], context: np.ndarray | None, states: dict[str, dict],
               events: list[tuple[str, str, str, bytes]], replica: str = "") -> bool:
        return self.commit_many([Commit(lease, items, context, states, events)], replica)[0]

    def release_many(self, leases: list[Lease]) -> list[bool]:
        """Give each lease back if its work list is empty; False: more work arrived, keep
        draining (a lease that expired meanwhile counts as given back: nothing more to do)."""
        calls = [("release",
                  [self._keys("lease", lease.site, lease.device), self._keys("work", lease.site, lease.device),
                   self.key("active")],
                  [lease.token, self.lease_ms, f"{lease.site}/{lease.device}"])
                 for lease in leases]
        return [done != 0 for done in self._run_scripts(calls)]  # -1: lost the lease (expired)

    def release(self, lease: Lease) -> bool:
        return self.release_many([lease])[0]

    def active_devices(self) -> list[tuple[str, str]]:
        """Devices with work waiting (for the sweeper)."""
        return [tuple(m.decode().split("/", 1)) for m in self.r.smembers(self.key("active"))]

    def waiting_longest(self, now_ns: int) -> tuple[str, str, WorkItem, float] | None:
        """The device whose oldest ready item has waited longest since the ingest received it:
        (site, device, item, seconds), or None when no work waits. Two round trips whatever the
        fleet size (the active set, then the head of each of its work lists)."""
        devices = self.active_devices()
        pipe = self.r.pipeline(transaction=False)
        for site, device in devices:
            pipe.lindex(self._keys("work", site, device), 0)
        heads = [(site, device, WorkItem.from_bytes(raw))
                 for (site, device), raw in zip(devices, pipe.execute(), strict=True) if raw]
        if not heads:
            return None
        site, device, item = min(heads, key=lambda head: head[2].received_ns)
        return site, device, item, (now_ns - item.received_ns) / 1e9
