"""Session stores, opened from a URL: ``sqlite:///path`` (default) or ``redis://…``."""

from __future__ import annotations

from chatstream.store.base import Session, SessionStore, SessionSummary

__all__ = ["Session", "SessionStore", "SessionSummary", "open_store"]


async def open_store(url: str) -> SessionStore:
    """Open the store a URL names; raise ``ValueError`` for a scheme chatstream lacks."""
    if url.startswith("sqlite:///"):
        from chatstream.store.sqlite import SQLiteStore

        return await SQLiteStore.open(url.removeprefix("sqlite:///") or "chatstream.db")
    if url == "sqlite://" or url == "sqlite::memory:":
        from chatstream.store.sqlite import SQLiteStore

        return await SQLiteStore.open(":memory:")
    if url.startswith(("redis://", "rediss://", "unix://")):
        try:
            from chatstream.store.redis import RedisStore
        except ImportError as exc:
            raise ValueError(f"a redis:// store needs redis-py ({exc})") from None
        return await RedisStore.open(url)
    scheme = url.partition(":")[0]
    raise ValueError(
        f"unsupported store URL {url!r} (scheme {scheme!r}); use sqlite:///path/to/file.db or redis://host:port/db"
    )
