"""SQLite session store: one file, WAL, a versioned schema, one write per turn."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import aiosqlite
import orjson

from chatstream.errors import StoreError
from chatstream.messages import Message
from chatstream.store.base import Session, SessionSummary, unscoped

SCHEMA_VERSION = 1

_SCHEMA = [
    """
    CREATE TABLE IF NOT EXISTS sessions (
        id            TEXT PRIMARY KEY,
        created_at    REAL NOT NULL,
        last_activity REAL NOT NULL,
        title         TEXT NOT NULL DEFAULT '',
        message_count INTEGER NOT NULL DEFAULT 0
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS messages (
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        position   INTEGER NOT NULL,
        body       BLOB NOT NULL,
        PRIMARY KEY (session_id, position)
    ) WITHOUT ROWID
    """,
    "CREATE INDEX IF NOT EXISTS sessions_by_activity ON sessions(last_activity DESC)",
]


class SQLiteStore:
    """Sessions in a SQLite file; opened with ``await SQLiteStore.open(path)``."""

    name = "sqlite"

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self.path = path

    @classmethod
    async def open(cls, path: str | Path) -> SQLiteStore:
        """Open (creating on first use) and migrate the database at ``path``."""
        path = Path(path)
        if str(path) != ":memory:":
            path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path)
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.execute("PRAGMA foreign_keys=ON")
            await db.execute("PRAGMA busy_timeout=5000")
            async with db.execute("PRAGMA user_version") as cursor:
                row = await cursor.fetchone()
            version = row[0] if row else 0
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{path} has schema version {version}; this chatstream knows up to "
                    f"{SCHEMA_VERSION}. Upgrade chatstream or use another file."
                )
            if version < SCHEMA_VERSION:
                for statement in _SCHEMA:
                    await db.execute(statement)
                await db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                await db.commit()
        except BaseException:
            await db.close()
            raise
        return cls(db, path)

    async def load(self, session_id: str) -> Session | None:
        """The session with its messages in order, or None."""
        try:
            async with self._db.execute(
                "SELECT created_at, last_activity FROM sessions WHERE id = ?", (session_id,)
            ) as cursor:
                row = await cursor.fetchone()
            if row is None:
                return None
            async with self._db.execute(
                "SELECT body FROM messages WHERE session_id = ? ORDER BY position", (session_id,)
            ) as cursor:
                bodies = await cursor.fetchall()
        except aiosqlite.Error as exc:
            raise StoreError(f"could not read session {session_id!r}: {exc}") from exc
        messages = tuple(Message.from_dict(orjson.loads(body)) for (body,) in bodies)
        return Session(session_id, messages, created_at=row[0], last_activity=row[1])

    async def append(self, session_id: str, messages: Sequence[Message]) -> Session:
        """Add a turn's messages in one transaction and return the whole session."""
        now = time.time()
        title = next((m.content[:80] for m in messages if m.role == "user"), "")
        try:
            await self._db.execute(
                "INSERT INTO sessions (id, created_at, last_activity, title) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(id) DO UPDATE SET last_activity = excluded.last_activity",
                (session_id, now, now, title),
            )
            async with self._db.execute(
                "SELECT message_count FROM sessions WHERE id = ?", (session_id,)
            ) as cursor:
                row = await cursor.fetchone()
            start = row[0] if row else 0
            await self._db.executemany(
                "INSERT INTO messages (session_id, position, body) VALUES (?, ?, ?)",
                [
                    (session_id, start + i, orjson.dumps(_stamped(msg, now).to_dict()))
                    for i, msg in enumerate(messages)
                ],
            )
            await self._db.execute(
                "UPDATE sessions SET message_count = ?, title = CASE WHEN title = '' THEN ? "
                "ELSE title END WHERE id = ?",
                (start + len(messages), title, session_id),
            )
            await self._db.commit()
        except aiosqlite.Error as exc:
            await self._db.rollback()
            raise StoreError(f"could not write session {session_id!r}: {exc}") from exc
        session = await self.load(session_id)
        assert session is not None
        return session

    async def delete(self, session_id: str) -> bool:
        """Remove a session and its messages."""
        try:
            cursor = await self._db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
            await self._db.commit()
        except aiosqlite.Error as exc:
            raise StoreError(f"could not delete session {session_id!r}: {exc}") from exc
        return cursor.rowcount > 0

    async def list(self, *, limit: int = 50, owner: str = "") -> list[SessionSummary]:
        """An owner's recent sessions, most recently active first."""
        if owner:
            where, args = "substr(id, 1, ?) = ?", [len(owner) + 1, owner + "/"]
        else:
            where, args = "instr(id, '/') = 0", []
        async with self._db.execute(
            "SELECT id, title, created_at, last_activity, message_count FROM sessions"
            f" WHERE {where} ORDER BY last_activity DESC LIMIT ?",
            (*args, limit),
        ) as cursor:
            rows = await cursor.fetchall()
        return [SessionSummary(unscoped(r[0])[1], r[1], r[2], r[3], r[4]) for r in rows]

    async def ping(self) -> bool:
        """Run a trivial query."""
        try:
            async with self._db.execute("SELECT 1") as cursor:
                await cursor.fetchone()
        except aiosqlite.Error:
            return False
        return True

    async def close(self) -> None:
        """Close the connection (checkpointing the WAL)."""
        await self._db.close()


def _stamped(message: Message, now: float) -> Message:
    if message.created_at is not None:
        return message
    from dataclasses import replace

    return replace(message, created_at=now)
