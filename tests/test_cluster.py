"""Two server processes on one Redis behave as one server."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support.process import ServerProcess, server_process
from tests.support.redis import RedisServer
from tests.support.sse import stream

ENV = {
    "CHATSTREAM_LOCK_TTL_S": "1",
    "CHATSTREAM_WEATHER_GEOCODING_URL": "http://127.0.0.1:9/v1/search",
    "CHATSTREAM_WEATHER_FORECAST_URL": "http://127.0.0.1:9/v1/forecast",
}


@pytest.fixture
def pair(redis_url: str) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    args = ("--model", "scripted:20", "--store", redis_url)
    with server_process(*args, env=ENV) as a, server_process(*args, env=ENV) as b:
        yield a, b


def seq(event_id: str | None) -> int:
    assert event_id is not None
    return int(event_id.rsplit(":", 1)[1])


async def test_a_run_started_on_a_resumes_on_b(pair: tuple[ServerProcess, ServerProcess]) -> None:
    a, b = pair
    async with httpx.AsyncClient(timeout=30) as http:
        params = {"message": "count to 80", "sessionId": "shared-1"}
        first = await stream(http, "GET", f"{a.url}/api/chat/stream", params=params, max_events=7)
        rest = await stream(
            http,
            "GET",
            f"{b.url}/api/chat/stream",
            params=params,
            headers={"Last-Event-ID": first.frames[6].id or ""},
        )
        frames = first.frames[:7] + rest.frames
        assert [seq(f.id) for f in frames] == list(range(1, len(frames) + 1))
        text = "".join(e.content for e in (first.events[:7] + rest.events) if e.type == "token")
        assert text == " ".join(str(i) for i in range(1, 81))
        assert rest.types[-1] == "done"
        # The session written through A is read through B.
        session = (await http.get(f"{b.url}/api/chat/sessions/shared-1")).json()
        assert session["historyLength"] == 2
        assert session["messages"][-1]["content"] == text
        # And the run, once delivered, answers 204 on either instance.
        last = rest.frames[-1].id or ""
        for url in (a.url, b.url):
            again = await http.get(f"{url}/api/chat/stream", headers={"Last-Event-ID": last})
            assert again.status_code == 204


async def test_a_busy_session_on_a_refuses_a_turn_on_b(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = pair
    async with httpx.AsyncClient(timeout=30) as http:
        params = {"message": "count to 60", "sessionId": "busy-x"}
        running = asyncio.create_task(
            stream(http, "GET", f"{a.url}/api/chat/stream", params=params)
        )
        await asyncio.sleep(0.4)
        refused = await http.get(f"{b.url}/api/chat/stream", params=params)
        assert refused.status_code == 409
        assert refused.json()["error"]["code"] == "SESSION_BUSY"
        session = (await http.get(f"{b.url}/api/chat/sessions/busy-x")).json()
        assert session["activeRunId"]
        finished = await running
        assert finished.types[-1] == "done"
        # Free again everywhere the moment `done` arrived.
        after = await stream(
            http, "GET", f"{b.url}/api/chat/stream", params={"message": "hi", "sessionId": "busy-x"}
        )
        assert after.data[-1]["historyLength"] == 4


async def test_the_run_status_on_b_counts_the_events_a_has_logged(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = pair
    async with httpx.AsyncClient(timeout=30) as http:
        params = {"message": "count to 300", "sessionId": "seq-x"}
        first = await stream(http, "GET", f"{a.url}/api/chat/stream", params=params, max_events=40)
        run_id = (first.frames[0].id or "").rsplit(":", 1)[0]
        await asyncio.sleep(0.3)  # the mirror has caught up
        status = (await http.get(f"{b.url}/api/chat/runs/{run_id}")).json()
        assert status["state"] == "running"
        assert status["lastSeq"] >= 40
        on_a = (await http.get(f"{a.url}/api/chat/runs/{run_id}")).json()
        assert on_a["lastSeq"] - status["lastSeq"] < 30  # behind by one batch at most
        # Redis keeps the run's parts under keys that extend its id: none of them is a run.
        for part in (f"{run_id}:log", f"{run_id}:approvals"):
            for response in (
                await http.get(f"{b.url}/api/chat/runs/{part}"),
                await http.post(f"{b.url}/api/chat/runs/{part}/cancel"),
            ):
                assert response.status_code == 404, response.text
                assert response.json()["error"]["code"] == "RUN_NOT_FOUND"
        await http.post(f"{a.url}/api/chat/runs/{run_id}/cancel")


async def test_cancel_on_b_stops_a_run_on_a(pair: tuple[ServerProcess, ServerProcess]) -> None:
    a, b = pair
    async with httpx.AsyncClient(timeout=30) as http:
        params = {"message": "count to 5000", "sessionId": "stop-x"}
        running = asyncio.create_task(
            stream(http, "GET", f"{a.url}/api/chat/stream", params=params)
        )
        await asyncio.sleep(0.4)
        run_id = (await http.get(f"{b.url}/api/chat/sessions/stop-x")).json()["activeRunId"]
        response = await http.post(f"{b.url}/api/chat/runs/{run_id}/cancel")
        assert response.status_code == 200
        assert response.json()["cancelled"] is True
        assert response.json()["state"] == "cancelled"
        result = await asyncio.wait_for(running, 5)
        assert result.data[-1]["code"] == "CANCELLED"
        session = (await http.get(f"{b.url}/api/chat/sessions/stop-x")).json()
        assert session["messages"][-1]["interrupted"] is True
        unknown = await http.post(f"{b.url}/api/chat/runs/run_00000000deadbeef/cancel")
        assert unknown.status_code == 404


async def test_kill_9_of_a_gives_run_lost_on_b(redis_url: str) -> None:
    args = ("--model", "scripted:20", "--store", redis_url)
    with server_process(*args, env=ENV) as a, server_process(*args, env=ENV) as b:
        async with httpx.AsyncClient(timeout=30) as http:
            params = {"message": "count to 5000", "sessionId": "lost-x"}
            first = await stream(
                http, "GET", f"{a.url}/api/chat/stream", params=params, max_events=5
            )
            follower = asyncio.create_task(
                stream(
                    http,
                    "GET",
                    f"{b.url}/api/chat/stream",
                    headers={"Last-Event-ID": first.frames[-1].id or ""},
                )
            )
            await asyncio.sleep(0.3)
            a.process.send_signal(signal.SIGKILL)
            started = time.monotonic()
            result = await asyncio.wait_for(follower, 10)
            # The lock expires within CHATSTREAM_LOCK_TTL_S (1 s); the follower notices soon after.
            assert time.monotonic() - started < 4
            assert result.types[-1] == "error"
            assert result.data[-1]["code"] == "RUN_LOST"
            assert [seq(f.id) for f in result.frames] == list(range(6, 6 + len(result.frames)))
            # The session holds the lost turn as far as it was delivered (B stored it when it
            # declared the run lost), and B takes new turns.
            session = (await http.get(f"{b.url}/api/chat/sessions/lost-x")).json()
            assert [m["role"] for m in session["messages"]] == ["user", "assistant"]
            assert session["messages"][-1]["interrupted"] is True
            after = await stream(
                http,
                "GET",
                f"{b.url}/api/chat/stream",
                params={"message": "hi", "sessionId": "lost-x"},
            )
            assert after.data[-1]["historyLength"] == 4


async def test_redis_down_is_reported_refused_and_recovered(
    redis_instance: RedisServer, redis_url: str
) -> None:
    if redis_instance.process is None:
        pytest.fail(
            "this test stops Redis, so it needs the Redis the suite starts (unset REDIS_URL)"
        )
    args = ("--model", "scripted", "--store", redis_url)
    with server_process(*args, env=ENV) as a:
        async with httpx.AsyncClient(base_url=a.url, timeout=30) as http:
            assert (await http.get("/api/health")).status_code == 200
            redis_instance.stop()
            try:
                started = time.monotonic()
                health = await http.get("/api/health")
                assert health.status_code == 503
                assert health.json()["store"]["ok"] is False
                refused = await http.get("/api/chat/stream", params={"message": "hi"})
                assert refused.status_code == 503
                assert refused.json()["error"]["code"] == "STORE_UNAVAILABLE"
                assert time.monotonic() - started < 10  # nothing hangs
            finally:
                redis_instance.start()
            for _ in range(100):
                if (await http.get("/api/health")).status_code == 200:
                    break
                await asyncio.sleep(0.1)
            result = await stream(http, "GET", "/api/chat/stream", params={"message": "hi"})
            assert result.types[-1] == "done"


async def test_the_frontends_protocols_resume_a_run_of_a_on_b(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = pair
    ui_body = {
        "id": "shared-ui",
        "trigger": "submit-message",
        "messages": [
            {"id": "m1", "role": "user", "parts": [{"type": "text", "text": "count to 60"}]}
        ],
    }
    async with httpx.AsyncClient(timeout=30) as http:
        # The Vercel AI SDK's reconnect on B replays A's run from its start and follows it.
        async with http.stream("POST", f"{a.url}/api/ui/chat", json=ui_body) as started:
            lines = started.aiter_lines()
            async for line in lines:
                if '"text-delta"' in line:
                    break
            again = await http.get(f"{b.url}/api/ui/chat/shared-ui/stream")
        assert again.status_code == 200
        chunks = [line[6:] for line in again.text.splitlines() if line.startswith("data: ")]
        assert chunks[-1] == "[DONE]"
        deltas = [json.loads(c)["delta"] for c in chunks[:-1] if '"text-delta"' in c]
        assert "".join(deltas) == " ".join(str(i) for i in range(1, 61))
        # AG-UI on B replays, by its run id, a run that AG-UI started on A.
        agui_body = {
            "threadId": "shared-agui",
            "runId": "client-1",
            "messages": [{"id": "m1", "role": "user", "content": "count to 40"}],
            "tools": [],
            "state": {},
            "context": [],
            "forwardedProps": {},
        }
        async with http.stream("POST", f"{a.url}/api/agui", json=agui_body) as started:
            async for line in started.aiter_lines():
                if '"RUN_STARTED"' in line:
                    run_id = json.loads(line[6:])["runId"]
                    break
        replay = await http.post(f"{b.url}/api/agui", json={**agui_body, "runId": run_id})
        events = [json.loads(x[6:]) for x in replay.text.splitlines() if x.startswith("data: ")]
        assert events[0]["type"] == "RUN_STARTED" and events[-1]["type"] == "RUN_FINISHED"
        text = "".join(e["delta"] for e in events if e["type"] == "TEXT_MESSAGE_CONTENT")
        assert text == " ".join(str(i) for i in range(1, 41))
