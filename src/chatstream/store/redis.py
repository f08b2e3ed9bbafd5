"""Redis session store: several server instances share one set of sessions.

Keys (``<prefix>`` defaults to ``chatstream``):

* ``<prefix>:session:<id>``        hash: created_at, last_activity, title
* ``<prefix>:session:<id>:log``    list of messages as JSON, in order
* ``<prefix>:sessions``            sorted set of session ids by last activity

A turn is written in one ``MULTI`` transaction, so a reader on another instance
sees all of it or none of it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, cast

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from chatstream.errors import StoreError
from chatstream.messages import Message
from chatstream.store.base import Session, SessionSummary, scoped, unscoped


class RedisStore:
    """Sessions in Redis; opened with ``await RedisStore.open(url)``."""

    name = "redis"

    def __init__(self, redis: Redis, *, prefix: str = "chatstream") -> None:
        self.redis = redis
        self.prefix = prefix

    @classmethod
    async def open(cls, url: str, *, prefix: str = "chatstream") -> RedisStore:
        """Connect lazily: the server starts even while Redis is down, and reports it."""
        redis = Redis.from_url(
            url,
            socket_connect_timeout=2,
            socket_timeout=5,
            health_check_interval=10,
            retry_on_timeout=False,
        )
        return cls(redis, prefix=prefix)

    def _session(self, session_id: str) -> str:
        return f"{self.prefix}:session:{session_id}"

    def _index(self, owner: str) -> str:
        """The sorted set of one owner's sessions by last activity."""
        return f"{self.prefix}:sessions:{owner}" if owner else f"{self.prefix}:sessions"

    async def load(self, session_id: str) -> Session | None:
        """The session with its messages in order, or None."""
        key = self._session(session_id)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(key)
                pipe.lrange(f"{key}:log", 0, -1)
                meta, bodies = await pipe.execute()
        except RedisError as exc:
            raise StoreError(f"Redis could not read session {session_id!r}: {exc}") from exc
        if not meta:
            return None
        return Session(
            session_id,
            tuple(Message.from_dict(orjson.loads(body)) for body in bodies),
            created_at=float(meta[b"created_at"]),
            last_activity=float(meta[b"last_activity"]),
        )

    async def append(self, session_id: str, messages: Sequence[Message]) -> Session:
        """Add a turn's messages in one transaction and return the whole session."""
        now = time.time()
        key = self._session(session_id)
        title = next((m.content[:80] for m in messages if m.role == "user"), "")
        bodies = [
            orjson.dumps((m if m.created_at is not None else replace(m, created_at=now)).to_dict())
            for m in messages
        ]
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hsetnx(key, "created_at", now)
                pipe.hsetnx(key, "title", title)
                pipe.hset(key, "last_activity", now)
                if bodies:
                    pipe.rpush(f"{key}:log", *bodies)
                owner, public_id = unscoped(session_id)
                pipe.zadd(self._index(owner), {public_id: now})
                await pipe.execute()
        except RedisError as exc:
            raise StoreError(f"Redis could not write session {session_id!r}: {exc}") from exc
        session = await self.load(session_id)
        if session is None:
            raise StoreError(f"session {session_id!r} vanished while it was written")
        return session

    async def delete(self, session_id: str) -> bool:
        """Remove a session and its messages."""
        key = self._session(session_id)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(key, f"{key}:log")
                owner, public_id = unscoped(session_id)
                pipe.zrem(self._index(owner), public_id)
                deleted, _ = await pipe.execute()
        except RedisError as exc:
            raise StoreError(f"Redis could not delete session {session_id!r}: {exc}") from exc
        return int(deleted) > 0

    async def list(self, *, limit: int = 50, owner: str = "") -> list[SessionSummary]:
        """An owner's recent sessions, most recently active first."""
        try:
            ids = cast("list[bytes]", await self.redis.zrevrange(self._index(owner), 0, limit - 1))
            async with self.redis.pipeline(transaction=False) as pipe:
                for raw in ids:
                    key = self._session(scoped(owner, raw.decode()))
                    pipe.hgetall(key)
                    pipe.llen(f"{key}:log")
                replies: list[Any] = await pipe.execute()
        except RedisError as exc:
            raise StoreError(f"Redis could not list sessions: {exc}") from exc
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

    async def ping(self) -> bool:
        """True when Redis answers a PING."""
        try:
            return bool(await self.redis.ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        """Close the connection pool."""
        await self.redis.aclose()
