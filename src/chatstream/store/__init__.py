"""Session stores, opened from a URL: ``sqlite:///path`` (default), ``redis://…`` or
``postgresql://user:password@host:port/database``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from chatstream.store.base import Fenced, Session, SessionStore, SessionSummary

__all__ = ["Fenced", "Session", "SessionStore", "SessionSummary", "StoreURL", "open_store"]


@dataclass(frozen=True, slots=True)
class StoreURL:
    """A store URL read once: which backend, and where (a SQLite path, or the server's URL)."""

    backend: Literal["sqlite", "redis", "postgresql"]
    location: str

    @classmethod
    def parse(cls, url: str) -> StoreURL:
        """Read ``url``; raise ``ValueError`` for a scheme chatstream lacks."""
        if url.startswith("sqlite:///"):
            return cls("sqlite", url.removeprefix("sqlite:///") or "chatstream.db")
        if url == "sqlite://" or url == "sqlite::memory:":
            return cls("sqlite", ":memory:")
        if url.startswith(("redis://", "rediss://", "unix://")):
            return cls("redis", url)
        if url.startswith(("postgresql://", "postgres://")):
            return cls("postgresql", url)
        scheme = url.partition(":")[0]
        raise ValueError(
            f"unsupported store URL (scheme {scheme!r}); use sqlite:///path/to/file.db, "
            "redis://host:port/db or postgresql://user:password@host:port/database"
        )


async def open_store(url: str) -> SessionStore:
    """Open the store a URL names, on a connection of its own; ``ValueError`` as ``parse``.

    A server opens its own from the parsed URL instead, to share one Redis client with its
    runs (``chatstream.server.runtime``).
    """
    where = StoreURL.parse(url)
    if where.backend == "postgresql":
        from chatstream.store.postgres import PostgresStore

        return await PostgresStore.open(where.location)
    if where.backend == "redis":
        from chatstream.store.redis import RedisStore

        return await RedisStore.open(where.location)
    from chatstream.store.sqlite import SQLiteStore

    return await SQLiteStore.open(where.location)
