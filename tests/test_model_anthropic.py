"""AnthropicModel against a fake Messages API server over real loopback HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import aclosing
from typing import Any

import pytest

from chatstream.errors import ModelError
from chatstream.messages import (
    INTERRUPTED_NOTE,
    Message,
    ToolCallRequest,
    assistant,
    tool_result,
    user,
)
from chatstream.models.anthropic import AnthropicModel, anthropic_messages
from chatstream.models.base import ModelEvent, TextDelta, ToolSpec, Usage
from tests.fakes.anthropic_upstream import FakeAnthropic, HTTPError, Raw, ToolUse
from tests.fakes.anthropic_upstream import Message as Reply
from tests.fakes.openai_upstream import sse

WEATHER = ToolSpec(
    "get_weather",
    "Current weather for a place.",
    {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]},
)


@pytest.fixture
def upstream() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as fake:
        yield fake
    assert fake.errors == []


@pytest.fixture
async def model(upstream: FakeAnthropic) -> AsyncIterator[AnthropicModel]:
    model = AnthropicModel("claude-test", base_url=upstream.url, api_key="sk-ant-test")
    yield model
    await model.aclose()


async def collect(
    model: AnthropicModel,
    messages: Sequence[Message] = (user("hi"),),
    tools: Sequence[ToolSpec] = (),
) -> list[ModelEvent]:
    async with aclosing(model.stream(messages, tools)) as events:  # type: ignore[type-var]
        return [event async for event in events]


async def collect_until_error(model: AnthropicModel) -> tuple[list[ModelEvent], ModelError]:
    seen: list[ModelEvent] = []
    with pytest.raises(ModelError) as caught:
        async with aclosing(model.stream([user("hi")], [])) as events:  # type: ignore[type-var]
            async for event in events:
                seen.append(event)
    return seen, caught.value


async def test_text_streams_as_deltas_in_order_then_usage(
    upstream: FakeAnthropic, model: AnthropicModel
) -> None:
    upstream.enqueue(Reply(text=["Hel", "lo", ", wor", "ld 🌍"], usage=(12, 4)))

    assert await collect(model) == [
        TextDelta("Hel"),
        TextDelta("lo"),
        TextDelta(", wor"),
        TextDelta("ld 🌍"),
        Usage(prompt_tokens=12, completion_tokens=4),
    ]


async def test_tool_use_blocks_are_assembled_from_json_pieces(
    upstream: FakeAnthropic, model: AnthropicModel
) -> None:
    upstream.enqueue(
        Reply(
            text=["Let me check."],
            tool_uses=[
                ToolUse("get_weather", {"location": "Seoul, KR"}, id="toolu_a", fragments=5),
                ToolUse("get_weather", {"location": "Busan"}, id="toolu_b", fragments=4),
                ToolUse("get_current_time", "", id="toolu_c"),
                ToolUse("calculate", '{"expression": "1+', id="toolu_d"),
            ],
            usage=(30, 20),
        )
    )

    assert await collect(model, tools=[WEATHER]) == [
        TextDelta("Let me check."),
        ToolCallRequest("toolu_a", "get_weather", {"location": "Seoul, KR"}),
        ToolCallRequest("toolu_b", "get_weather", {"location": "Busan"}),
        ToolCallRequest("toolu_c", "get_current_time", {}),
        ToolCallRequest("toolu_d", "calculate", {"_raw": '{"expression": "1+'}),
        Usage(prompt_tokens=30, completion_tokens=20),
    ]


async def test_request_body_carries_system_blocks_and_merged_tool_results(
    upstream: FakeAnthropic, model: AnthropicModel
) -> None:
    seoul = ToolCallRequest("toolu_1", "get_weather", {"location": "Seoul"})
    busan = ToolCallRequest("toolu_2", "get_weather", {"location": "Busan"})
    history = [
        Message(role="system", content="Be brief."),
        user("Weather in Seoul and Busan?"),
        assistant("Checking.", tool_calls=(seoul, busan)),
        tool_result(seoul, "sunny, 21 °C"),
        tool_result(busan, "unknown place", is_error=True),
        assistant("Seoul is sunny and", interrupted=True),
        user("Go on"),
    ]
    upstream.enqueue(Reply(text=["ok"]))

    await collect(model, history, [WEATHER])

    request = upstream.requests[-1]
    assert (request.method, request.path) == ("POST", "/v1/messages")
    assert request.headers["x-api-key"] == "sk-ant-test"
    assert request.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in request.headers
    assert request.body == {
        "model": "claude-test",
        "max_tokens": 4096,
        "stream": True,
        "system": "Be brief.",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Weather in Seoul and Busan?"}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Checking."},
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "get_weather",
                        "input": {"location": "Seoul"},
                    },
                    {
                        "type": "tool_use",
                        "id": "toolu_2",
                        "name": "get_weather",
                        "input": {"location": "Busan"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny, 21 °C"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_2",
                        "content": "unknown place",
                        "is_error": True,
                    },
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "text",
                        "text": f"Seoul is sunny and\n{INTERRUPTED_NOTE}",
                    }
                ],
            },
            {"role": "user", "content": [{"type": "text", "text": "Go on"}]},
        ],
        "tools": [
            {
                "name": "get_weather",
                "description": "Current weather for a place.",
                "input_schema": WEATHER.parameters,
            }
        ],
    }


async def test_without_key_no_api_key_header_is_sent_and_env_sets_the_url(
    upstream: FakeAnthropic, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", upstream.url)
    model = AnthropicModel("claude-x", max_tokens=100)
    try:
        events = await collect(model)
    finally:
        await model.aclose()

    assert model.name == "anthropic:claude-x"
    assert events[0] == TextDelta("Echo:")
    request = upstream.requests[-1]
    assert "x-api-key" not in request.headers
    assert request.body["max_tokens"] == 100
    assert "tools" not in request.body and "system" not in request.body


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (401, "invalid x-api-key"),
        (429, "Number of request tokens has exceeded your rate limit."),
        (529, "Overloaded"),
    ],
)
async def test_http_errors_become_model_errors_with_the_upstream_message(
    upstream: FakeAnthropic, model: AnthropicModel, status: int, message: str
) -> None:
    upstream.enqueue(HTTPError(status, message))

    seen, error = await collect_until_error(model)

    assert seen == []
    assert f"HTTP {status}" in str(error)
    assert message in str(error)


async def test_error_event_under_http_200_is_a_model_error_after_the_tokens_so_far(
    upstream: FakeAnthropic, model: AnthropicModel
) -> None:
    upstream.enqueue(Reply(text=["one", " two"], error=("overloaded_error", "Overloaded")))

    seen, error = await collect_until_error(model)

    assert seen == [TextDelta("one"), TextDelta(" two")]
    assert "Overloaded" in str(error)


async def test_connection_dropped_mid_stream_is_a_model_error(
    upstream: FakeAnthropic, model: AnthropicModel
) -> None:
    # Events: block start, ping, "one", " two", ...; drop after " two".
    upstream.enqueue(Reply(text=["one", " two", " three"], drop_after=4))

    seen, error = await collect_until_error(model)

    assert seen == [TextDelta("one"), TextDelta(" two")]
    assert "connection lost mid-stream" in str(error)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (Reply(text=["a"], stop=False), "ended before"),
        (Raw([b"event: message_start\ndata: {oops\n\n"]), "malformed event"),
    ],
    ids=["closed-without-message-stop", "malformed-json"],
)
async def test_broken_streams_are_model_errors(
    upstream: FakeAnthropic, model: AnthropicModel, reply: Any, expected: str
) -> None:
    upstream.enqueue(reply)

    _, error = await collect_until_error(model)

    assert expected in str(error)


async def test_unknown_event_types_are_ignored(
    upstream: FakeAnthropic, model: AnthropicModel
) -> None:
    upstream.enqueue(
        Raw(
            [
                sse({"type": "message_start", "message": {"usage": {"input_tokens": 3}}}),
                sse({"type": "ping"}, "ping"),
                sse({"type": "future_event", "x": 1}, "future_event"),
                sse(
                    {
                        "type": "content_block_start",
                        "index": 0,
                        "content_block": {"type": "text", "text": ""},
                    }
                ),
                sse(
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": "hi"},
                    }
                ),
                sse({"type": "content_block_stop", "index": 0}),
                sse(
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": "end_turn"},
                        "usage": {"output_tokens": 1},
                    }
                ),
                sse({"type": "message_stop"}),
            ]
        )
    )

    assert await collect(model) == [TextDelta("hi"), Usage(3, 1)]


async def test_tokens_are_yielded_while_the_upstream_is_still_sending(
    upstream: FakeAnthropic, model: AnthropicModel
) -> None:
    upstream.enqueue(Reply(text=["first", " second"], hold_after=3, usage=(1, 2)))

    async with aclosing(model.stream([user("hi")], [])) as events:  # type: ignore[type-var]
        async with asyncio.timeout(5):
            first = await anext(events)
        assert first == TextDelta("first")
        # The fake sends the rest only once released: the first token came through alone.
        assert await upstream.wait_for_held()
        assert not upstream.requests[-1].completed
        upstream.release()
        rest = [event async for event in events]

    assert rest == [TextDelta(" second"), Usage(1, 2)]


async def test_closing_the_stream_closes_the_upstream_connection(
    upstream: FakeAnthropic, model: AnthropicModel
) -> None:
    upstream.enqueue(Reply(text=["first", " second"], hold_after=3))

    async with aclosing(model.stream([user("hi")], [])) as events:  # type: ignore[type-var]
        assert await anext(events) == TextDelta("first")

    assert await upstream.wait_for_disconnect(within=2)
    assert upstream.requests[-1].disconnected


async def test_cancelling_the_consumer_task_closes_the_upstream_connection(
    upstream: FakeAnthropic, model: AnthropicModel
) -> None:
    upstream.enqueue(Reply(text=["first", " second"], hold_after=3))

    async def consume() -> None:
        async with aclosing(model.stream([user("hi")], [])) as events:  # type: ignore[type-var]
            async for _ in events:
                pass

    task = asyncio.create_task(consume())
    assert await upstream.wait_for_held()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert await upstream.wait_for_disconnect(within=2)


async def test_connection_is_reused_across_turns(
    upstream: FakeAnthropic, model: AnthropicModel
) -> None:
    upstream.enqueue(Reply(text=["a"]), Reply(text=["b"]))

    for _ in range(2):
        await collect(model)

    assert upstream.connections == 1


def test_tool_rounds_become_text_when_a_request_offers_no_tools() -> None:
    # Anthropic refuses tool_use/tool_result blocks in a request without tools.
    call = ToolCallRequest("toolu_1", "calculate", {"expression": "6*7"})
    history = [
        Message(role="user", content="what is 6*7?"),
        Message(role="assistant", content="", tool_calls=(call,)),
        Message(role="tool", content="42", tool_call_id="toolu_1", tool="calculate"),
    ]
    _, converted = anthropic_messages(history, tool_blocks=False)
    kinds = {block["type"] for message in converted for block in message["content"]}
    assert kinds == {"text"}
    texts = [block["text"] for message in converted for block in message["content"]]
    assert '[called calculate with {"expression":"6*7"}]' in texts
    assert "[calculate returned: 42]" in texts
    _, with_blocks = anthropic_messages(history)
    assert {b["type"] for m in with_blocks for b in m["content"]} >= {"tool_use", "tool_result"}
