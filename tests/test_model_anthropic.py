"""AnthropicModel against a fake Messages API server over real loopback HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from chatstream.config import Settings
from chatstream.messages import (
    INTERRUPTED_NOTE,
    Message,
    ToolCallRequest,
    assistant,
    tool_result,
    user,
)
from chatstream.models.anthropic import AnthropicModel, MessagesReader, anthropic_messages
from chatstream.models.base import ModelEvent, TextDelta, Usage
from tests.fakes.anthropic_upstream import FakeAnthropic, HTTPError, Raw, ToolUse
from tests.fakes.anthropic_upstream import Message as Reply
from tests.fakes.openai_upstream import sse
from tests.support.models import (
    WEATHER,
    assert_a_malformed_chunk_fails_the_turn_and_keeps_its_text,
    assert_cancelling_the_consumer_closes_the_upstream_connection,
    assert_closing_the_stream_closes_the_upstream_connection,
    assert_no_wrong_type_gets_past_the_reader,
    assert_tokens_are_yielded_while_the_upstream_is_still_sending,
    collect,
    collect_until_error,
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
        (Raw([b"event: message_start\ndata: {oops\n\n"]), "malformed stream chunk"),
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

    rest: list[ModelEvent] = [TextDelta(" second"), Usage(1, 2)]
    await assert_tokens_are_yielded_while_the_upstream_is_still_sending(model, upstream, rest)


async def test_closing_the_stream_closes_the_upstream_connection(
    upstream: FakeAnthropic, model: AnthropicModel
) -> None:
    upstream.enqueue(Reply(text=["first", " second"], hold_after=3))

    await assert_closing_the_stream_closes_the_upstream_connection(model, upstream)


async def test_cancelling_the_consumer_task_closes_the_upstream_connection(
    upstream: FakeAnthropic, model: AnthropicModel
) -> None:
    upstream.enqueue(Reply(text=["first", " second"], hold_after=3))

    await assert_cancelling_the_consumer_closes_the_upstream_connection(model, upstream)


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


# -- a provider that breaks its wire format --------------------------------------------


def _text_delta(text: Any) -> dict[str, Any]:
    delta = {"type": "text_delta", "text": text}
    return {"type": "content_block_delta", "index": 0, "delta": delta}


def _tool_use(
    *, id: Any = "toolu_1", name: Any = "calculate", input: Any = None, pieces: Any = ()
) -> list[dict[str, Any]]:
    """A whole tool_use block at index 1: its start, input pieces and stop."""
    block = {"type": "tool_use", "id": id, "name": name, "input": {} if input is None else input}
    events: list[dict[str, Any]] = [
        {"type": "content_block_start", "index": 1, "content_block": block}
    ]
    for piece in pieces:
        delta = {"type": "input_json_delta", "partial_json": piece}
        events.append({"type": "content_block_delta", "index": 1, "delta": delta})
    return [*events, {"type": "content_block_stop", "index": 1}]


def _usage(kind: str, **usage: Any) -> dict[str, Any]:
    if kind == "message_start":
        return {"type": "message_start", "message": {"usage": usage}}
    return {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": usage}


# Each is slipped into a well-formed stream after the text "Once upon" (block 0).
MALFORMED_EVENTS: dict[str, list[Any]] = {
    "text-number": [_text_delta(5)],
    "text-list": [_text_delta(["a"])],
    "text-false": [_text_delta(False)],
    "event-list": [[1, 2]],
    "event-number": [5],
    "event-string": ['"Once"'],
    "event-null": ["null"],
    "delta-string": [{"type": "content_block_delta", "index": 0, "delta": "a"}],
    "delta-index-list": [
        {
            "type": "content_block_delta",
            "index": [1],
            "delta": {"type": "input_json_delta", "partial_json": "{}"},
        }
    ],
    "start-index-string": [
        {
            "type": "content_block_start",
            "index": "1",
            "content_block": {"type": "tool_use", "id": "toolu_1", "name": "calculate"},
        }
    ],
    "block-string": [{"type": "content_block_start", "index": 1, "content_block": "text"}],
    "block-text-number": [
        {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": 5}}
    ],
    "stop-index-object": [{"type": "content_block_stop", "index": {"i": 1}}],
    "tool-use-id-number": _tool_use(id=5),
    "tool-use-name-list": _tool_use(name=["calculate"]),
    "tool-use-input-string": _tool_use(input='{"expression": "1+1"}'),
    "partial-json-number": _tool_use(pieces=['{"expression": ', 11, "}"]),
    "message-number": [{"type": "message_start", "message": 5}],
    "usage-string": [{"type": "message_delta", "delta": {}, "usage": "many"}],
    "input-tokens-string": [_usage("message_start", input_tokens="3")],
    "cache-tokens-float": [_usage("message_start", input_tokens=3, cache_read_input_tokens=1.5)],
    "output-tokens-string": [_usage("message_delta", output_tokens="2")],
    "output-tokens-negative": [_usage("message_delta", output_tokens=-2)],
}


@pytest.mark.parametrize("events", MALFORMED_EVENTS.values(), ids=MALFORMED_EVENTS.keys())
async def test_a_malformed_event_is_a_model_error_and_the_partial_answer_is_kept(
    settings: Settings,
    upstream: FakeAnthropic,
    monkeypatch: pytest.MonkeyPatch,
    events: list[Any],
) -> None:
    upstream.enqueue(Reply(text=["Once", " upon"], inject=events, usage=(9, 2)))
    monkeypatch.setenv("ANTHROPIC_BASE_URL", upstream.url)

    model = "anthropic:fake-model"
    await assert_a_malformed_chunk_fails_the_turn_and_keeps_its_text(settings, model)


def test_no_event_of_any_shape_gets_past_the_reader_with_a_wrong_type() -> None:
    start = {
        "type": "message_start",
        "message": {"usage": {"input_tokens": 9, "cache_read_input_tokens": 1}},
    }
    text_block = {"type": "text", "text": "Once"}
    well_formed = [
        start,
        {"type": "content_block_start", "index": 0, "content_block": text_block},
        _text_delta(" upon"),
        {"type": "content_block_stop", "index": 0},
        *_tool_use(pieces=['{"expression": ', '"1+1"}']),
        *_tool_use(input={"expression": "2+2"}),
        _usage("message_delta", output_tokens=2),
        {"type": "message_stop"},
    ]
    assert_no_wrong_type_gets_past_the_reader(MessagesReader, "anthropic:test", well_formed)
