"""Server-sent events of new sound events, read from the Redis event stream.

Each HTTP stream has its own asyncio Redis connection, so its blocking XREAD
waits without holding the event loop or any other request's connection, and is
closed when the client goes away (Serve cancels the request; the generator's
``finally`` closes the connection).

Wire format (https://html.spec.whatwg.org/multipage/server-sent-events.html)::

    : connected                 <- once, after the start position is fixed
    id: 1767225606123-0         <- the Redis Stream entry id: resume with Last-Event-ID
    event: sound_event
    data: {"event_id": ...}     <- the event JSON, one line

    : heartbeat                 <- a comment when nothing was sent for heartbeat_s
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

HEARTBEAT_S = 15.0
"""Seconds without a message before a comment line is sent, so proxies keep the connection."""
RETRY_MS = 3000
"""How long a browser's EventSource waits before reconnecting (sent once, as ``retry:``)."""
READ_COUNT = 100
"""Entries read per XREAD (a resume from far back is sent in pages of this many)."""
EVENT_TYPE = "sound_event"


@dataclass(frozen=True)
class StreamFilter:
    site: str | None = None
    device: str | None = None
    label: str | None = None

    def matches(self, fields: dict[bytes, bytes]) -> bool:
        """On the stream entry's own filter fields: no JSON parsing for entries not sent."""
        return all(want is None or fields.get(name.encode(), b"").decode() == want
                   for name, want in (("site", self.site), ("device", self.device), ("label", self.label)))


def sse_message(entry_id: str, data: bytes) -> bytes:
    return b"id: %s\nevent: %s\ndata: %s\n\n" % (entry_id.encode(), EVENT_TYPE.encode(), data)


async def _last_id(r: aioredis.Redis, key: str) -> str:
    """The id of the newest entry ("$" made concrete, so nothing appended after it is missed)."""
    newest = await r.xrevrange(key, count=1)
    return newest[0][0].decode() if newest else "0-0"


def _entries(reply) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """XREAD's reply for one stream, as RESP2 (list of pairs) or RESP3 (dict) gives it."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return [entry for entries in reply.values() for entry in entries[0]]
    return [entry for _stream, entries in reply for entry in entries]


async def open_event_stream(redis_url: str, key: str, start: str | None, where: StreamFilter,
                            heartbeat_s: float = HEARTBEAT_S, client_name: str = "soundfleet-sse"
                            ) -> AsyncIterator[bytes]:
    """Connect and fix the start position now (so an unreachable Redis is an error the caller can
    answer with a status code), then return the SSE bytes of the entries of stream ``key`` after
    ``start`` (an entry id; None = only entries appended from now on)."""
    r = aioredis.Redis.from_url(redis_url, client_name=client_name, socket_connect_timeout=10,
                                single_connection_client=True)
    try:
        last_id = start or await _last_id(r, key)
    except BaseException:
        await r.aclose()
        raise
    return _follow(r, key, last_id, where, heartbeat_s)


async def _follow(r: aioredis.Redis, key: str, last_id: str, where: StreamFilter, heartbeat_s: float
                  ) -> AsyncIterator[bytes]:
    try:
        yield b"retry: %d\n: connected\n\n" % RETRY_MS
        last_sent = time.monotonic()
        while True:
            wait_ms = max(1, int((heartbeat_s - (time.monotonic() - last_sent)) * 1000))
            reply = await r.xread({key: last_id}, count=READ_COUNT, block=wait_ms)
            for entry_id, fields in _entries(reply):
                last_id = entry_id.decode()
                if where.matches(fields):
                    yield sse_message(last_id, fields[b"json"])
                    last_sent = time.monotonic()
            if time.monotonic() - last_sent >= heartbeat_s:
                yield b": heartbeat\n\n"
                last_sent = time.monotonic()
    except RedisError as exc:  # end the response cleanly: the client resumes with Last-Event-ID
        log.warning("event stream ends at %s: %s", last_id, exc)
    finally:
        await r.aclose()
