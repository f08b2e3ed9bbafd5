"""A Redis that stalls, restarts or is cut off mid-turn loses neither a session's lock nor a turn.

Each test that breaks Redis breaks a redis-server of its own, so the rest of the suite
never sees the outage. Two ``live_server`` on one Redis are two instances; the lock TTL
is 1 s so that outages "longer than the lock TTL" take a second or two.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from chatstream.cluster import RedisCoordinator, RedisRunLog
from chatstream.config import Settings
from chatstream.coordinator import Message
from chatstream.errors import StoreError
from chatstream.store.base import SessionRef
from chatstream.store.redis import RedisStore, connect
from tests.support.redis import RedisServer, own_redis_server, redis_link
from tests.support.server import free_port, live_server
from tests.support.sse import Streamed, stream


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server for this test alone, to freeze or restart."""
    with own_redis_server(tmp_path / "redis") as server:
        yield server


def instance(settings: Settings, store: str) -> Settings:
    """One instance's settings: tokens every 20 ms, a lock that expires after 1 s."""
    return settings.with_(model="scripted:20", store=store, lock_ttl_s=1.0)


async def eventually(check: Callable[[], Awaitable[bool]], *, within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not await check():
        assert time.monotonic() < deadline, "the condition never came true"
        await asyncio.sleep(0.05)


def seqs(result: Streamed) -> list[int]:
    return [int(event_id.rsplit(":", 1)[1]) for event_id in result.ids]


async def test_a_redis_stall_past_the_lock_ttl_keeps_the_session_busy_until_the_turn_ends(
    own_redis: RedisServer, settings: Settings
) -> None:
    shared = instance(settings, own_redis.url)
    with live_server(shared) as a, live_server(shared) as b:
        async with httpx.AsyncClient(timeout=30) as http:
            params = {"message": "count to 250", "sessionId": "stalled"}
            running = asyncio.create_task(
                stream(http, "GET", f"{a.url}/api/chat/stream", params=params)
            )
            await asyncio.sleep(0.5)
            own_redis.pause()
            await asyncio.sleep(2.0)  # twice the lock TTL: the lock's expiry passes
            own_redis.resume()

            refused = await http.get(
                f"{b.url}/api/chat/stream", params={"message": "hi", "sessionId": "stalled"}
            )
            assert refused.status_code == 409
            assert refused.json()["error"]["code"] == "SESSION_BUSY"

            result = await asyncio.wait_for(running, 20)
            assert result.types[-1] == "done"
            assert result.text == " ".join(str(i) for i in range(1, 251))
            session = (await http.get(f"{b.url}/api/chat/sessions/stalled")).json()
            assert session["historyLength"] == 2
            assert session["messages"][-1]["content"] == result.text


async def test_a_redis_restart_mid_turn_keeps_the_lock_and_stores_the_turn(
    own_redis: RedisServer, settings: Settings
) -> None:
    shared = instance(settings, own_redis.url)
    async with Redis.from_url(own_redis.url) as redis:
        with live_server(shared) as a, live_server(shared) as b:
            async with httpx.AsyncClient(timeout=30) as http:
                params = {"message": "count to 200", "sessionId": "restarted"}
                running = asyncio.create_task(
                    stream(http, "GET", f"{a.url}/api/chat/stream", params=params)
                )
                await asyncio.sleep(0.3)
                session = (await http.get(f"{b.url}/api/chat/sessions/restarted")).json()
                run_id = session["activeRunId"]
                # A reader on the other instance, from the first event on.
                follower = asyncio.create_task(
                    stream(
                        http,
                        "GET",
                        f"{b.url}/api/chat/stream",
                        headers={"Last-Event-ID": f"{run_id}:0"},
                    )
                )
                await asyncio.sleep(0.3)
                own_redis.restart()  # every key is gone, the lock with them

                async def locked() -> bool:
                    return await redis.get("chatstream:lock:restarted") == run_id.encode()

                await eventually(locked, within_s=3)
                refused = await http.get(
                    f"{b.url}/api/chat/stream", params={"message": "hi", "sessionId": "restarted"}
                )
                assert refused.status_code == 409

                result = await asyncio.wait_for(running, 20)
                assert result.types[-1] == "done"
                text = " ".join(str(i) for i in range(1, 201))
                assert result.text == text
                # The reader on B saw the same turn, every event once, in order.
                followed = await asyncio.wait_for(follower, 10)
                assert followed.types[-1] == "done"
                assert seqs(followed) == list(range(1, len(followed.frames) + 1))
                assert followed.text == text
                session = (await http.get(f"{b.url}/api/chat/sessions/restarted")).json()
                assert session["historyLength"] == 2
                assert session["messages"][-1]["content"] == text
                status = (await http.get(f"{b.url}/api/chat/runs/{run_id}")).json()
                assert status["state"] == "done"


async def test_a_turn_that_ends_while_redis_is_down_is_stored_once_it_is_back(
    own_redis: RedisServer, settings: Settings
) -> None:
    with live_server(instance(settings, own_redis.url)) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
            params = {"message": "count to 40", "sessionId": "down"}
            running = asyncio.create_task(stream(http, "GET", "/api/chat/stream", params=params))
            await asyncio.sleep(0.4)
            own_redis.stop()
            await asyncio.sleep(1.5)  # the turn's last token came meanwhile
            own_redis.start()
            result = await asyncio.wait_for(running, 20)
            assert result.types[-1] == "done"
            assert result.data[-1]["historyLength"] == 2
            session = (await http.get("/api/chat/sessions/down")).json()
            assert [m["content"] for m in session["messages"]] == ["count to 40", result.text]


async def _lose_the_lock_to_another_instance(
    redis_url: str, settings: Settings
) -> tuple[Streamed, Streamed, dict[str, object]]:
    """A runs a turn; cut off from Redis past the lock TTL, B starts a turn in the session."""
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    async with redis_link(port) as link:
        with (
            live_server(instance(settings, link.url)) as a,
            live_server(instance(settings, redis_url)) as b,
        ):
            async with httpx.AsyncClient(timeout=30) as http:
                params = {"message": "count to 400", "sessionId": "taken"}
                running = asyncio.create_task(
                    stream(http, "GET", f"{a.url}/api/chat/stream", params=params)
                )
                await asyncio.sleep(0.5)
                link.sever()
                await asyncio.sleep(1.8)  # A's lock expires
                newer = asyncio.create_task(
                    stream(
                        http,
                        "GET",
                        f"{b.url}/api/chat/stream",
                        params={"message": "count to 120", "sessionId": "taken"},
                    )
                )
                await asyncio.sleep(0.3)
                link.restore()
                lost = await asyncio.wait_for(running, 20)
                taken = await asyncio.wait_for(newer, 20)
                session = (await http.get(f"{b.url}/api/chat/sessions/taken")).json()
    return lost, taken, session


async def test_an_owner_cut_off_while_another_instance_took_its_session_ends_with_run_lost(
    redis_url: str, settings: Settings
) -> None:
    lost, taken, _ = await _lose_the_lock_to_another_instance(redis_url, settings)
    assert lost.response.status_code == 200
    assert lost.types[-1] == "error"
    assert lost.data[-1]["code"] == "RUN_LOST"
    # It stopped as soon as it learnt: long before its 400 tokens were out.
    assert len(lost.of("token")) < 300
    assert taken.response.status_code == 200
    assert taken.types[-1] == "done"
    assert taken.text == " ".join(str(i) for i in range(1, 121))


async def test_an_owner_that_lost_its_session_does_not_store_its_turn_in_it(
    redis_url: str, settings: Settings
) -> None:
    _, taken, session = await _lose_the_lock_to_another_instance(redis_url, settings)
    assert taken.data[-1]["historyLength"] == 2
    assert session["historyLength"] == 2
    assert session["messages"][-1]["content"] == taken.text


async def test_store_and_cluster_errors_name_no_host_port_or_driver_message(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()  # nothing listens there
    url = f"redis://127.0.0.1:{port}/0"
    store = await RedisStore.open(url, outage_s=0.2)
    client = connect(url)
    coordinator = RedisCoordinator(client, settings)
    run_log = RedisRunLog(client, settings)
    run_id, session = "run_0000000000000001", SessionRef("", "s1")
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "load": lambda: store.load(SessionRef("", "s1")),
        "append": lambda: store.append(SessionRef("", "s1"), ()),
        "delete": lambda: store.delete(SessionRef("", "s1")),
        "list": lambda: store.list(),
        "claim": lambda: coordinator.claim(run_id, session),
        "holder": lambda: coordinator.holder(session),
        "status": lambda: coordinator.status(run_id),
        "cancel": lambda: coordinator.send(run_id, Message.CANCEL),
        "open": lambda: run_log.open(run_id, 0, owner=""),
    }
    caplog.set_level(logging.WARNING)
    try:
        for name, call in calls.items():
            with pytest.raises(StoreError) as failed:
                await call()
            assert failed.value.message == "The session store is unavailable.", name
            assert str(port) not in str(failed.value), name
    finally:
        await coordinator.close()
        await run_log.close()
        await client.aclose()
        await store.close()
    # What failed, and where, is for the operator: in the log.
    assert f"127.0.0.1:{port}" in caplog.text


async def test_health_says_degraded_while_the_runs_redis_is_down(
    own_redis: RedisServer, settings: Settings
) -> None:
    # Sessions in SQLite, runs on a Redis of their own: without that Redis no turn starts,
    # so health must not say ok while it is down.
    with live_server(settings.with_(runs=own_redis.url)) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=10) as http:
            up = await http.get("/api/health")
            assert (up.status_code, up.json()["runs"]) == (200, {"shared": True, "ok": True})
            own_redis.stop()
            try:
                down = await http.get("/api/health")
                assert down.status_code == 503
                assert down.json()["status"] == "degraded"
                assert down.json()["runs"]["ok"] is False
                assert down.json()["store"]["ok"] is True
            finally:
                own_redis.start()
            await eventually(lambda: _health_ok(http), within_s=10)


async def _health_ok(http: httpx.AsyncClient) -> bool:
    return (await http.get("/api/health")).status_code == 200
