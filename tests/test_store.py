"""One test suite for every session store: SQLite, Redis and PostgreSQL behave the same."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from chatstream import messages as m
from chatstream.errors import StoreError
from chatstream.messages import ToolCallRequest, history_length
from chatstream.store import Fenced, SessionStore, open_store
from chatstream.store.base import SessionRef
from chatstream.store.postgres import SCHEMA_VERSION
from chatstream.store.sqlite import SCHEMA_VERSION as SQLITE_SCHEMA_VERSION
from tests.support.postgres import PostgresServer


@pytest.fixture(params=["sqlite", "redis", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SessionStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'sessions.db'}"
    else:
        url = request.getfixturevalue(f"{request.param.removesuffix('ql')}_url")
    opened = await open_store(url)
    try:
        yield opened
    finally:
        await opened.close()


def a_turn(text: str) -> list[m.Message]:
    call = ToolCallRequest("call_1", "calculate", {"expression": "2+2"})
    return [
        m.user(text),
        m.assistant("", tool_calls=(call,)),
        m.tool_result(call, "4"),
        m.assistant("It is 4.", interrupted=False),
    ]


async def test_a_regenerated_turn_replaces_the_last_one_in_one_write(store: SessionStore) -> None:
    ref = SessionRef("", "regen")
    await store.append(ref, [m.user("first"), m.assistant("one")])
    await store.append(ref, [m.user("second"), m.assistant("two")])
    again = await store.append(ref, [m.user("second"), m.assistant("two, again")], replace_from=2)
    assert (again.start, again.history_length) == (2, 4)
    loaded = await store.load(ref)
    assert loaded is not None
    assert [x.content for x in loaded.messages] == ["first", "one", "second", "two, again"]
    # The next turn goes after it; replacing from 0 rewrites the whole session.
    after = await store.append(ref, [m.user("third"), m.assistant("three")])
    assert (after.start, after.history_length) == (4, 6)
    whole = await store.append(ref, [m.user("only"), m.assistant("this")], replace_from=0)
    assert (whole.start, whole.history_length) == (0, 2)
    assert [x.content for x in (await store.load(ref) or whole).messages] == ["only", "this"]


async def test_a_turn_reads_the_end_of_its_session_with_the_whole_count(
    store: SessionStore,
) -> None:
    ref = SessionRef("", "long")
    for i in range(30):
        written = await store.append(ref, a_turn(f"q{i}") if i % 2 else [m.user(f"q{i}")])
        # What a write returns is what it wrote, where it starts, and the count so far.
        assert written.messages[0].content == f"q{i}"
        assert written.history_length == i + 1 + (i + 1) // 2
    end = await store.load(ref, last=5)
    whole = await store.load(ref)
    assert end is not None and whole is not None
    assert end.messages == whole.messages[-5:]
    assert end.start == len(whole.messages) - 5
    assert end.history_length == whole.history_length == 45
    # A window wider than the session is the whole of it.
    wide = await store.load(ref, last=10_000)
    assert wide is not None and (wide.start, wide.messages) == (0, whole.messages)
    # A regenerated turn inside the window is counted out, and the new one in.
    cut = await store.append(ref, [m.user("again"), m.assistant("new")], replace_from=end.start)
    assert cut.history_length == 45 - history_length(end.messages) + 2


async def test_a_missing_session_is_none(store: SessionStore) -> None:
    assert await store.load(SessionRef("", "nobody")) is None
    assert await store.delete(SessionRef("", "nobody")) is False


async def test_turns_round_trip_in_order(store: SessionStore) -> None:
    first = await store.append(SessionRef("", "s1"), a_turn("what is 2+2?"))
    assert first.history_length == 2
    second = await store.append(
        SessionRef("", "s1"), [m.user("and again"), m.assistant("cut", interrupted=True)]
    )
    assert second.history_length == 4
    loaded = await store.load(SessionRef("", "s1"))
    assert loaded is not None
    assert [(x.role, x.content) for x in loaded.messages] == [
        ("user", "what is 2+2?"),
        ("assistant", ""),
        ("tool", "4"),
        ("assistant", "It is 4."),
        ("user", "and again"),
        ("assistant", "cut"),
    ]
    assert loaded.messages[1].tool_calls[0].arguments == {"expression": "2+2"}
    assert loaded.messages[2].tool_call_id == "call_1"
    assert loaded.messages[2].tool == "calculate"
    assert loaded.messages[5].interrupted is True
    assert all(x.created_at is not None for x in loaded.messages)
    assert loaded.created_at <= loaded.last_activity


async def test_korean_and_odd_text_survive(store: SessionStore) -> None:
    text = '서울 날씨 🌧 "quoted" \n new line \r\n \u2028 \x00 end'
    await store.append(SessionRef("", "k"), [m.user(text), m.assistant(text)])
    loaded = await store.load(SessionRef("", "k"))
    assert loaded is not None and loaded.messages[0].content == text


async def test_delete_removes_the_session(store: SessionStore) -> None:
    await store.append(SessionRef("", "gone"), a_turn("x"))
    assert await store.delete(SessionRef("", "gone")) is True
    assert await store.load(SessionRef("", "gone")) is None
    assert [s.id for s in await store.list()] == []


async def test_ids_that_extend_one_another_are_separate_sessions(store: SessionStore) -> None:
    # Ids may hold ':'; "x:log" once named the key of "x"'s messages in Redis.
    await store.append(SessionRef("", "x"), [m.user("of x"), m.assistant("hi")])
    await store.append(SessionRef("", "x:log"), [m.user("of x:log"), m.assistant("hi")])
    assert await store.delete(SessionRef("", "y")) is False
    await store.append(SessionRef("", "y:log"), [m.user("of y:log"), m.assistant("hi")])
    assert await store.delete(SessionRef("", "y")) is False
    for name in ("x", "x:log", "y:log"):
        loaded = await store.load(SessionRef("", name))
        assert loaded is not None
        assert [x.content for x in loaded.messages] == [f"of {name}", "hi"]


async def test_list_is_most_recent_first(store: SessionStore) -> None:
    for name in ("a", "b", "c"):
        await store.append(SessionRef("", name), [m.user(f"hello {name}"), m.assistant("hi")])
        await asyncio.sleep(0.01)
    await store.append(SessionRef("", "a"), [m.user("again"), m.assistant("hi")])
    summaries = await store.list(limit=2)
    assert [s.id for s in summaries] == ["a", "c"]
    assert summaries[0].title == "hello a"
    assert summaries[0].message_count == 4


async def test_concurrent_appends_to_different_sessions(store: SessionStore) -> None:
    await asyncio.gather(
        *(store.append(SessionRef("", f"p{i}"), a_turn(str(i))) for i in range(20))
    )
    for i in range(20):
        loaded = await store.load(SessionRef("", f"p{i}"))
        assert loaded is not None and loaded.messages[0].content == str(i)


async def test_ping(store: SessionStore) -> None:
    assert await store.ping() is True


async def test_owners_list_only_their_own_sessions(store: SessionStore) -> None:
    await store.append(SessionRef("", "open-1"), [m.user("anonymous"), m.assistant("hi")])
    await store.append(SessionRef("kA", "same-id"), [m.user("from A"), m.assistant("hi")])
    await store.append(SessionRef("kB", "same-id"), [m.user("from B"), m.assistant("hi")])
    assert [s.id for s in await store.list()] == ["open-1"]
    assert [(s.id, s.title) for s in await store.list(owner="kA")] == [("same-id", "from A")]
    assert [(s.id, s.title) for s in await store.list(owner="kB")] == [("same-id", "from B")]
    assert await store.delete(SessionRef("kA", "same-id")) is True
    assert await store.list(owner="kA") == []
    assert [s.title for s in await store.list(owner="kB")] == ["from B"]


async def test_concurrent_turns_in_one_session_are_all_stored(
    store: SessionStore,
) -> None:
    # Many turns at once, several per session: none may be lost or break another.
    sessions = [f"c{i}" for i in range(8)]
    await asyncio.gather(
        *(store.append(SessionRef("", sessions[i % 8]), a_turn(f"turn {i}")) for i in range(48))
    )
    for name in sessions:
        loaded = await store.load(SessionRef("", name))
        assert loaded is not None
        assert loaded.history_length == 12
        assert len(loaded.messages) == 24


async def test_a_write_with_an_older_fence_is_refused_and_changes_nothing(
    store: SessionStore,
) -> None:
    ref = SessionRef("", "fenced")
    await store.append(ref, [m.user("first"), m.assistant("one")], fence=10)
    with pytest.raises(Fenced) as refused:
        await store.append(ref, [m.user("stale"), m.assistant("two")], fence=9)
    assert refused.value.code == "RUN_LOST"
    loaded = await store.load(ref)
    assert loaded is not None
    assert [x.content for x in loaded.messages] == ["first", "one"]
    newer = await store.append(ref, [m.user("third"), m.assistant("three")], fence=11)
    assert newer.history_length == 4


async def test_a_fencing_token_writes_a_session_once(store: SessionStore) -> None:
    # The owner of a turn and whoever stores it for a dead owner name the same token:
    # whichever comes second is refused, so the turn is stored once.
    ref = SessionRef("", "once")
    await store.append(ref, [m.user("q"), m.assistant("the whole answer")], fence=1_000)
    with pytest.raises(Fenced):
        await store.append(ref, [m.user("q"), m.assistant("the wh", interrupted=True)], fence=1_000)
    loaded = await store.load(ref)
    assert loaded is not None and loaded.history_length == 2


async def test_a_write_without_a_fence_is_never_refused(store: SessionStore) -> None:
    ref = SessionRef("kA", "free")
    await store.append(ref, [m.user("a"), m.assistant("b")], fence=5)
    await store.append(ref, [m.user("c"), m.assistant("d")])
    # An unfenced write leaves the token as it was: an older one is still refused.
    with pytest.raises(Fenced):
        await store.append(ref, [m.user("e"), m.assistant("f")], fence=4)
    loaded = await store.load(ref)
    assert loaded is not None and loaded.history_length == 4


async def test_parked_runs_are_kept_and_forgotten(store: SessionStore) -> None:
    record = {"session": "s1", "pending": [{"id": "c1"}], "runIds": ["run_a"]}
    await store.park("run_a", record)
    assert await store.parked("run_a") == record
    await store.park("run_a", None)
    assert await store.parked("run_a") is None


async def test_postgresql_schema_is_made_once_and_a_newer_one_stops_start_up(
    postgres_url: str, postgres_instance: PostgresServer
) -> None:
    # Instances starting together: one makes the schema, the others find it made.
    stores = await asyncio.gather(*(open_store(postgres_url) for _ in range(3)))
    try:
        await stores[0].append(SessionRef("", "made"), [m.user("hi"), m.assistant("hello")])
        loaded = await stores[2].load(SessionRef("", "made"))
        assert loaded is not None and loaded.history_length == 2
    finally:
        for opened in stores:
            await opened.close()
    versions = postgres_instance.query("SELECT version FROM chatstream_schema")
    assert [r["version"] for r in versions] == [SCHEMA_VERSION]
    # A database that a newer chatstream migrated is not written by this one.
    postgres_instance.query("UPDATE chatstream_schema SET version = $1", SCHEMA_VERSION + 1)
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}"):
        await open_store(postgres_url)


async def test_a_sqlite_file_of_an_older_schema_is_migrated_with_its_sessions(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    with old:
        old.execute(
            "CREATE TABLE sessions (id TEXT PRIMARY KEY, created_at REAL NOT NULL, "
            "last_activity REAL NOT NULL, title TEXT NOT NULL DEFAULT '', "
            "message_count INTEGER NOT NULL DEFAULT 0)"
        )
        old.execute(
            "CREATE TABLE messages (session_id TEXT NOT NULL REFERENCES sessions(id) "
            "ON DELETE CASCADE, position INTEGER NOT NULL, body BLOB NOT NULL, "
            "PRIMARY KEY (session_id, position)) WITHOUT ROWID"
        )
        old.execute("INSERT INTO sessions VALUES ('kept', 1.0, 1.0, 'hi', 1)")
        old.execute("""INSERT INTO messages VALUES ('kept', 0, '{"role":"user","content":"hi"}')""")
        old.execute("PRAGMA user_version=2")
    old.close()
    store = await open_store(f"sqlite:///{path}")
    try:
        loaded = await store.load(SessionRef("", "kept"))
        assert loaded is not None and [x.content for x in loaded.messages] == ["hi"]
        written = await store.append(SessionRef("", "kept"), [m.assistant("hello")], fence=2)
        assert written.history_length == 2
        with pytest.raises(Fenced):
            await store.append(SessionRef("", "kept"), [m.assistant("again")], fence=1)
    finally:
        await store.close()
    reopened = sqlite3.connect(path)
    assert reopened.execute("PRAGMA user_version").fetchone()[0] == SQLITE_SCHEMA_VERSION
    reopened.close()


@pytest.mark.parametrize("kind", ["sqlite", "redis", "postgresql"])
async def test_a_session_stored_before_its_count_was_kept_is_counted(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # An older chatstream kept no count: the first read counts the session's messages,
    # and its next write keeps the count from then on.
    if kind == "sqlite":
        path = tmp_path / "old.db"
        url = f"sqlite:///{path}"
    else:
        url = request.getfixturevalue(f"{kind.removesuffix('ql')}_url")
    store = await open_store(url)
    ref = SessionRef("", "old")
    try:
        for i in range(5):
            await store.append(ref, a_turn(f"q{i}"))
        if kind == "sqlite":
            with sqlite3.connect(path) as db:
                db.execute("UPDATE sessions SET history_length = NULL")
        elif kind == "redis":
            client = Redis.from_url(url)
            await client.hdel("chatstream:session:old", "history_length")
            await client.aclose()
        else:
            postgres: PostgresServer = request.getfixturevalue("postgres_instance")
            postgres.query("UPDATE sessions SET history_length = NULL")
        end = await store.load(ref, last=3)
        assert end is not None and (end.start, end.history_length) == (17, 10)
        again = await store.append(ref, a_turn("q5"))
        assert again.history_length == 12
        end = await store.load(ref, last=3)
        assert end is not None and end.history_length == 12
    finally:
        await store.close()
