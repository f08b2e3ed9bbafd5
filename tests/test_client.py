"""chatstream.client against a live server: typed events, chat(), cancel, refusals, resume."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack

import httpx
import pytest

from chatstream.client import (
    AsyncChatStream,
    AsyncClient,
    ChatStream,
    Client,
    ClientError,
    ConnectionFailed,
    RunFailed,
)
from chatstream.config import Settings
from chatstream.events import Done, Error, Event, Token, ToolCall, ToolProgress, ToolResult
from tests.support.proxy import cutting_proxy
from tests.support.server import LiveServer, free_port, live_server

COUNT = 40
COUNTED = " ".join(str(i) for i in range(1, COUNT + 1))


@pytest.fixture
def slow_server(settings: Settings) -> Iterator[LiveServer]:
    """Tokens 20 ms apart; a dropped stream may be resumed after 50 ms."""
    with live_server(settings.with_(model="scripted:20", retry_ms=50)) as live:
        yield live


def seq(stream: ChatStream | AsyncChatStream) -> int:
    """The seq of the event the stream yielded last."""
    assert stream.last_event_id is not None
    return int(stream.last_event_id.rsplit(":", 1)[1])


def text_of(events: list[Event]) -> str:
    return "".join(e.content for e in events if isinstance(e, Token))


# -- streaming ------------------------------------------------------------------


def test_stream_yields_typed_events_in_order_ending_in_done(server: LiveServer) -> None:
    with Client(server.url) as client, client.stream("count to 5", session_id="c-1") as stream:
        events = list(stream)
    assert events[:5] == [Token("1 "), Token("2 "), Token("3 "), Token("4 "), Token("5")]
    done = events[-1]
    assert len(events) == 6 and isinstance(done, Done)
    assert (done.session_id, done.history_length) == ("c-1", 2)
    assert stream.run_id == done.run_id
    assert stream.last_event_id == f"{done.run_id}:6"
    assert stream.resumes == 0


async def test_async_stream_shows_a_tool_call_its_progress_and_its_result(
    server: LiveServer,
) -> None:
    async with AsyncClient(server.url) as client:
        async with client.stream("What's the weather in Seoul?") as stream:
            events = [event async for event in stream]
    call, *progress, result = [e for e in events if not isinstance(e, Token | Done)]
    assert isinstance(call, ToolCall) and call.tool == "get_weather"
    assert call.args == {"location": "Seoul"}
    assert progress and all(isinstance(p, ToolProgress) and p.id == call.id for p in progress)
    # The weather service is unreachable in tests: a failed tool is a result, not a crash.
    assert isinstance(result, ToolResult) and result.id == call.id and result.is_error
    assert events.index(result) < events.index(next(e for e in events if isinstance(e, Token)))
    assert isinstance(events[-1], Done)
    assert stream.session_id == events[-1].session_id


def test_an_error_event_is_yielded_and_chat_raises_run_failed(server: LiveServer) -> None:
    with Client(server.url) as client:
        events = list(client.stream("simulate a model error"))
        assert text_of(events) == "Starting to answer"
        assert isinstance(events[-1], Error) and events[-1].code == "MODEL_ERROR"
        with pytest.raises(RunFailed) as failed:
            client.chat("simulate a model error")
    assert failed.value.code == "MODEL_ERROR"
    assert failed.value.text == "Starting to answer"
    assert failed.value.run_id is not None


# -- chat() ---------------------------------------------------------------------


def test_chat_returns_the_answer_tool_results_and_the_session(server: LiveServer) -> None:
    with Client(server.url) as client:
        first = client.chat("convert 20 C to F", session_id="c-chat")
        second = client.chat("count to 3", session_id="c-chat")
        session = client.session("c-chat")
    assert [r.tool for r in first.tool_results] == ["convert_temperature"]
    assert "68" in first.tool_results[0].result and not first.tool_results[0].is_error
    assert [c.args for c in first.tool_calls] == [{"value": 20.0, "from_unit": "C", "to_unit": "F"}]
    assert "68" in first.text
    assert (first.session_id, first.history_length) == ("c-chat", 2)
    assert first.run_id.startswith("run_") and first.usage
    assert (second.text, second.history_length, second.tool_results) == ("1 2 3", 4, ())
    last = session["messages"][-1]
    assert (last["role"], last["content"], last.get("interrupted")) == ("assistant", "1 2 3", None)


async def test_async_chat_keeps_a_session_and_can_delete_it(server: LiveServer) -> None:
    async with AsyncClient(server.url) as client:
        first = await client.chat("hello")
        second = await client.chat("count to 2", session_id=first.session_id)
        assert (second.session_id, second.history_length) == (first.session_id, 4)
        assert (await client.session(first.session_id))["messageCount"] == 4
        await client.delete_session(first.session_id)
        with pytest.raises(ClientError) as missing:
            await client.session(first.session_id)
    assert (missing.value.status, missing.value.code) == (404, "SESSION_NOT_FOUND")
    assert first.text.startswith("Hello!")


# -- cancel -----------------------------------------------------------------------


def test_cancel_mid_stream_ends_the_stream_with_cancelled(slow_server: LiveServer) -> None:
    with Client(slow_server.url) as client:
        with client.stream("count to 500", session_id="c-stop") as stream:
            events: list[Event] = []
            for event in stream:
                events.append(event)
                if len(events) == 3:
                    assert stream.run_id is not None
                    assert client.cancel(stream.run_id) is True
        assert stream.run_id is not None
        assert client.cancel(stream.run_id) is False  # already over
        answer = client.session("c-stop")["messages"][-1]
    last = events[-1]
    assert isinstance(last, Error) and last.code == "CANCELLED"
    assert text_of(events).startswith("1 2 3") and len(events) < 100
    assert answer["interrupted"] is True and answer["content"] == text_of(events)


async def test_async_chat_raises_run_failed_when_the_run_is_cancelled(
    slow_server: LiveServer,
) -> None:
    async with AsyncClient(slow_server.url) as client:
        chat = asyncio.create_task(client.chat("count to 500", session_id="c-stop-2"))
        for _ in range(200):
            await asyncio.sleep(0.02)
            run_id = (await client.session("c-stop-2")).get("activeRunId")
            if run_id:
                break
        assert run_id
        await asyncio.sleep(0.1)
        assert await client.cancel(run_id) is True
        with pytest.raises(RunFailed) as failed:
            await chat
    assert (failed.value.code, failed.value.run_id) == ("CANCELLED", run_id)
    assert failed.value.text.startswith("1 ")


# -- refusals -------------------------------------------------------------------


def test_a_refused_request_raises_client_error_with_status_and_code(server: LiveServer) -> None:
    with Client(server.url) as client:
        with pytest.raises(ClientError) as blank:
            list(client.stream("   "))
        with pytest.raises(ClientError) as bad_session:
            client.chat("hi", session_id="not a valid id!")
        with pytest.raises(ClientError) as unknown_run:
            client.cancel("run_0000000000000000")
    assert (blank.value.status, blank.value.code) == (400, "MISSING_MESSAGE")
    assert (bad_session.value.status, bad_session.value.code) == (400, "INVALID_REQUEST")
    assert (unknown_run.value.status, unknown_run.value.code) == (404, "RUN_NOT_FOUND")
    assert "message" in blank.value.message


async def test_async_refusal_and_an_unreachable_server(server: LiveServer) -> None:
    async with AsyncClient(server.url) as client:
        with pytest.raises(ClientError) as too_long:
            await client.chat("x" * 40_000)
    assert (too_long.value.status, too_long.value.code) == (413, "MESSAGE_TOO_LONG")
    async with AsyncClient(f"http://127.0.0.1:{free_port()}") as nowhere:
        with pytest.raises(ConnectionFailed, match="cannot reach"):
            await nowhere.chat("hi")


def test_the_api_key_is_sent_as_a_bearer_token() -> None:
    seen: list[httpx.Request] = []
    body = (
        b'retry: 10\nid: run_ab:1\nevent: token\ndata: {"content":"hi"}\n\n'
        b'id: run_ab:2\nevent: done\ndata: {"message":"complete","sessionId":"s","historyLength":2,'
        b'"runId":"run_ab","usage":{}}\n\n'
    )

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        headers = {"content-type": "text/event-stream", "x-run-id": "run_ab", "x-session-id": "s"}
        return httpx.Response(200, headers=headers, content=body)

    with Client("http://chat.test", api_key="k-123", transport=httpx.MockTransport(answer)) as c:
        result = c.chat("hi", enable_tools=False)
    assert result.text == "hi" and result.run_id == "run_ab"
    assert seen[0].headers["authorization"] == "Bearer k-123"
    assert seen[0].url.path == "/api/chat/stream"
    assert json.loads(seen[0].content) == {"message": "hi", "enableTools": False}


# -- resume -----------------------------------------------------------------------


def frame(seq: int, kind: str, data: str) -> bytes:
    return f"id: run_ab:{seq}\nevent: {kind}\ndata: {data}\n\n".encode()


DONE_AB = '{"message":"complete","sessionId":"s","historyLength":2,"runId":"run_ab","usage":{}}'


def test_a_resume_sends_last_event_id_retries_a_503_and_skips_replays() -> None:
    """The resume logic on its own: the network is a script of answers."""
    seen: list[httpx.Request] = []

    def first_answer() -> Iterator[bytes]:
        yield b"retry: 10\n" + frame(1, "token", '{"content":"a"}')
        raise httpx.ReadError("connection reset")

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        headers = {"content-type": "text/event-stream", "x-run-id": "run_ab", "x-session-id": "s"}
        if len(seen) == 1:
            return httpx.Response(200, headers=headers, content=first_answer())
        if len(seen) == 2:
            body = b'{"error":{"code":"STORE_UNAVAILABLE","message":"try again"}}'
            return httpx.Response(503, content=body)
        replay = frame(1, "token", '{"content":"a"}')  # a server may send one frame again
        rest = frame(2, "token", '{"content":"b"}') + frame(3, "done", DONE_AB)
        return httpx.Response(200, headers=headers, content=replay + rest)

    with Client("http://chat.test", transport=httpx.MockTransport(answer)) as client:
        started = time.monotonic()
        with client.stream("hi") as stream:
            events = list(stream)
    assert events == [Token("a"), Token("b"), Done("s", 2, "run_ab")]
    assert [(r.method, r.headers.get("last-event-id")) for r in seen] == [
        ("POST", None),
        ("GET", "run_ab:1"),
        ("GET", "run_ab:1"),
    ]
    assert stream.resumes == 2
    assert time.monotonic() - started < 1.0  # waited the server's 10 ms retry, not 3 s


async def test_async_stream_resumes_after_the_connection_is_cut_twice(
    slow_server: LiveServer,
) -> None:
    async with cutting_proxy(slow_server.url) as proxy, AsyncClient(proxy.url) as client:
        events: list[Event] = []
        seqs: list[int] = []
        async with client.stream(f"count to {COUNT}") as stream:
            async for event in stream:
                events.append(event)
                seqs.append(seq(stream))
                if len(events) in (8, 25):
                    proxy.cut()
    assert stream.resumes == 2 and proxy.connections == 3
    assert text_of(events) == COUNTED
    assert seqs == list(range(1, COUNT + 2))
    assert isinstance(events[-1], Done) and events[-1].history_length == 2


async def test_sync_stream_resumes_after_the_connection_is_cut_twice(
    slow_server: LiveServer,
) -> None:
    loop = asyncio.get_running_loop()
    async with cutting_proxy(slow_server.url) as proxy:

        def read() -> tuple[ChatStream, list[Event], list[int]]:
            events: list[Event] = []
            seqs: list[int] = []
            with Client(proxy.url) as client, client.stream(f"count to {COUNT}") as stream:
                for event in stream:
                    events.append(event)
                    seqs.append(seq(stream))
                    if len(events) in (8, 25):
                        loop.call_soon_threadsafe(proxy.cut)
            return stream, events, seqs

        # The proxy runs on this loop, so the blocking client reads from a thread.
        stream, events, seqs = await asyncio.to_thread(read)
    assert stream.resumes == 2
    assert text_of(events) == COUNTED
    assert seqs == list(range(1, COUNT + 2))
    assert isinstance(events[-1], Done)
    with Client(slow_server.url) as check:
        assert check.session(events[-1].session_id)["messages"][-1]["content"] == COUNTED


async def test_a_stream_that_cannot_be_resumed_raises_connection_failed(
    slow_server: LiveServer,
) -> None:
    events: list[Event] = []
    async with AsyncExitStack() as network:
        proxy = await network.enter_async_context(cutting_proxy(slow_server.url))
        async with AsyncClient(proxy.url, max_retries=2) as client:
            with pytest.raises(ConnectionFailed, match="2 attempts to resume") as lost:
                async with client.stream(f"count to {COUNT}") as stream:
                    async for event in stream:
                        events.append(event)
                        if len(events) == 3:
                            await network.aclose()  # cut, and refuse every reconnection
    assert len(events) < COUNT and stream.resumes == 2
    assert stream.run_id is not None and stream.run_id in str(lost.value)
