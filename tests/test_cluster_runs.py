"""The Redis side of a run inside one process, against a real redis-server.

``test_cluster.py`` drives two server processes; these tests reach the failure paths
that are hard to time from outside: a retried mirror batch and a turn that claimed its
session but could not start.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from chatstream.agent import Agent
from chatstream.cluster import RedisCoordinator, RedisRunLog, shared_runs
from chatstream.config import Settings
from chatstream.errors import StoreError
from chatstream.events import Done, Token
from chatstream.models import resolve
from chatstream.runlog import entry
from chatstream.runs import RunManager, RunState
from chatstream.store.base import Session, SessionRef
from chatstream.store.sqlite import SQLiteStore
from chatstream.tools import default_tools


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def shared(
    redis: Redis, settings: Settings
) -> AsyncIterator[tuple[RedisRunLog, RedisCoordinator]]:
    run_log, coordinator = shared_runs(redis, settings)
    yield run_log, coordinator
    await coordinator.close()
    await run_log.close()


async def test_a_retried_batch_skips_the_frames_redis_already_has(
    shared: tuple[RedisRunLog, RedisCoordinator], redis: Redis
) -> None:
    run_log, _ = shared
    key = "chatstream:run:run_retried:log"
    words = ("one ", "two ", "three ", "four")
    # What a first attempt cut off by a connection failure can leave: its first two entries.
    for seq, word in enumerate(words[:2], start=1):
        frame = entry("run_retried", seq, Token(word)).frame
        await redis.xadd(key, {"t": b"token", "f": frame}, id=f"{seq}-0")
    log = run_log.create("run_retried", SessionRef("", "s1"))
    for word in words:
        log.append(Token(word))
    started = time.monotonic()
    ending = await run_log.finish(log, Done("s1", 2, "run_retried"))
    took = time.monotonic() - started
    log.end(ending)

    entries = await redis.xrange(key)
    assert [entry_id.decode() for entry_id, _ in entries] == [f"{n}-0" for n in range(1, 6)]
    assert [fields[b"f"] for _, fields in entries] == [e.frame for e in log.entries]
    # The mirror did not keep re-sending ids Redis refused until finish gave up (5 s).
    assert took < 2


async def test_a_turn_that_fails_to_start_frees_its_session_at_once(
    shared: tuple[RedisRunLog, RedisCoordinator],
    redis: Redis,
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = await SQLiteStore.open(tmp_path / "chat.db")
    load = store.load

    async def down_once(ref: SessionRef, *, last: int | None = None) -> Session | None:
        monkeypatch.setattr(store, "load", load)  # the outage is over after this call
        raise StoreError("the store is down")

    monkeypatch.setattr(store, "load", down_once)
    run_log, coordinator = shared
    runs = RunManager(
        agent=Agent(resolve("scripted"), default_tools()),
        store=store,
        settings=settings,
        log=run_log,
        coordinator=coordinator,
    )
    try:
        with pytest.raises(StoreError) as refused:
            await runs.start(SessionRef("", "s-free"), "hello")
        assert refused.value.code == "STORE_UNAVAILABLE"
        assert await redis.get("chatstream:lock:s-free") is None

        # The next turn starts now rather than getting SESSION_BUSY until the lock expires.
        run = await runs.start(SessionRef("", "s-free"), "hello")
        await run.wait_finished()
        assert run.state is RunState.DONE
    finally:
        await runs.close()
        await store.close()
