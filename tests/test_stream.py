"""The seed's streaming scenarios, end to end through a real server on loopback."""

from __future__ import annotations

import asyncio
import re
import socket

import httpx
import orjson

from chatstream.config import Settings
from chatstream.store.base import SessionRef
from tests.fakes.open_meteo import run_fake_open_meteo
from tests.support.server import LiveServer, live_server
from tests.support.sse import Streamed, stream

ID = re.compile(r"(run_[0-9a-f]+):(\d+)")


def assert_well_formed(result: Streamed) -> str:
    """Common to every stream: headers, retry, contiguous ids, exactly one terminal event."""
    response = result.response
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    assert "content-encoding" not in response.headers
    assert result.raw.startswith(b"retry: ")
    assert result.frames[0].retry is not None
    run_ids = {ID.fullmatch(i).group(1) for i in result.ids}  # type: ignore[union-attr]
    assert len(run_ids) == 1
    assert [int(ID.fullmatch(i).group(2)) for i in result.ids] == list(  # type: ignore[union-attr]
        range(1, len(result.frames) + 1)
    )
    terminal = [t for t in result.types if t in ("done", "error")]
    assert terminal == [result.types[-1]]
    return run_ids.pop()


async def test_basic_get_streams_tokens_then_done(client: httpx.AsyncClient) -> None:
    result = await stream(client, "GET", "/api/chat/stream", params={"message": "hello"})
    run_id = assert_well_formed(result)
    assert result.types[:-1] == ["token"] * (len(result.types) - 1)
    assert len(result.of("token")) >= 3
    assert result.text.startswith("Hello! I am the scripted model.")
    done = result.data[-1]
    assert done == {
        "message": "complete",
        "sessionId": result.response.headers["x-session-id"],
        "historyLength": 2,
        "runId": run_id,
        "usage": done["usage"],
    }
    assert done["usage"]["completionTokens"] == len(result.of("token"))


async def test_post_streams_the_same_turn(client: httpx.AsyncClient) -> None:
    result = await stream(
        client,
        "POST",
        "/api/chat/stream",
        json={"message": "hello", "sessionId": "user-123", "enableTools": True},
    )
    assert_well_formed(result)
    assert result.response.headers["x-session-id"] == "user-123"
    assert result.data[-1]["sessionId"] == "user-123"
    assert result.types[-1] == "done"


async def test_korean_text_is_sent_as_raw_utf8(client: httpx.AsyncClient) -> None:
    result = await stream(client, "GET", "/api/chat/stream", params={"message": "안녕하세요"})
    assert_well_formed(result)
    assert "안녕하세요!" in result.text
    assert "안녕하세요!".encode() in result.raw
    assert b"\\u" not in result.raw


async def test_session_persists_across_turns(client: httpx.AsyncClient) -> None:
    first = await stream(client, "GET", "/api/chat/stream", params={"message": "hello"})
    session_id = first.data[-1]["sessionId"]
    assert first.data[-1]["historyLength"] == 2
    second = await stream(
        client, "POST", "/api/chat/stream", json={"message": "count to 3", "sessionId": session_id}
    )
    assert second.data[-1]["historyLength"] == 4
    assert second.text == "1 2 3"
    response = await client.get(f"/api/chat/sessions/{session_id}")
    assert response.status_code == 200
    body = response.json()
    assert body["sessionId"] == session_id
    assert [(m["role"], m["content"]) for m in body["messages"]] == [
        ("user", "hello"),
        ("assistant", first.text),
        ("user", "count to 3"),
        ("assistant", "1 2 3"),
    ]
    assert body["historyLength"] == 4
    assert body["messageCount"] == 4
    assert body["createdAt"] <= body["lastActivity"]


async def test_tool_failure_is_a_result_and_the_turn_goes_on(client: httpx.AsyncClient) -> None:
    # The settings point Open-Meteo at a closed port: the tool fails, the answer says so.
    result = await stream(client, "GET", "/api/chat/stream", params={"message": "서울날씨알려줘"})
    assert_well_formed(result)
    kinds = [t for t in result.types if t != "tool_progress"]
    assert kinds[:2] == ["tool_call", "tool_result"]
    assert kinds[-1] == "done"
    call = result.of("tool_call")[0]
    assert call["tool"] == "get_weather"
    assert call["args"] == {"location": "Seoul"}
    tool_result = result.of("tool_result")[0]
    assert tool_result["id"] == call["id"]
    assert tool_result["isError"] is True
    assert "실패" in result.text


async def test_tools_can_be_turned_off(client: httpx.AsyncClient) -> None:
    result = await stream(
        client,
        "GET",
        "/api/chat/stream",
        params={"message": "what is the weather in Seoul?", "enableTools": "false"},
    )
    assert_well_formed(result)
    assert set(result.types) == {"token", "done"}
    assert "Tools are turned off" in result.text


async def test_enable_tools_accepts_1_and_0(client: httpx.AsyncClient) -> None:
    off = await stream(
        client, "GET", "/api/chat/stream", params={"message": "what is 2+2?", "enableTools": "0"}
    )
    on = await stream(
        client, "GET", "/api/chat/stream", params={"message": "what is 2+2?", "enableTools": "1"}
    )
    assert "tool_call" not in off.types
    assert "tool_call" in on.types
    assert on.of("tool_result")[0]["result"] == "4"


async def test_model_failure_ends_with_model_error_and_a_consistent_session(
    client: httpx.AsyncClient,
) -> None:
    result = await stream(
        client,
        "POST",
        "/api/chat/stream",
        json={"message": "simulate a model error", "sessionId": "broken-1"},
    )
    assert_well_formed(result)
    assert result.types == ["token", "token", "error"]
    assert result.data[-1]["code"] == "MODEL_ERROR"
    assert "scripted model failure" in result.data[-1]["message"]
    session = (await client.get("/api/chat/sessions/broken-1")).json()
    assert [(m["role"], m["content"], m.get("interrupted")) for m in session["messages"]] == [
        ("user", "simulate a model error", None),
        ("assistant", "Starting to answer", True),
    ]
    # The session takes the next turn as usual.
    again = await stream(
        client, "POST", "/api/chat/stream", json={"message": "hello", "sessionId": "broken-1"}
    )
    assert again.data[-1]["historyLength"] == 4


async def test_parallel_tool_calls_have_distinct_ids(client: httpx.AsyncClient) -> None:
    result = await stream(
        client, "GET", "/api/chat/stream", params={"message": "weather in Seoul and Tokyo"}
    )
    assert_well_formed(result)
    calls = result.of("tool_call")
    assert [c["args"]["location"] for c in calls] == ["Seoul", "Tokyo"]
    assert len({c["id"] for c in calls}) == 2
    results = result.of("tool_result")
    assert {r["id"] for r in results} == {c["id"] for c in calls}
    for progress in result.of("tool_progress"):
        assert progress["id"] in {c["id"] for c in calls}


async def test_busy_session_refuses_a_second_turn(settings: Settings) -> None:
    with live_server(settings.with_(model="scripted:50")) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
            first = asyncio.create_task(
                stream(
                    http,
                    "POST",
                    "/api/chat/stream",
                    json={"message": "count to 20", "sessionId": "busy-1"},
                )
            )
            await _wait_for_active(live, "busy-1")
            second = await http.post(
                "/api/chat/stream", json={"message": "hello", "sessionId": "busy-1"}
            )
            assert second.status_code == 409
            assert second.json()["error"]["code"] == "SESSION_BUSY"
            done = await first
            assert done.types[-1] == "done"
            third = await stream(
                http, "POST", "/api/chat/stream", json={"message": "hi", "sessionId": "busy-1"}
            )
            assert third.types[-1] == "done"


async def _wait_for_active(live: LiveServer, session_id: str) -> None:
    for _ in range(500):
        if live.runtime.runs.active_run(SessionRef("", session_id)) is not None:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the first turn never started")


async def test_the_raw_frames_follow_the_contract(client: httpx.AsyncClient) -> None:
    result = await stream(client, "GET", "/api/chat/stream", params={"message": "count to 2"})
    run_id = result.data[-1]["runId"]
    # Before the first event: the retry delay and the id a reconnect resumes from.
    preamble, first_frame = result.raw.split(b"\n\n")[:2]
    assert preamble == f"retry: 3000\nid: {run_id}:0".encode()
    assert first_frame == (f"id: {run_id}:1\nevent: token\n".encode() + b'data: {"content":"1 "}')
    assert orjson.loads(result.frames[-1].data)["runId"] == run_id


async def test_the_seed_example_streams_weather_then_conversion(settings: Settings) -> None:
    with run_fake_open_meteo() as weather:
        live_settings = settings.with_(
            weather_geocoding_url=weather.geocoding_url,
            weather_forecast_url=weather.forecast_url,
        )
        with live_server(live_settings) as live:
            async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
                result = await stream(
                    http,
                    "POST",
                    "/api/chat/stream",
                    json={
                        "message": "서울의 날씨를 알려주고 섭씨를 화씨로 변환해줘",
                        "sessionId": "user-123",
                        "enableTools": True,
                    },
                )
                session = (await http.get("/api/chat/sessions/user-123")).json()
    assert_well_formed(result)
    steps = [t for t in result.types if t != "token"]
    assert steps == [
        "tool_call", "tool_progress", "tool_progress", "tool_progress", "tool_result",
        "tool_call", "tool_progress", "tool_result",
        "done",
    ]  # fmt: skip
    assert result.types[-2] == "token"
    weather_call, convert_call = result.of("tool_call")
    assert weather_call["tool"] == "get_weather" and weather_call["args"] == {"location": "Seoul"}
    progress = [p for p in result.of("tool_progress") if p["id"] == weather_call["id"]]
    assert [p["progress"] for p in progress] == sorted(p["progress"] for p in progress)
    weather_result, convert_result = result.of("tool_result")
    assert weather_result["isError"] is False and "Seoul" in weather_result["result"]
    assert convert_call["tool"] == "convert_temperature"
    assert convert_call["args"]["from_unit"] == "C" and convert_call["args"]["to_unit"] == "F"
    assert "°F" in convert_result["result"]
    assert result.text.startswith("결과입니다: ")
    assert convert_result["result"] in result.text
    assert result.data[-1]["historyLength"] == 2
    # Tool calls and results are stored beside the two counted messages.
    roles = [m["role"] for m in session["messages"]]
    assert roles == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert session["messages"][1]["toolCalls"][0]["tool"] == "get_weather"
    assert session["messages"][2]["toolCallId"] == weather_call["id"]


async def test_a_tool_that_times_out_is_an_error_result(settings: Settings) -> None:
    with run_fake_open_meteo(delay_s=3.0) as weather:
        live_settings = settings.with_(
            weather_geocoding_url=weather.geocoding_url,
            weather_forecast_url=weather.forecast_url,
            tool_timeout_s=0.5,
        )
        with live_server(live_settings) as live:
            async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
                result = await stream(
                    http, "GET", "/api/chat/stream", params={"message": "weather in Tokyo"}
                )
    assert_well_formed(result)
    tool_result = result.of("tool_result")[0]
    assert tool_result["isError"] is True
    assert "timed out" in tool_result["result"]
    assert result.types[-1] == "done"


def test_a_raw_utf8_url_like_curl_sends_works(server: LiveServer) -> None:
    """The seed's curl example puts Korean in the URL unencoded; it must still stream."""
    host, port = server.url.removeprefix("http://").split(":")
    target = "/api/chat/stream?message=안녕하세요&enableTools=true".encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert "안녕하세요!".encode() in body
    assert b"event: done" in body
