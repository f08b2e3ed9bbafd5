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
from chatstream.cluster import Cluster
from chatstream.config import Settings
from chatstream.errors import StoreError
from chatstream.events import Done, Token
from chatstream.models import resolve
from chatstream.runs import Run, RunManager, RunState
from chatstream.store.base import Session
from chatstream.store.sqlite import SQLiteStore
from chatstream.tools import default_tools


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def cluster(redis_url: str, settings: Settings) -> AsyncIterator[Cluster]:
    shared = Cluster.from_url(redis_url, settings)
    yield shared
    await shared.close()


async def test_a_retried_batch_skips_the_frames_redis_already_has(
    cluster: Cluster, redis: Redis
) -> None:
    run = Run("run_retried", "s1", max_events=100, resume_grace_s=5)
    for word in ("one ", "two ", "three "):
        run.append(Token(word))
    reader = run.follow()
    frames = run.read(reader)
    run.unfollow(reader)
    key = f"chatstream:run:{run.id}:log"
    # What a first attempt cut off by a connection failure can leave: its first two entries.
    for seq, frame in enumerate(frames[:2], start=1):
        await redis.xadd(key, {"t": b"token", "f": frame}, id=f"{seq}-0")

    cluster.attach(run)
    run.append(Token("four"))
    terminal = run.encode_next(Done(run.session_id, 2, run.id))
    started = time.monotonic()
    await cluster.finish(run, terminal, RunState.DONE)
    took = time.monotonic() - started
    run.append_frame(terminal)

    entries = await redis.xrange(key)
    reader = run.follow()
    assert [entry_id.decode() for entry_id, _ in entries] == [f"{n}-0" for n in range(1, 6)]
    assert [fields[b"f"] for _, fields in entries] == run.read(reader)
    # The mirror did not keep re-sending ids Redis refused until finish gave up (5 s).
    assert took < 2


async def test_a_turn_that_fails_to_start_frees_its_session_at_once(
    cluster: Cluster,
    redis: Redis,
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = await SQLiteStore.open(tmp_path / "chat.db")
    load = store.load

    async def down_once(session_id: str) -> Session | None:
        monkeypatch.setattr(store, "load", load)  # the outage is over after this call
        raise StoreError("the store is down")

    monkeypatch.setattr(store, "load", down_once)
    runs = RunManager(
        agent=Agent(resolve("scripted"), default_tools()),
        store=store,
        settings=settings,
        cluster=cluster,
    )
    try:
        with pytest.raises(StoreError) as refused:
            await runs.start("s-free", "hello")
        assert refused.value.code == "STORE_UNAVAILABLE"
        assert await redis.get("chatstream:lock:s-free") is None

        # The next turn starts now rather than getting SESSION_BUSY until the lock expires.
        run = await runs.start("s-free", "hello")
        await run.wait_finished()
        assert run.state is RunState.DONE
    finally:
        await runs.close()
        await store.close()
