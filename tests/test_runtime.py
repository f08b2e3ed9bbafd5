"""Start-up and shutdown of what a server holds: driven directly, and the model's warm-up
through a live server (health and the first turn while the weights still load)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncGenerator, Sequence

import httpx
import pytest
from redis.asyncio import Redis

from chatstream.cluster import RedisCoordinator, RedisRunLog
from chatstream.config import Settings
from chatstream.errors import ModelError
from chatstream.messages import Message
from chatstream.models import ModelEvent, TextDelta, ToolSpec
from chatstream.prompts import SYSTEM_PROMPT
from chatstream.server.app import create_app
from chatstream.server.runtime import build_runtime
from chatstream.store.base import SessionRef
from chatstream.store.redis import RedisStore
from chatstream.tools import default_tools
from tests.support.server import live_server
from tests.support.sse import stream


class WarmingModel:
    """A model double that records its warm-ups and closes; ``fail`` makes warming fail.

    With ``loading`` set, the warm-up blocks a worker thread until it is set (as llama.cpp
    loading weights does); a request before the warm-up is over is recorded as such.
    """

    name = "warming"

    def __init__(self, *, fail: bool = False, loading: threading.Event | None = None) -> None:
        self.fail = fail
        self.loading = loading
        self.warmed: list[list[str]] = []
        self.prompts: list[str] = []
        self.ready = False
        self.early_requests = 0
        self.closed = 0

    async def warm_up(self, tools: Sequence[ToolSpec], *, system_prompt: str = "") -> None:
        self.warmed.append([tool.name for tool in tools])
        self.prompts.append(system_prompt)
        if self.loading is not None:
            await asyncio.to_thread(self.loading.wait, 30)
        if self.fail:
            raise ModelError("the weights are missing")
        self.ready = True

    async def stream(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec]
    ) -> AsyncGenerator[ModelEvent, None]:
        self.early_requests += not self.ready
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
        await runtime.warm_up.wait()
        assert runtime.warm_up.status == "ready"
        assert model.warmed == [[spec.name for spec in default_tools().specs()]]
        assert model.prompts == [SYSTEM_PROMPT]
        assert model.closed == 0
    assert len(model.warmed) == 1
    assert model.closed == 1
    # The prompt the server's conversations start with is the one read ahead.
    async with build_runtime(settings, model=model, system_prompt="You are a pirate.") as again:
        await again.warm_up.wait()
        assert model.prompts[-1] == "You are a pirate."
    assert any(r.getMessage().startswith("model warming ready in ") for r in caplog.records), (
        "the warm-up's time is logged"
    )


async def test_health_and_the_page_answer_while_the_model_warms_up_and_a_turn_waits(
    settings: Settings,
) -> None:
    loading = threading.Event()
    model = WarmingModel(loading=loading)
    with live_server(settings, lambda s: create_app(s, model=model)) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            health = await http.get("/api/health")
            assert health.status_code == 200
            assert health.json()["status"] == "ok"
            assert health.json()["warmUp"]["status"] == "warming up"
            assert (await http.get("/")).status_code == 200

            # The first turn waits for the warm-up instead of failing, or reaching the model.
            turn = asyncio.create_task(
                stream(http, "GET", "/api/chat/stream", params={"message": "hi"})
            )
            await asyncio.sleep(0.3)
            assert not turn.done()
            assert (await http.get("/api/health")).json()["warmUp"]["status"] == "warming up"
            loading.set()
            answered = await asyncio.wait_for(turn, 30)

            assert answered.types[-1] == "done"
            assert answered.text == "hello"
            assert model.early_requests == 0
            warm = (await http.get("/api/health")).json()["warmUp"]
            assert warm["status"] == "ready"
            assert "error" not in warm


async def test_a_failed_warm_up_shows_in_health_and_closes_what_was_opened(
    settings: Settings,
) -> None:
    model = WarmingModel(fail=True)
    before = sqlite_threads()
    with live_server(settings, lambda s: create_app(s, model=model)) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            server.call(server.runtime.warm_up.wait())
            health = await http.get("/api/health")
            assert health.status_code == 503
            assert health.json()["status"] == "degraded"
            assert health.json()["warmUp"] == {
                "status": "failed",
                "seconds": health.json()["warmUp"]["seconds"],
                "error": "the weights are missing",
            }
    assert model.closed == 1
    assert sqlite_threads() == before
