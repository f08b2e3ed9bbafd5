"""Run logs and their readers, directly: in memory, and shared between instances through Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from chatstream.cluster import RedisRunLog
from chatstream.config import Settings
from chatstream.events import Done, Token, decode_frame
from chatstream.runlog import Entry, Log, MemoryRunLog, Reader, RunLog
from chatstream.store.base import SessionRef

ALICE = SessionRef("k-alice", "s1")


def a_log() -> Log:
    return MemoryRunLog(ttl_s=60).create("run_1", ALICE)


async def test_entries_are_numbered_and_framed_once() -> None:
    log = a_log()
    first = log.append(Token("Hel"))
    second = log.append(Token("lo"))
    assert (first.seq, second.seq) == (1, 2)
    assert second.frame == b'id: run_1:2\nevent: token\ndata: {"content":"lo"}\n\n'
    assert decode_frame(second.frame) == second.event == Token("lo")
    assert log.last_seq == 2 and not log.ended


async def test_readers_are_cursors_that_read_at_their_own_pace() -> None:
    log = a_log()
    early = log.reader()
    for word in ("a", "b", "c"):
        log.append(Token(word))
    late = log.reader(after_seq=2)
    assert [e.seq for e in early.read()] == [1, 2, 3]
    assert [e.seq for e in late.read()] == [3]
    assert early.read() == [] and early.seq == 3
    log.end(log.next_entry(Done("s1", 2, "run_1")))
    assert not early.delivered
    assert [type(e.event) for e in early.read()] == [Done]
    assert early.delivered and early.read() == []


async def test_a_reader_waits_until_an_entry_or_the_end_arrives() -> None:
    log = a_log()
    reader = log.reader()
    waiting = asyncio.create_task(reader.wait())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    log.append(Token("x"))
    await asyncio.wait_for(waiting, 1)
    reader.read()
    waiting = asyncio.create_task(reader.wait())
    log.end(log.next_entry(Done("s1", 2, "run_1")))
    await asyncio.wait_for(waiting, 1)


async def test_the_log_says_when_its_last_counted_reader_leaves() -> None:
    log = a_log()
    idle: list[int] = []
    log.on_idle = lambda: idle.append(log.readers)
    mirror = log.reader(counted=False)
    one, two = log.reader(), log.reader()
    assert log.readers == 2
    one.close()
    one.close()  # twice is once
    assert idle == []
    two.close()
    assert idle == [0]
    mirror.close()  # an internal reader does not count
    assert idle == [0]


async def test_an_ended_log_expires_after_its_ttl_and_is_only_its_owners() -> None:
    logs = MemoryRunLog(ttl_s=0.05)
    log = logs.create("run_1", ALICE)
    assert await logs.open("run_1", 0, owner="k-mallory") is None
    assert await logs.open("run_1", 0, owner="k-alice") is log
    ending = await logs.finish(log, Done("s1", 2, "run_1"))
    assert ending.seq == 1 and log.entries == []  # the caller ends the local log itself
    log.end(ending)
    await asyncio.sleep(0.1)
    assert await logs.open("run_1", 0, owner="k-alice") is None


# -- the same contract, shared between two instances through Redis ------------------------


@pytest.fixture
async def two_instances(redis_url: str, settings: Settings) -> AsyncIterator[tuple[RunLog, RunLog]]:
    redis = Redis.from_url(redis_url)
    a, b = RedisRunLog(redis, settings), RedisRunLog(redis, settings)
    yield a, b
    await a.close()
    await b.close()
    await redis.aclose()


async def read_until(reader: Reader, last_seq: int) -> list[Entry]:
    """What the reader gets up to ``last_seq``, waiting for it as a stream would."""
    got: list[Entry] = []
    async with asyncio.timeout(5):
        while True:
            got += reader.read()
            if got and got[-1].seq >= last_seq:
                return got
            await reader.wait()


async def test_another_instance_follows_a_run_from_any_seq_to_its_end(
    two_instances: tuple[RunLog, RunLog], redis_url: str
) -> None:
    a, b = two_instances
    log = a.create("run_shared", ALICE)
    redis = Redis.from_url(redis_url)
    # B finds the run once A's claim wrote its record (the coordinator's part).
    await redis.hset(
        "chatstream:run:run_shared",
        mapping={"session": "s1", "key": ALICE.key, "owner_key": ALICE.owner, "state": "running"},
    )
    await redis.set(f"chatstream:lock:{ALICE.key}", "run_shared")
    await redis.aclose()
    for word in ("one", "two", "three"):
        log.append(Token(word))
    assert await b.open("run_shared", 0, owner="k-mallory") is None
    followed = await b.open("run_shared", 1, owner="k-alice")
    assert followed is not None
    reader = followed.reader(1)
    assert [e.event for e in await read_until(reader, 3)] == [Token("two"), Token("three")]
    ending = await a.finish(log, Done("s1", 2, "run_shared"))
    log.end(ending)
    assert [e.seq for e in await read_until(reader, 4)] == [4]
    assert reader.delivered
    reader.close()
