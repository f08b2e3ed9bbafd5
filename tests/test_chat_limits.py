"""A turn without streaming (``POST /api/chat``) is held to the same limits as a stream."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from chatstream.config import Settings
from tests.support.process import server_process
from tests.support.server import live_server
from tests.support.sse import stream


async def test_non_streaming_turns_count_against_the_stream_limits(settings: Settings) -> None:
    limited = settings.with_(model="scripted:20", max_streams_per_key=2, turns_per_minute=0)
    with live_server(limited) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
            calls = [
                http.post("/api/chat", json={"message": "count to 20", "sessionId": f"c{i}"})
                for i in range(15)
            ]
            responses = await asyncio.gather(*calls)
            statuses = sorted(r.status_code for r in responses)
            assert statuses == [200] * 2 + [429] * 13
            refused = [r for r in responses if r.status_code == 429]
            assert {r.json()["error"]["code"] for r in refused} == {"TOO_MANY_STREAMS"}
            # A stream and a non-streaming turn share the caller's slots.
            running = asyncio.create_task(
                stream(http, "GET", "/api/chat/stream", params={"message": "count to 20"})
            )
            await asyncio.sleep(0.1)
            one = asyncio.create_task(http.post("/api/chat", json={"message": "count to 10"}))
            await asyncio.sleep(0.1)
            third = await http.post("/api/chat", json={"message": "hi"})
            assert third.status_code == 429
            assert (await one).status_code == 200
            assert (await running).types[-1] == "done"
            # The slots come back once the answers are given.
            assert (await http.post("/api/chat", json={"message": "hi"})).status_code == 200


async def test_non_streaming_turns_count_against_the_server_total(settings: Settings) -> None:
    with live_server(settings.with_(model="scripted:20", max_streams_total=1)) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
            first = asyncio.create_task(http.post("/api/chat", json={"message": "count to 15"}))
            await asyncio.sleep(0.1)
            second = await http.post("/api/chat", json={"message": "hi"})
            assert second.status_code == 503
            assert second.json()["error"]["code"] == "SERVER_BUSY"
            assert (await first).status_code == 200


async def test_a_caller_that_hangs_up_leaves_the_turn_to_the_grace_period(
    settings: Settings,
) -> None:
    with live_server(settings.with_(model="scripted:20", resume_grace_s=0.3)) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
            body = {"message": "count to 1000", "sessionId": "hung-up"}
            call = asyncio.create_task(http.post("/api/chat", json=body))
            await asyncio.sleep(0.5)
            call.cancel()  # the caller closes its connection mid-turn
            started = time.monotonic()
            while True:
                session = await http.get("/api/chat/sessions/hung-up")
                if session.status_code == 200 and "activeRunId" not in session.json():
                    break
                assert time.monotonic() - started < 5, "the abandoned turn kept running"
                await asyncio.sleep(0.05)
            # 1,000 tokens at 20 ms take 20 s; the turn ended soon after the grace period.
            answer = session.json()["messages"][-1]
            assert answer["role"] == "assistant" and answer["interrupted"] is True
            assert answer["content"].startswith("1 2 3")
            # The session is free for the next turn, and the slot was given back.
            again = await http.post("/api/chat", json={"message": "hi", "sessionId": "hung-up"})
            assert again.status_code == 200
            assert again.json()["historyLength"] == 4


async def test_run_state_says_whether_it_was_cancelled(settings: Settings) -> None:
    with live_server(settings) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
            done = (await http.post("/api/chat", json={"message": "hi"})).json()
            state = (await http.get(f"/api/chat/runs/{done['runId']}")).json()
            assert state["state"] == "done" and state["cancelled"] is False


@pytest.mark.parametrize(("trusted", "second"), [("127.0.0.1", 200), ("10.9.9.9", 429)])
def test_limits_count_the_forwarded_address_only_from_a_trusted_proxy(
    trusted: str, second: int
) -> None:
    """Behind a proxy the per-address limits count X-Forwarded-For, if the proxy is trusted."""
    env = {"CHATSTREAM_TURNS_PER_MINUTE": "1", "CHATSTREAM_STORE": "sqlite:///:memory:"}
    args = ("--model", "scripted", "--forwarded-allow-ips", trusted)
    with server_process(*args, env=env) as server:
        statuses = [
            httpx.post(
                f"{server.url}/api/chat",
                json={"message": "hi"},
                headers={"X-Forwarded-For": address},
                timeout=30,
            ).status_code
            for address in ("203.0.113.1", "203.0.113.2")
        ]
    # Trusted: two addresses, one turn each. Not trusted: both are the proxy's one address.
    assert statuses == [200, second]
