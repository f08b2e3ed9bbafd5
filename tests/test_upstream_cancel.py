"""Stopping a run closes the model's upstream HTTP request, through the whole server."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from chatstream.config import Settings
from tests.fakes.openai_upstream import Call, Completion, FakeOpenAI
from tests.support.server import live_server
from tests.support.sse import stream


@pytest.fixture
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


async def test_the_stop_button_closes_the_upstream_request(
    settings: Settings, upstream: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream.enqueue(Completion(text=["Once", " upon", " a", " time"], hold_after=2))
    monkeypatch.setenv("OPENAI_BASE_URL", upstream.url)
    with live_server(settings.with_(model="openai:fake-model")) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
            first = await stream(
                http, "GET", "/api/chat/stream", params={"message": "tell me"}, max_events=2
            )
            assert first.text == "Once upon"
            assert await upstream.wait_for_held()
            run_id = (first.frames[0].id or "").split(":")[0]
            response = await http.post(f"/api/chat/runs/{run_id}/cancel")
            assert response.json()["state"] == "cancelled"
            assert await upstream.wait_for_disconnect(within=2)
            session_id = response.json()["sessionId"]
            session = (await http.get(f"/api/chat/sessions/{session_id}")).json()
            assert session["messages"][-1] == {
                "role": "assistant",
                "content": "Once upon",
                "interrupted": True,
                "createdAt": session["messages"][-1]["createdAt"],
            }


async def test_a_run_nobody_resumes_closes_the_upstream_request(
    settings: Settings, upstream: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream.enqueue(Completion(text=["a", "b", "c"], hold_after=1))
    monkeypatch.setenv("OPENAI_BASE_URL", upstream.url)
    with live_server(settings.with_(model="openai:fake-model", resume_grace_s=0.3)) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
            first = await stream(
                http, "GET", "/api/chat/stream", params={"message": "hi"}, max_events=1
            )
            assert first.text == "a"
        # The client is gone; the grace period runs out and the upstream request is closed.
        assert await upstream.wait_for_disconnect(within=3)


async def test_a_stream_relays_upstream_tool_calls_and_usage(
    settings: Settings, upstream: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream.enqueue(
        Completion(
            tool_calls=[
                Call("calculate", {"expression": "6*7"}, fragments=4),
                Call("calculate", {"expression": "2**10"}, fragments=3),
            ],
            interleave=True,
            usage=(30, 12),
        ),
        Completion(text=["The", " answers", " are", " 42", " and", " 1024."], usage=(60, 6)),
    )
    monkeypatch.setenv("OPENAI_BASE_URL", upstream.url)
    with live_server(settings.with_(model="openai:fake-model")) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
            result = await stream(http, "GET", "/api/chat/stream", params={"message": "compute"})
    assert [t for t in result.types if t != "tool_progress"] == [
        "tool_call", "tool_call", "tool_result", "tool_result",
        "token", "token", "token", "token", "token", "token", "done",
    ]  # fmt: skip
    results = {r["id"]: r["result"] for r in result.of("tool_result")}
    calls = result.of("tool_call")
    assert [results[c["id"]] for c in calls] == ["42", "1024"]
    assert result.text == "The answers are 42 and 1024."
    assert result.data[-1]["usage"] == {
        "promptTokens": 90,
        "completionTokens": 18,
        "totalTokens": 108,
    }
    # The second request carried the tool round back to the model.
    second = upstream.requests[1].body["messages"]
    assert [m["role"] for m in second[-3:]] == ["assistant", "tool", "tool"]


async def test_tool_arguments_that_are_not_json_are_a_readable_tool_error(
    settings: Settings, upstream: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream.enqueue(
        Completion(tool_calls=[Call("calculate", '{"expression": "2+', fragments=2)]),
        Completion(text=["Sorry."]),
    )
    monkeypatch.setenv("OPENAI_BASE_URL", upstream.url)
    with live_server(settings.with_(model="openai:fake-model")) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
            result = await stream(http, "GET", "/api/chat/stream", params={"message": "2+?"})
    tool_result = result.of("tool_result")[0]
    assert tool_result["isError"] is True
    assert tool_result["result"].startswith("The arguments for calculate were not a JSON object")
    assert result.types[-1] == "done"
