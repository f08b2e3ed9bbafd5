"""PostgreSQL session store: sessions on a database that teams keep and back up.

Tables, created and migrated at start-up (``chatstream_schema`` holds the version):

* ``sessions``     key (``SessionRef.key``), owner, id, created_at, last_activity, title,
                   message_count, fence (the token of the last fenced write), last_write
                   (the id of the last write, to know a retried one), history_length
                   (NULL in a session written before version 2: its next write counts it)
* ``messages``     session_key, position, body (a message as JSON, in ``bytea``: JSON text
                   may hold ``\\u0000``, which ``jsonb`` refuses)
* ``parked_runs``  run_id, body

A turn is one transaction: the session's row is created or locked, its fence checked,
the messages inserted and the row updated, so a reader on any instance sees all of the
turn or none of it, and two writers of one session take turns. Writing a turn outlasts a
short outage (a restart, a failover) as the Redis store's does: it is tried again with
backoff for ``outage_s``, and ``last_write`` makes a repeated attempt harmless when an
earlier one was committed before its answer was lost. Reads are tried once more at once
(a pooled connection that a restart left dead), then fail: their caller is a request
that can be retried. A database that is down at start-up does not stop the server: the
schema is brought up to date on the first call that reaches it.

The pool lives on an event loop of the store's own, on a thread of its own, and every
store call is one hop there and back, as with the SQLite store's thread. A call's round
trips to the database then wait on a loop with nothing else to do: on the server's own
loop, each one would wait for a turn of a loop busy with a thousand streams, and the
thousandth turn to start would wait seconds for its history (``bench/run.py``, C=1,000).

What went wrong (host, port, the driver's words) is logged; a ``StoreError`` says only
``UNAVAILABLE``, since its message reaches clients.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
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
from chatstream.store.outage import retry_while_down

try:
    import asyncpg
except ImportError as missing:  # pragma: no cover - asyncpg is a dependency of chatstream
    raise ImportError(
        "the PostgreSQL store needs asyncpg: pip install asyncpg (or reinstall chatstream)"
    ) from missing

log = logging.getLogger("chatstream.store")
T = TypeVar("T")

UNAVAILABLE = "The session store is unavailable."

# The database could not be reached, hung up, or is shutting down or starting up, as
# opposed to refusing a statement: only these are worth trying again.
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, cannot connect now
)
# Anything the driver raises: an outage, or a statement the database refused.
FAILURES: tuple[type[BaseException], ...] = (asyncpg.PostgresError, *OUTAGE_ERRORS)

# Each version's statements, applied in order to a database of a lower version.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: sessions with their fencing token, their messages, parked runs.
    (
        """
        CREATE TABLE sessions (
            key           text PRIMARY KEY,
            owner         text NOT NULL,
            id            text NOT NULL,
            created_at    double precision NOT NULL,
            last_activity double precision NOT NULL,
            title         text NOT NULL DEFAULT '',
            message_count integer NOT NULL DEFAULT 0,
            fence         bigint,
            last_write    text
        )
        """,
        "CREATE INDEX sessions_by_owner_activity ON sessions (owner, last_activity DESC)",
        """
        CREATE TABLE messages (
            session_key text NOT NULL REFERENCES sessions (key) ON DELETE CASCADE,
            position    integer NOT NULL,
            body        bytea NOT NULL,
            PRIMARY KEY (session_key, position)
        )
        """,
        "CREATE TABLE parked_runs (run_id text PRIMARY KEY, body bytea NOT NULL)",
    ),
    # 2: each session's history length, so that a turn reads only the end of its session.
    ("ALTER TABLE sessions ADD COLUMN history_length integer",),
)
SCHEMA_VERSION = len(MIGRATIONS)
# Held while migrating, so that instances starting together migrate once.
_MIGRATION_LOCK = 0x63687374  # "chst"

# A turn's write is two statements in a transaction: the first creates or locks the
# session's row and says what the fence check and the count need; the second adds the
# messages and moves the row on: three round trips in all (four to replace a turn).
_LOCK_ROW = """
INSERT INTO sessions AS s (key, owner, id, created_at, last_activity, title)
VALUES ($1, $2, $3, $4, $4, $5)
ON CONFLICT (key) DO UPDATE SET
    last_activity = excluded.last_activity,
    title = CASE WHEN s.title = '' THEN excluded.title ELSE s.title END
RETURNING created_at, last_activity, message_count, fence, last_write, history_length
"""
_WRITE = """
WITH added AS (
    INSERT INTO messages (session_key, position, body)
    SELECT $1, $2 + n - 1, body FROM unnest($3::bytea[]) WITH ORDINALITY AS t(body, n)
)
UPDATE sessions
SET message_count = $2 + cardinality($3::bytea[]), fence = COALESCE($4, fence),
    last_write = $5, history_length = $6
WHERE key = $1
"""
# A regenerated answer's write drops the turn it replaces first (same transaction).
_CUT = "DELETE FROM messages WHERE session_key = $1 AND position >= $2 RETURNING body"
_LOAD = """
SELECT s.created_at, s.last_activity, s.message_count, s.history_length, m.body
FROM sessions s LEFT JOIN messages m
    ON m.session_key = s.key AND m.position >= s.message_count - $2
WHERE s.key = $1
ORDER BY m.position
"""
_ALL_BODIES = "SELECT body FROM messages WHERE session_key = $1"
# ``_LOAD``'s "last" for every message.
_EVERY = 2**31 - 1


def unavailable(what: str, exc: BaseException) -> StoreError:
    """Log what failed, with the driver's own words, and return the error a client may read."""
    log.warning("%s: %s: %s", what, type(exc).__name__, exc)
    return StoreError(UNAVAILABLE)


async def outlast(call: Callable[[], Awaitable[T]], *, within_s: float, what: str) -> T:
    """``await call()``, tried again with backoff while the database is unreachable."""
    return await retry_while_down(
        call, within_s=within_s, what=what, errors=OUTAGE_ERRORS, service="PostgreSQL", log=log
    )


class _StoreLoop:
    """An event loop on a thread of its own, which the store's pool lives on."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="chatstream-postgres", daemon=True
        )
        self._thread.start()

    async def run(self, call: Coroutine[Any, Any, T]) -> T:
        """Run ``call`` there and wait for it here (a cancel here cancels it there)."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call, self.loop))

    async def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 5)
        if not self._thread.is_alive():
            self.loop.close()


class PostgresStore:
    """Sessions in PostgreSQL, through an asyncpg pool; opened with ``await open(url)``."""

    name = "postgresql"

    def __init__(self, pool: asyncpg.Pool, runner: _StoreLoop, *, outage_s: float = 10.0) -> None:
        self.pool = pool
        self.outage_s = outage_s
        self._runner = runner
        self._migrated = False
        self._migrating = asyncio.Lock()  # used on the store's loop only

    @classmethod
    async def open(
        cls, url: str, *, outage_s: float = 10.0, max_connections: int = 10
    ) -> PostgresStore:
        """A pool on ``url`` (connected lazily), with the schema brought up to date.

        A database that cannot be reached now is migrated on first use instead; one whose
        schema is newer than this chatstream knows stops start-up (``StoreError``).
        """

        async def create() -> asyncpg.Pool:
            return await asyncpg.create_pool(
                url,
                min_size=0,
                max_size=max_connections,
                # Fail fast while the database is down; a stalled one must not hang a call.
                timeout=2.0,
                command_timeout=10.0,
                # Nothing here changes a connection's session state (no SET, LISTEN or
                # session-level lock): skip asyncpg's reset query, a round trip per release.
                reset=_keep_as_is,
            )

        runner = _StoreLoop()
        try:
            store = cls(await runner.run(create()), runner, outage_s=outage_s)
        except BaseException:
            await runner.stop()
            raise
        try:
            await runner.run(store._migrate())
        except OUTAGE_ERRORS as exc:
            log.warning(
                "PostgreSQL is unreachable at start-up (%s); the schema is checked once it is",
                exc,
            )
        except BaseException:
            await store.close()
            raise
        return store

    async def _migrate(self) -> None:
        """Create or migrate the schema, once, in one transaction under an advisory lock."""
        async with self._migrating:
            if self._migrated:
                return
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS chatstream_schema (version integer NOT NULL)"
                )
                version = await conn.fetchval("SELECT max(version) FROM chatstream_schema")
                version = int(version or 0)
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"the database has chatstream schema version {version}; this "
                        f"chatstream knows up to {SCHEMA_VERSION}. Upgrade chatstream."
                    )
                for statements in MIGRATIONS[version:]:
                    for statement in statements:
                        await conn.execute(statement)
                if version < SCHEMA_VERSION:
                    await conn.execute("DELETE FROM chatstream_schema")
                    await conn.execute(
                        "INSERT INTO chatstream_schema (version) VALUES ($1)", SCHEMA_VERSION
                    )
                    log.info(
                        "PostgreSQL schema migrated from version %d to %d", version, SCHEMA_VERSION
                    )
            self._migrated = True

    async def _read(
        self, call: Callable[[asyncpg.pool.PoolConnectionProxy[Any]], Awaitable[T]], what: str
    ) -> T:
        """Run a read on a pooled connection; tried once more at once after a lost one."""

        async def attempt() -> T:
            if not self._migrated:
                await self._migrate()
            async with self.pool.acquire() as conn:
                return await call(conn)

        async def twice() -> T:
            try:
                return await attempt()
            except OUTAGE_ERRORS:
                return await attempt()

        try:
            return await self._runner.run(twice())
        except FAILURES as exc:
            raise unavailable(what, exc) from exc

    async def _write(
        self, call: Callable[[asyncpg.pool.PoolConnectionProxy[Any]], Awaitable[T]], what: str
    ) -> T:
        """Run a write that is safe to repeat, outlasting an outage of ``outage_s``."""

        async def attempt() -> T:
            if not self._migrated:
                await self._migrate()
            async with self.pool.acquire() as conn:
                return await call(conn)

        try:
            return await self._runner.run(outlast(attempt, within_s=self.outage_s, what=what))
        except FAILURES as exc:
            raise unavailable(what, exc) from exc

    async def load(self, ref: SessionRef, *, last: int | None = None) -> Session | None:
        """The session with its messages in order (its last ``last`` of them), or None."""
        session_id = ref.key

        async def read(conn: asyncpg.pool.PoolConnectionProxy[Any]) -> Session | None:
            rows = await conn.fetch(_LOAD, session_id, _EVERY if last is None else last)
            if not rows:
                return None
            first = rows[0]
            messages = decoded(r["body"] for r in rows if r["body"] is not None)
            start = first["message_count"] - len(messages)
            counted = first["history_length"]
            if counted is None and start > 0:  # stored before the count was kept
                counted = history_length(decoded(await _bodies(conn, session_id)))
            return Session(
                session_id,
                messages,
                created_at=first["created_at"],
                last_activity=first["last_activity"],
                start=start,
                total_history=counted,
            )

        return await self._read(read, f"reading session {session_id!r}")

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
        title = title.replace("\x00", "")  # text columns cannot hold NUL
        written = stamped(messages, now)
        bodies = [orjson.dumps(m.to_dict()) for m in written]
        write_id = secrets.token_hex(8)

        async def write(conn: asyncpg.pool.PoolConnectionProxy[Any]) -> Session:
            async with conn.transaction():
                row = await conn.fetchrow(_LOCK_ROW, session_id, ref.owner, ref.id, now, title)
                assert row is not None
                count = int(row["message_count"])
                counted = row["history_length"]
                if row["last_write"] == write_id:  # this write, tried again: it is there
                    start = count - len(written)
                    return Session(session_id, written, row["created_at"], now, start, counted)
                if fence is not None and row["fence"] is not None and fence <= row["fence"]:
                    raise Fenced(FENCED)
                if counted is None:  # a new session, or one stored before the count was kept
                    older = await _bodies(conn, session_id) if count else []
                    counted = history_length(decoded(older))
                if replace_from is not None and replace_from < count:
                    cut = await conn.fetch(_CUT, session_id, replace_from)
                    counted -= history_length(decoded(r["body"] for r in cut))
                    count = replace_from
                counted += history_length(written)
                await conn.execute(_WRITE, session_id, count, bodies, fence, write_id, counted)
            return Session(session_id, written, row["created_at"], now, count, counted)

        return await self._write(write, f"writing session {session_id!r}")

    async def delete(self, ref: SessionRef) -> bool:
        """Remove a session and its messages."""
        session_id = ref.key
        status = await self._read(
            lambda conn: conn.execute("DELETE FROM sessions WHERE key = $1", session_id),
            f"deleting session {session_id!r}",
        )
        return status != "DELETE 0"

    async def list(self, *, limit: int = 50, owner: str = "") -> list[SessionSummary]:
        """An owner's recent sessions, most recently active first."""
        rows = await self._read(
            lambda conn: conn.fetch(
                "SELECT id, title, created_at, last_activity, message_count FROM sessions"
                " WHERE owner = $1 ORDER BY last_activity DESC LIMIT $2",
                owner,
                limit,
            ),
            "listing sessions",
        )
        return [
            SessionSummary(
                r["id"], r["title"], r["created_at"], r["last_activity"], r["message_count"]
            )
            for r in rows
        ]

    async def park(self, run_id: str, record: dict[str, Any] | None) -> None:
        """Keep (or, with None, forget) what a parked run needs to go on after a restart."""

        async def write(conn: asyncpg.pool.PoolConnectionProxy[Any]) -> None:
            if record is None:
                await conn.execute("DELETE FROM parked_runs WHERE run_id = $1", run_id)
            else:
                await conn.execute(
                    "INSERT INTO parked_runs (run_id, body) VALUES ($1, $2)"
                    " ON CONFLICT (run_id) DO UPDATE SET body = excluded.body",
                    run_id,
                    orjson.dumps(record),
                )

        await self._write(write, f"parking run {run_id!r}")

    async def parked(self, run_id: str) -> dict[str, Any] | None:
        """A parked run's record, or None."""
        body = await self._read(
            lambda conn: conn.fetchval("SELECT body FROM parked_runs WHERE run_id = $1", run_id),
            f"reading parked run {run_id!r}",
        )
        return None if body is None else cast("dict[str, Any]", orjson.loads(body))

    async def ping(self) -> bool:
        """True when the database answers a trivial query, within a few seconds."""

        async def ask() -> None:
            async with asyncio.timeout(4.0):
                if not self._migrated:
                    await self._migrate()
                async with self.pool.acquire() as conn:
                    await conn.fetchval("SELECT 1")

        try:
            await self._runner.run(ask())
        except FAILURES:
            return False
        except StoreError:
            return False
        return True

    async def close(self) -> None:
        """Close the pool's connections, then the store's loop and thread."""

        async def shut() -> None:
            try:
                await asyncio.wait_for(self.pool.close(), timeout=5)
            except TimeoutError:
                self.pool.terminate()

        try:
            await self._runner.run(shut())
        finally:
            await self._runner.stop()


async def _keep_as_is(conn: asyncpg.Connection[Any]) -> None:
    """A pooled connection's reset: an open transaction was rolled back already."""


async def _bodies(conn: asyncpg.pool.PoolConnectionProxy[Any], session_id: str) -> list[bytes]:
    return [r["body"] for r in await conn.fetch(_ALL_BODIES, session_id)]
