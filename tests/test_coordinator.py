"""The coordinator's contract, held by the in-memory one and the Redis one alike."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from chatstream.cluster import RedisCoordinator
from chatstream.config import Settings
from chatstream.coordinator import Coordinator, MemoryCoordinator, Message, RunState, RunStatus
from chatstream.store.base import SessionRef

SESSION = SessionRef("k-alice", "s1")


@pytest.fixture(params=["memory", "redis"])
async def coordinator(
    request: pytest.FixtureRequest, settings: Settings
) -> AsyncIterator[Coordinator]:
    if request.param == "memory":
        memory = MemoryCoordinator(ttl_s=60)
        yield memory
        await memory.close()
        return
    redis = Redis.from_url(request.getfixturevalue("redis_url"))
    shared = RedisCoordinator(redis, settings.with_(lock_ttl_s=1.0))
    yield shared
    await shared.close()
    await redis.aclose()


async def test_a_session_takes_one_run_at_a_time(coordinator: Coordinator) -> None:
    assert await coordinator.claim("run_a", SESSION) is None
    assert await coordinator.claim("run_b", SESSION) == "run_a"
    assert await coordinator.claim("run_b", SessionRef("k-bob", "s1")) is None  # another key's
    assert await coordinator.holder(SESSION) == "run_a"
    running = await coordinator.status("run_a")
    assert running == RunStatus("run_a", SESSION, RunState.RUNNING, 0)

    await coordinator.release(RunStatus("run_a", SESSION, RunState.DONE, 7))
    assert await coordinator.holder(SESSION) is None
    assert await coordinator.status("run_a") == RunStatus("run_a", SESSION, RunState.DONE, 7)
    assert await coordinator.claim("run_b", SESSION) is None
    assert await coordinator.status("run_nobody") is None


async def test_a_release_frees_only_the_run_that_holds_the_session(
    coordinator: Coordinator,
) -> None:
    assert await coordinator.claim("run_a", SESSION) is None
    await coordinator.release(RunStatus("run_stale", SESSION, RunState.FAILED))
    assert await coordinator.holder(SESSION) == "run_a"


async def test_a_message_reaches_the_instance_that_listens(coordinator: Coordinator) -> None:
    heard: asyncio.Queue[tuple[str, Message]] = asyncio.Queue()
    coordinator.listen(lambda run_id, message: heard.put_nowait((run_id, message)))
    await asyncio.sleep(0.2)  # Redis: the subscription is in place
    await coordinator.send("run_a", Message.CANCEL)
    assert await asyncio.wait_for(heard.get(), 5) == ("run_a", Message.CANCEL)


async def test_a_kept_claim_outlives_its_lock_ttl(coordinator: Coordinator) -> None:
    lost: list[str] = []
    assert await coordinator.claim("run_a", SESSION) is None
    coordinator.keep("run_a", SESSION, on_lost=lambda: lost.append("run_a"))
    await asyncio.sleep(1.5)  # past the Redis lock's 1 s TTL
    assert await coordinator.holder(SESSION) == "run_a"
    assert lost == []
    await coordinator.release(RunStatus("run_a", SESSION, RunState.DONE, 1))
