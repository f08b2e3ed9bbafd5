"""Start-up and shutdown of what a server holds, driven directly: no HTTP, no uvicorn."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncGenerator, Sequence

import pytest
from redis.asyncio import Redis

from chatstream.cluster import RedisCoordinator, RedisRunLog
from chatstream.config import Settings
from chatstream.errors import ModelError
from chatstream.messages import Message
from chatstream.models import ModelEvent, TextDelta, ToolSpec
from chatstream.prompts import SYSTEM_PROMPT
from chatstream.server.runtime import build_runtime
from chatstream.store.base import SessionRef
from chatstream.store.redis import RedisStore
from chatstream.tools import default_tools


class WarmingModel:
    """A model double that records its warm-ups and closes; ``fail`` makes warming fail."""

    name = "warming"

    def __init__(self, *, fail: bool = False) -> None:
        self.fail = fail
        self.warmed: list[list[str]] = []
        self.prompts: list[str] = []
        self.closed = 0

    async def warm_up(self, tools: Sequence[ToolSpec], *, system_prompt: str = "") -> None:
        self.warmed.append([tool.name for tool in tools])
        self.prompts.append(system_prompt)
        if self.fail:
            raise ModelError("the weights are missing")

    async def stream(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec]
    ) -> AsyncGenerator[ModelEvent, None]:
        yield TextDelta("hello")

    async def aclose(self) -> None:
        self.closed += 1


def sqlite_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("chatstream-sqlite")}


async def connections_to(redis_url: str) -> int:
    """How many clients Redis has, not counting the one that asks."""
    probe = Redis.from_url(redis_url)
    try:
        listed = await probe.client_list()
    finally:
        await probe.aclose()
    return len(listed) - 1


async def test_a_sqlite_runtime_serves_sessions_and_closes_its_store(settings: Settings) -> None:
    before = sqlite_threads()
    async with build_runtime(settings.with_(store="sqlite:///:memory:")) as runtime:
        assert runtime.store.name == "sqlite"
        assert runtime.model.name == "scripted"
        assert await runtime.store.list(limit=10) == []
        assert sqlite_threads() - before, "the store works in a thread of its own"
    # The store's worker thread is gone: nothing of the runtime outlives it.
    assert sqlite_threads() == before


async def test_one_redis_url_opens_one_client_for_store_and_cluster(
    settings: Settings, redis_url: str
) -> None:
    before = await connections_to(redis_url)
    async with build_runtime(settings.with_(store=redis_url)) as runtime:
        assert isinstance(runtime.store, RedisStore)
        run_log, coordinator = runtime.runs.log, runtime.runs.coordinator
        assert isinstance(run_log, RedisRunLog) and isinstance(coordinator, RedisCoordinator)
        # One client, hence one connection pool, under sessions and runs alike.
        clients = {id(runtime.store.redis), id(run_log.redis), id(coordinator.redis)}
        assert clients == {id(runtime.store.redis)}
        assert await runtime.store.list(limit=10) == []
        assert await coordinator.holder(SessionRef("", "nobody")) is None
        assert await connections_to(redis_url) > before
    # Closing hands every connection back: Redis sees none of ours left.
    assert await connections_to(redis_url) == before


async def test_the_model_is_warmed_up_once_with_the_tools_before_serving(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    model = WarmingModel()
    caplog.set_level(logging.INFO, logger="chatstream.server")
    async with build_runtime(settings, model=model) as runtime:
        assert runtime.model is model
        assert model.warmed == [[spec.name for spec in default_tools().specs()]]
        assert model.prompts == [SYSTEM_PROMPT]
        assert model.closed == 0
    assert len(model.warmed) == 1
    assert model.closed == 1
    # The prompt the server's conversations start with is the one read ahead.
    async with build_runtime(settings, model=model, system_prompt="You are a pirate."):
        assert model.prompts[-1] == "You are a pirate."
    assert any(r.getMessage().startswith("model warming ready in ") for r in caplog.records), (
        "the warm-up's time is logged"
    )


async def test_a_failed_warm_up_stops_start_up_and_closes_what_was_opened(
    settings: Settings,
) -> None:
    model = WarmingModel(fail=True)
    before = sqlite_threads()
    with pytest.raises(ModelError, match="weights are missing"):
        async with build_runtime(settings, model=model):
            pytest.fail("a runtime whose model cannot warm up is never handed out")
    assert model.closed == 1
    assert sqlite_threads() == before
