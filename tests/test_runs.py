"""Runs outlive connections: resume, stop, grace period, heartbeats, bounded logs, expiry."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from chatstream.config import Settings
from chatstream.errors import StoreError
from chatstream.store.base import SessionRef
from tests.support.proxy import cutting_proxy
from tests.support.server import LiveServer, live_server
from tests.support.sse import stream

COUNT = 60
EXPECTED = " ".join(str(i) for i in range(1, COUNT + 1))


@pytest.fixture
def slow_settings(settings: Settings) -> Settings:
    """A model that takes about a second and a half to count to 60."""
    return settings.with_(model="scripted:25")


@pytest.fixture
def slow_server(slow_settings: Settings) -> AsyncIterator[LiveServer]:
    with live_server(slow_settings) as live:
        yield live


def seq(event_id: str | None) -> int:
    assert event_id is not None
    return int(event_id.rsplit(":", 1)[1])


async def test_resume_after_a_dropped_connection_has_no_gap_and_no_duplicate(
    slow_server: LiveServer,
) -> None:
    async with httpx.AsyncClient(base_url=slow_server.url, timeout=30) as http:
        params = {"message": f"count to {COUNT}", "sessionId": "resume-1"}
        first = await stream(http, "GET", "/api/chat/stream", params=params, max_events=10)
        last_id = first.frames[-1].id
        assert last_id is not None and seq(last_id) == 10
        # What an EventSource does: the same URL again, with the Last-Event-ID header.
        rest = await stream(
            http, "GET", "/api/chat/stream", params=params, headers={"Last-Event-ID": last_id}
        )
        assert rest.response.status_code == 200
        assert rest.response.headers["x-run-id"] == last_id.split(":")[0]
        frames = first.frames[:10] + rest.frames
        assert [seq(f.id) for f in frames] == list(range(1, len(frames) + 1))
        text = "".join(e.content for e in (first.events[:10] + rest.events) if e.type == "token")
        assert text == EXPECTED
        assert rest.types[-1] == "done"
        assert rest.data[-1]["historyLength"] == 2  # one turn, not two
        # The run is fully delivered now: a reconnect is told to stop.
        again = await http.get(
            "/api/chat/stream", params=params, headers={"Last-Event-ID": rest.frames[-1].id or ""}
        )
        assert again.status_code == 204


async def test_an_eventsource_style_client_resumes_after_the_network_cuts(
    slow_server: LiveServer,
) -> None:
    """The server side of the connection is cut mid-answer; the client reconnects by itself."""
    async with cutting_proxy(slow_server.url) as proxy:
        async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as http:
            params = {"message": f"count to {COUNT}"}
            url = "/api/chat/stream"
            headers: dict[str, str] = {}
            events = []
            reconnects = 0
            while True:
                try:
                    async with http.stream("GET", url, params=params, headers=headers) as response:
                        if response.status_code == 204:
                            break
                        assert response.status_code == 200
                        from chatstream.events import FrameDecoder

                        decoder = FrameDecoder()
                        async for chunk in response.aiter_raw():
                            for frame in decoder.feed(chunk):
                                events.append(frame)
                                if len(events) in (7, 31):
                                    proxy.cut()
                        if decoder.last_event_id:
                            headers["Last-Event-ID"] = decoder.last_event_id
                        if events and events[-1].event in ("done", "error"):
                            break
                except (httpx.RemoteProtocolError, httpx.ReadError):
                    reconnects += 1
                    if events and events[-1].id:
                        headers["Last-Event-ID"] = events[-1].id
                    await asyncio.sleep(0.05)
            assert reconnects >= 2
            assert [seq(f.id) for f in events] == list(range(1, len(events) + 1))
            assert events[-1].event == "done"
            text = "".join(
                __import__("orjson").loads(f.data)["content"] for f in events if f.event == "token"
            )
            assert text == EXPECTED


async def test_resume_with_the_query_parameter_and_post(slow_server: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=slow_server.url, timeout=30) as http:
        first = await stream(
            http, "POST", "/api/chat/stream", json={"message": "count to 20"}, max_events=3
        )
        last_id = first.frames[-1].id
        rest = await stream(
            http, "POST", "/api/chat/stream", params={"lastEventId": last_id}, json={}
        )
        assert [seq(f.id) for f in rest.frames] == list(range(4, 4 + len(rest.frames)))
        assert rest.types[-1] == "done"


async def test_unknown_or_expired_runs_answer_204(settings: Settings) -> None:
    with live_server(settings.with_(run_ttl_s=0.3)) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
            unknown = await http.get(
                "/api/chat/stream", headers={"Last-Event-ID": "run_00000000deadbeef:3"}
            )
            assert unknown.status_code == 204
            done = await stream(http, "GET", "/api/chat/stream", params={"message": "hi"})
            run_id = done.data[-1]["runId"]
            # Within the TTL a late resume still gets the ending.
            late = await stream(
                http, "GET", "/api/chat/stream", headers={"Last-Event-ID": f"{run_id}:1"}
            )
            assert late.types[-1] == "done"
            assert seq(late.frames[0].id) == 2
            await asyncio.sleep(0.6)
            expired = await http.get("/api/chat/stream", headers={"Last-Event-ID": f"{run_id}:1"})
            assert expired.status_code == 204


async def test_cancel_stops_the_run_and_stores_the_partial_answer(slow_server: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=slow_server.url, timeout=30) as http:
        params = {"message": "count to 1000", "sessionId": "stop-1"}
        watcher = asyncio.create_task(stream(http, "GET", "/api/chat/stream", params=params))
        # A second subscriber on the same run: both must get the CANCELLED error.
        await asyncio.sleep(0.3)
        run = slow_server.runtime.runs.active_run(SessionRef("", "stop-1"))
        assert run is not None
        other = asyncio.create_task(
            stream(http, "GET", "/api/chat/stream", headers={"Last-Event-ID": f"{run.id}:0"})
        )
        await asyncio.sleep(0.2)
        started = time.monotonic()
        response = await http.post(f"/api/chat/runs/{run.id}/cancel")
        assert time.monotonic() - started < 1.0
        assert response.status_code == 200
        assert response.json()["state"] == "cancelled"
        assert response.json()["cancelled"] is True
        first, second = await watcher, await other
        for result in (first, second):
            assert result.types[-1] == "error"
            assert result.data[-1]["code"] == "CANCELLED"
        assert first.text == second.text
        session = (await http.get("/api/chat/sessions/stop-1")).json()
        answer = session["messages"][-1]
        assert answer["role"] == "assistant"
        assert answer["interrupted"] is True
        assert answer["content"] == first.text
        assert 0 < len(first.text) < len(EXPECTED) * 20
        # Cancelling again is harmless, and the session takes a new turn.
        again = await http.post(f"/api/chat/runs/{run.id}/cancel")
        assert again.status_code == 200 and again.json()["cancelled"] is False
        follow = await stream(
            http, "GET", "/api/chat/stream", params={"message": "hi", "sessionId": "stop-1"}
        )
        assert follow.data[-1]["historyLength"] == 4


async def test_a_run_nobody_resumes_is_cancelled_after_the_grace_period(
    slow_settings: Settings,
) -> None:
    with live_server(slow_settings.with_(resume_grace_s=0.4)) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
            params = {"message": "count to 1000", "sessionId": "grace-1"}
            first = await stream(http, "GET", "/api/chat/stream", params=params, max_events=5)
            run = live.runtime.runs.get(first.frames[0].id.split(":")[0])  # type: ignore[union-attr]
            assert run is not None and not run.finished
            await asyncio.sleep(1.2)
            assert run.state == "cancelled"
            session = (await http.get("/api/chat/sessions/grace-1")).json()
            answer = session["messages"][-1]
            assert answer["interrupted"] is True
            assert answer["content"].startswith("1 2 3 4 5")
            # A late resume still learns how the run ended.
            late = await stream(
                http, "GET", "/api/chat/stream", headers={"Last-Event-ID": first.frames[-1].id}
            )
            assert late.types[-1] == "error" and late.data[-1]["code"] == "CANCELLED"


async def test_a_run_resumed_within_the_grace_period_goes_on(slow_settings: Settings) -> None:
    with live_server(slow_settings.with_(resume_grace_s=0.5)) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
            params = {"message": f"count to {COUNT}"}
            first = await stream(http, "GET", "/api/chat/stream", params=params, max_events=5)
            await asyncio.sleep(0.3)
            rest = await stream(
                http, "GET", "/api/chat/stream", headers={"Last-Event-ID": first.frames[-1].id}
            )
            assert rest.types[-1] == "done"


async def test_heartbeats_keep_a_quiet_stream_alive(settings: Settings) -> None:
    with live_server(settings.with_(model="scripted:400", heartbeat_s=0.1)) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
            result = await stream(http, "GET", "/api/chat/stream", params={"message": "count to 3"})
            assert result.types[-1] == "done"
            gaps = result.raw.split(b"event: token")
            # Between tokens 400 ms apart, a 100 ms heartbeat sends pings.
            assert all(b"\n: ping\n\n" in gap for gap in gaps[1:3])
            assert result.raw.count(b": ping") >= 6


async def test_a_reader_that_stops_reading_does_not_hold_the_run_back(settings: Settings) -> None:
    with live_server(settings) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
            async with http.stream(
                "GET", "/api/chat/stream", params={"message": "count to 20000", "sessionId": "slow"}
            ) as response:
                assert response.status_code == 200
                # Read nothing: the server finishes and stores the turn regardless.
                for _ in range(500):
                    session = await http.get("/api/chat/sessions/slow")
                    if session.status_code == 200 and session.json()["messageCount"] == 2:
                        break
                    await asyncio.sleep(0.02)
                else:
                    raise AssertionError("the run did not finish while its reader was paused")
                from chatstream.events import FrameDecoder

                decoder = FrameDecoder()
                frames = []
                async for chunk in response.aiter_raw():
                    frames.extend(decoder.feed(chunk))
            assert len(frames) == 20001
            assert frames[-1].event == "done"


async def test_the_event_log_is_capped(settings: Settings) -> None:
    with live_server(settings.with_(run_log_max_events=50)) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
            result = await stream(
                http,
                "GET",
                "/api/chat/stream",
                params={"message": "count to 500", "sessionId": "cap"},
            )
            assert len(result.frames) == 50
            assert result.data[-1]["code"] == "OUTPUT_LIMIT"
            session = (await http.get("/api/chat/sessions/cap")).json()
            assert session["messages"][-1]["interrupted"] is True


async def test_a_store_that_fails_to_save_the_turn_says_so_in_the_stream(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    with live_server(settings) as live:

        async def unanswered(*args: object, **kwargs: object) -> None:
            raise StoreError("redis did not answer within 10 s")

        monkeypatch.setattr(live.runtime.store, "append", unanswered)
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
            result = await stream(http, "GET", "/api/chat/stream", params={"message": "hi"})
    # Not "could not be saved": a write that timed out may still land, and a person who
    # sends the message again would have the turn twice.
    assert result.types[-1] == "error"
    assert result.data[-1]["code"] == "STORE_UNAVAILABLE"
    assert "may not have been saved" in result.data[-1]["message"]
    assert "redis" not in result.data[-1]["message"]
