"""One test suite for every session store: SQLite and Redis behave the same."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chatstream import messages as m
from chatstream.messages import ToolCallRequest
from chatstream.store import SessionStore, open_store
from chatstream.store.base import SessionRef


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SessionStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'sessions.db'}"
    else:
        url = request.getfixturevalue("redis_url")
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
