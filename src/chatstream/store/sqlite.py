"""SQLite session store: one file, WAL, a versioned schema, one write per turn.

The connection lives on one worker thread, and every store call is one function run
there: a turn's load is one hop to that thread, its append (one transaction) another.
Two things follow: calls cannot interleave, so concurrent turns cannot see or roll
back each other's half-written transactions; and a turn costs two thread hops instead
of one per statement, fetch and commit (about a quarter of the CPU with aiosqlite).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar, cast

import orjson

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

# 1: sessions and messages. 2: parked runs (turns waiting for approval across a restart).
# 3: each session's fencing token (``store.base``). 4: each session's history length, so
# that a turn reads only the end of its session (NULL in a session older than that: it
# is counted from its messages once, by its next write).
SCHEMA_VERSION = 4
T = TypeVar("T")

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
    """
    CREATE TABLE IF NOT EXISTS parked_runs (
        run_id TEXT PRIMARY KEY,
        body   BLOB NOT NULL
    ) WITHOUT ROWID
    """,
]
# Changes to tables that the statements above made in an older version, by the version
# that brings them: applied to a file of a lower version, after those statements.
_MIGRATIONS = {
    3: ["ALTER TABLE sessions ADD COLUMN fence INTEGER"],
    4: ["ALTER TABLE sessions ADD COLUMN history_length INTEGER"],
}


def _connect(path: Path) -> sqlite3.Connection:
    """Open and migrate; runs on the store's thread."""
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA busy_timeout=5000")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{path} has schema version {version}; this chatstream knows up to "
                f"{SCHEMA_VERSION}. Upgrade chatstream or use another file."
            )
        if version < SCHEMA_VERSION:
            with _transaction(db):
                for statement in _SCHEMA:
                    db.execute(statement)
                for target, statements in sorted(_MIGRATIONS.items()):
                    if version < target:
                        for statement in statements:
                            db.execute(statement)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    except BaseException:
        db.close()
        raise
    return db


class _transaction:
    """BEGIN IMMEDIATE … COMMIT, or ROLLBACK on any error."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if kind is None else "ROLLBACK")


class SQLiteStore:
    """Sessions in a SQLite file; opened with ``await SQLiteStore.open(path)``."""

    name = "sqlite"

    def __init__(self, db: sqlite3.Connection, path: Path, thread: ThreadPoolExecutor) -> None:
        self._db = db
        self._thread = thread
        self.path = path

    @classmethod
    async def open(cls, path: str | Path) -> SQLiteStore:
        """Open (creating on first use) and migrate the database at ``path``."""
        path = Path(path)
        if str(path) != ":memory:":
            path.parent.mkdir(parents=True, exist_ok=True)
        thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatstream-sqlite")
        try:
            db = await asyncio.get_running_loop().run_in_executor(thread, _connect, path)
        except BaseException:
            thread.shutdown(wait=False)
            raise
        return cls(db, path, thread)

    async def _run(self, call: Callable[[], T], failure: str) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, call)
        except sqlite3.Error as exc:
            raise StoreError(f"{failure}: {exc}") from exc

    def _load(self, session_id: str, last: int | None) -> Session | None:
        row = self._db.execute(
            "SELECT created_at, last_activity, message_count, history_length FROM sessions"
            " WHERE id = ?",
            (session_id,),
        ).fetchone()
        if row is None:
            return None
        created_at, last_activity, count, counted = row
        start = 0 if last is None else max(count - last, 0)
        messages = self._messages(session_id, start)
        if counted is None and start > 0:
            counted = history_length(self._messages(session_id, 0))
        return Session(session_id, messages, created_at, last_activity, start, counted)

    def _messages(self, session_id: str, start: int) -> tuple[Message, ...]:
        bodies = self._db.execute(
            "SELECT body FROM messages WHERE session_id = ? AND position >= ? ORDER BY position",
            (session_id, start),
        ).fetchall()
        return decoded(body for (body,) in bodies)

    async def load(self, ref: SessionRef, *, last: int | None = None) -> Session | None:
        """The session with its messages in order (its last ``last`` of them), or None."""
        session_id = ref.key
        return await self._run(
            lambda: self._load(session_id, last), f"could not read session {session_id!r}"
        )

    def _append(
        self,
        session_id: str,
        messages: Sequence[Message],
        fence: int | None,
        replace_from: int | None,
    ) -> Session:
        now = time.time()
        title = next((m.content[:80] for m in messages if m.role == "user"), "")
        written = stamped(messages, now)
        db = self._db
        with _transaction(db):
            db.execute(
                "INSERT INTO sessions (id, created_at, last_activity, title) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(id) DO UPDATE SET last_activity = excluded.last_activity",
                (session_id, now, now, title),
            )
            created_at, start, stored_fence, counted = db.execute(
                "SELECT created_at, message_count, fence, history_length FROM sessions"
                " WHERE id = ?",
                (session_id,),
            ).fetchone()
            if fence is not None:
                # A write is never retried here, so "the same write again" cannot happen.
                if stored_fence is not None and fence <= stored_fence:
                    raise Fenced(FENCED)
                db.execute("UPDATE sessions SET fence = ? WHERE id = ?", (fence, session_id))
            if counted is None:  # a new session, or one stored before the count was kept
                counted = history_length(self._messages(session_id, 0)) if start else 0
            if replace_from is not None and replace_from < start:
                counted -= history_length(self._messages(session_id, replace_from))
                db.execute(
                    "DELETE FROM messages WHERE session_id = ? AND position >= ?",
                    (session_id, replace_from),
                )
                start = replace_from
            db.executemany(
                "INSERT INTO messages (session_id, position, body) VALUES (?, ?, ?)",
                [
                    (session_id, start + i, orjson.dumps(msg.to_dict()))
                    for i, msg in enumerate(written)
                ],
            )
            counted += history_length(written)
            db.execute(
                "UPDATE sessions SET message_count = ?, history_length = ?,"
                " title = CASE WHEN title = '' THEN ? ELSE title END WHERE id = ?",
                (start + len(written), counted, title, session_id),
            )
        return Session(session_id, written, created_at, now, start, counted)

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
        return await self._run(
            lambda: self._append(session_id, messages, fence, replace_from),
            f"could not write session {session_id!r}",
        )

    def _delete(self, session_id: str) -> bool:
        with _transaction(self._db):
            cursor = self._db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
        return cursor.rowcount > 0

    async def delete(self, ref: SessionRef) -> bool:
        """Remove a session and its messages."""
        session_id = ref.key
        return await self._run(
            lambda: self._delete(session_id), f"could not delete session {session_id!r}"
        )

    async def list(self, *, limit: int = 50, owner: str = "") -> list[SessionSummary]:
        """An owner's recent sessions, most recently active first."""
        if owner:
            where, args = "substr(id, 1, ?) = ?", [len(owner) + 1, owner + "/"]
        else:
            where, args = "instr(id, '/') = 0", []
        query = (
            "SELECT id, title, created_at, last_activity, message_count FROM sessions"
            f" WHERE {where} ORDER BY last_activity DESC LIMIT ?"
        )
        rows = await self._run(
            lambda: self._db.execute(query, (*args, limit)).fetchall(), "could not list sessions"
        )
        return [SessionSummary(SessionRef.from_key(r[0]).id, r[1], r[2], r[3], r[4]) for r in rows]

    def _park(self, run_id: str, record: dict[str, Any] | None) -> None:
        with _transaction(self._db):
            if record is None:
                self._db.execute("DELETE FROM parked_runs WHERE run_id = ?", (run_id,))
            else:
                self._db.execute(
                    "INSERT OR REPLACE INTO parked_runs (run_id, body) VALUES (?, ?)",
                    (run_id, orjson.dumps(record)),
                )

    async def park(self, run_id: str, record: dict[str, Any] | None) -> None:
        """Keep (or, with None, forget) what a parked run needs to go on after a restart."""
        await self._run(lambda: self._park(run_id, record), f"could not park run {run_id!r}")

    async def parked(self, run_id: str) -> dict[str, Any] | None:
        """A parked run's record, or None."""
        row = await self._run(
            lambda: self._db.execute(
                "SELECT body FROM parked_runs WHERE run_id = ?", (run_id,)
            ).fetchone(),
            f"could not read parked run {run_id!r}",
        )
        return None if row is None else cast("dict[str, Any]", orjson.loads(row[0]))

    async def ping(self) -> bool:
        """Run a trivial query."""
        try:
            await self._run(lambda: self._db.execute("SELECT 1").fetchone(), "ping")
        except StoreError:
            return False
        return True

    async def close(self) -> None:
        """Close the connection (checkpointing the WAL) and its thread."""
        await asyncio.get_running_loop().run_in_executor(self._thread, self._db.close)
        self._thread.shutdown(wait=True)
