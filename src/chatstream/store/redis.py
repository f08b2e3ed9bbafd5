"""Redis session store: several server instances share one set of sessions.

Keys (``<prefix>`` defaults to ``chatstream``):

* ``<prefix>:session:<id>``        hash: created_at, last_activity, title, fence (the
                                   token of its last fenced write), and history_length
                                   (a session written before it was kept is counted by
                                   its next write)
* ``<prefix>:session-log:<id>``    list of messages as JSON, in order (not ``…:<id>:log``:
                                   an id may hold ':', and ``X:log``'s hash would be ``X``'s list)
* ``<prefix>:sessions``            sorted set of session ids by last activity
* ``<prefix>:write:<token>``        marks one ``append`` as done, for a minute

A turn is written by one script, so a reader on another instance sees all of it
or none of it. Writing a turn outlasts a short outage (a restart, a failover, a
stall): it is tried again with backoff for ``outage_s``, and the marker makes a
repeated attempt harmless when an earlier one was applied before its answer was
lost. Reads fail at once: their caller is a request that can be retried.

What went wrong (Redis's host and port, the driver's words) is logged; a
``StoreError`` says only ``UNAVAILABLE``, since its message reaches clients.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

import orjson
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from chatstream.errors import StoreError
from chatstream.messages import Message, history_length
from chatstream.store.base import (
    FENCED,
    Fenced,
    Session,
    SessionRef,
    SessionSummary,
    decoded,
    stamped,
)
from chatstream.store.outage import retry_while_down

log = logging.getLogger("chatstream.store")
T = TypeVar("T")

UNAVAILABLE = "The session store is unavailable."

# Redis could not be reached or did not answer in time, as opposed to refusing a command:
# only these are worth trying again.
OUTAGE_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)

# One reconnection inside the driver, at once: what a pooled connection that a restart of
# Redis left dead needs. Waiting out a longer outage is ``outlast``'s job, for writes only.
RECONNECT_ONCE = Retry(NoBackoff(), 1)


def unavailable(what: str, exc: BaseException) -> StoreError:
    """Log what failed, with Redis's own words, and return the error a client may read."""
    log.warning("%s: %s", what, exc)
    return StoreError(UNAVAILABLE)


async def outlast(call: Callable[[], Awaitable[T]], *, within_s: float, what: str) -> T:
    """``await call()``, tried again with backoff while Redis is unreachable, for ``within_s``.

    Only for calls that are safe to repeat: an attempt whose answer was lost may have been
    applied.
    """
    return await retry_while_down(
        call, within_s=within_s, what=what, errors=OUTAGE_ERRORS, service="Redis", log=log
    )


# KEYS[1] the session, KEYS[2] its messages, KEYS[3] its owner's index, KEYS[4] this write's
# marker; ARGV[1] now, ARGV[2] the title, ARGV[3] the public id, ARGV[4] the fencing token
# ('' for none), ARGV[5] the position from which stored messages are replaced ('' for
# none), ARGV[6] the history length of the messages, ARGV[7...] the messages. Returns
# {1, the session's history length, its message count, its created_at} when written,
# {0, the same} when this write was applied before (a retry), {-1} when refused: the
# session's last fenced write named the same token or a newer one.
_APPEND = """
local function counted(bodies)
  local n = 0
  for _, body in ipairs(bodies) do
    local m = cjson.decode(body)
    if m.role == 'user' or (m.role == 'assistant' and m.toolCalls == nil) then n = n + 1 end
  end
  return n
end
local function written(status, length)
  return {status, length, redis.call('LLEN', KEYS[2]), redis.call('HGET', KEYS[1], 'created_at')}
end
if redis.call('EXISTS', KEYS[4]) == 1 then
  return written(0, tonumber(redis.call('HGET', KEYS[1], 'history_length')))
end
if ARGV[4] ~= '' then
  local stored = redis.call('HGET', KEYS[1], 'fence')
  if stored and tonumber(ARGV[4]) <= tonumber(stored) then return {-1} end
  redis.call('HSET', KEYS[1], 'fence', ARGV[4])
end
redis.call('SET', KEYS[4], '1', 'PX', 60000)
redis.call('HSETNX', KEYS[1], 'created_at', ARGV[1])
redis.call('HSETNX', KEYS[1], 'title', ARGV[2])
redis.call('HSET', KEYS[1], 'last_activity', ARGV[1])
local length = tonumber(redis.call('HGET', KEYS[1], 'history_length'))
if not length then length = counted(redis.call('LRANGE', KEYS[2], 0, -1)) end
if ARGV[5] ~= '' then
  local keep = tonumber(ARGV[5])
  length = length - counted(redis.call('LRANGE', KEYS[2], keep, -1))
  if keep == 0 then redis.call('DEL', KEYS[2]) else redis.call('LTRIM', KEYS[2], 0, keep - 1) end
end
for i = 7, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
length = length + tonumber(ARGV[6])
redis.call('HSET', KEYS[1], 'history_length', length)
redis.call('ZADD', KEYS[3], ARGV[1], ARGV[3])
return written(1, length)
"""


# Connections one client opens at most. Each run has a call in flight now and then (its
# log's mirror, its lock's renewal) and each reader of another instance's run holds one
# in XREAD for up to a second; past this many, a call waits for one (up to ``POOL_WAIT_S``)
# rather than failing. redis-py's default pool refuses any call past 100 in flight: a
# thousand streams at once then got ``503 STORE_UNAVAILABLE`` (``bench/run.py``, C=1,000).
MAX_CONNECTIONS = 512
POOL_WAIT_S = 5.0


def connect(url: str) -> Redis:
    """The client (one connection pool) that everything of chatstream's on one Redis shares.

    It connects lazily, so the server starts even while Redis is down, and reports it; a
    stalled Redis must not hang a call forever (XREAD blocks for at most 1 s).
    """
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=POOL_WAIT_S,
        socket_connect_timeout=2,
        socket_timeout=5,
        health_check_interval=10,
        retry=RECONNECT_ONCE,
    )
    return Redis.from_pool(pool)


class RedisStore:
    """Sessions in Redis, on a client shared with runs; ``await RedisStore.open(url)`` alone.

    ``close`` closes the client only when the store opened it itself: a client handed in
    belongs to whoever handed it in (the server's runtime shares one with the cluster).
    """

    name = "redis"

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str = "chatstream",
        outage_s: float = 10.0,
        owns_client: bool = False,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.outage_s = outage_s
        self._owns_client = owns_client
        self._append = redis.register_script(_APPEND)

    @classmethod
    async def open(
        cls, url: str, *, prefix: str = "chatstream", outage_s: float = 10.0
    ) -> RedisStore:
        """A store on a client of its own (see ``connect``), closed with the store.

        A turn's write waits up to ``outage_s`` for Redis to come back.
        """
        return cls(connect(url), prefix=prefix, outage_s=outage_s, owns_client=True)

    def _session(self, session_id: str) -> str:
        return f"{self.prefix}:session:{session_id}"

    def _log(self, session_id: str) -> str:
        return f"{self.prefix}:session-log:{session_id}"

    def _index(self, owner: str) -> str:
        """The sorted set of one owner's sessions by last activity."""
        return f"{self.prefix}:sessions:{owner}" if owner else f"{self.prefix}:sessions"

    async def load(self, ref: SessionRef, *, last: int | None = None) -> Session | None:
        """The session with its messages in order (its last ``last`` of them), or None."""
        session_id = ref.key
        try:
            meta, count, bodies = await self._read(session_id, last)
            if not meta:
                return None
            start = count - len(bodies)
            kept = meta.get(b"history_length")
            counted = None if kept is None else int(kept)
            if counted is None and start > 0:  # stored before the count was kept
                _, _, everything = await self._read(session_id, None)
                counted = history_length(decoded(everything))
        except (RedisError, OSError) as exc:
            raise unavailable(f"reading session {session_id!r}", exc) from exc
        return Session(
            session_id,
            decoded(bodies),
            created_at=float(meta[b"created_at"]),
            last_activity=float(meta[b"last_activity"]),
            start=start,
            total_history=counted,
        )

    async def _read(
        self, session_id: str, last: int | None
    ) -> tuple[dict[bytes, bytes], int, list[bytes]]:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(self._session(session_id))
            pipe.llen(self._log(session_id))
            pipe.lrange(self._log(session_id), 0 if last is None else -last, -1)
            meta, count, bodies = await pipe.execute()
        return meta, count, bodies

    async def append(
        self,
        ref: SessionRef,
        messages: Sequence[Message],
        *,
        fence: int | None = None,
        replace_from: int | None = None,
    ) -> Session:
        """Add a turn's messages in one transaction; return the session's end (them)."""
        session_id = ref.key
        now = time.time()
        title = next((m.content[:80] for m in messages if m.role == "user"), "")
        written = stamped(messages, now)
        owner, public_id = ref.owner, ref.id
        keys = [
            self._session(session_id),
            self._log(session_id),
            self._index(owner),
            f"{self.prefix}:write:{secrets.token_hex(8)}",
        ]
        args: list[Any] = [
            repr(now),
            title,
            public_id,
            "" if fence is None else fence,
            "" if replace_from is None else replace_from,
            history_length(written),
            *(orjson.dumps(m.to_dict()) for m in written),
        ]
        what = f"writing session {session_id!r}"
        try:
            reply = await outlast(
                lambda: self._append(keys=keys, args=args), within_s=self.outage_s, what=what
            )
        except (RedisError, OSError) as exc:
            raise unavailable(what, exc) from exc
        if int(reply[0]) < 0:
            raise Fenced(FENCED)
        _, counted, count, created_at = reply
        return Session(
            session_id,
            written,
            created_at=float(created_at),
            last_activity=now,
            start=int(count) - len(written),
            total_history=int(counted),
        )

    async def delete(self, ref: SessionRef) -> bool:
        """Remove a session and its messages."""
        session_id = ref.key
        key = self._session(session_id)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(key, self._log(session_id))
                pipe.zrem(self._index(ref.owner), ref.id)
                deleted, _ = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise unavailable(f"deleting session {session_id!r}", exc) from exc
        return int(deleted) > 0

    async def list(self, *, limit: int = 50, owner: str = "") -> list[SessionSummary]:
        """An owner's recent sessions, most recently active first."""
        try:
            ids = cast("list[bytes]", await self.redis.zrevrange(self._index(owner), 0, limit - 1))
            async with self.redis.pipeline(transaction=False) as pipe:
                for raw in ids:
                    session_id = SessionRef(owner, raw.decode()).key
                    pipe.hgetall(self._session(session_id))
                    pipe.llen(self._log(session_id))
                replies: list[Any] = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise unavailable("listing sessions", exc) from exc
        summaries = []
        for raw, meta, count in zip(ids, replies[::2], replies[1::2], strict=True):
            if meta:
                summaries.append(
                    SessionSummary(
                        raw.decode(),
                        meta.get(b"title", b"").decode(),
                        float(meta[b"created_at"]),
                        float(meta[b"last_activity"]),
                        int(count),
                    )
                )
        return summaries

    async def park(self, run_id: str, record: dict[str, Any] | None) -> None:
        """Keep (or, with None, forget) a parked run's record, under ``<p>:parked:<runId>``."""
        key = f"{self.prefix}:parked:{run_id}"

        async def write() -> None:
            if record is None:
                await self.redis.delete(key)
            else:
                await self.redis.set(key, orjson.dumps(record))

        what = f"parking run {run_id!r}"
        try:
            await outlast(write, within_s=self.outage_s, what=what)
        except (RedisError, OSError) as exc:
            raise unavailable(what, exc) from exc

    async def parked(self, run_id: str) -> dict[str, Any] | None:
        """A parked run's record, or None."""
        try:
            body = await self.redis.get(f"{self.prefix}:parked:{run_id}")
        except (RedisError, OSError) as exc:
            raise unavailable(f"reading parked run {run_id!r}", exc) from exc
        return None if body is None else cast("dict[str, Any]", orjson.loads(body))

    async def ping(self) -> bool:
        """True when Redis answers a PING."""
        try:
            return bool(await self.redis.ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        """Close the connection pool, when it is the store's own."""
        if self._owns_client:
            await self.redis.aclose()
