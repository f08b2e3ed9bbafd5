"""What the remote models' tests share: a tool, reading a turn, and checks for any provider.

The checks are the behaviour every provider must show in the same way (they all stream
through ``chatstream.models.http``); each provider's test file calls them with its own
model, fake upstream and replies.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from contextlib import aclosing
from typing import Any

import httpx
import pytest

from chatstream.config import Settings
from chatstream.errors import ModelError
from chatstream.messages import Message, ToolCallRequest, user
from chatstream.models.base import Model, ModelEvent, TextDelta, ToolSpec
from chatstream.models.http import EventReader
from tests.fakes.openai_upstream import LoopbackServer, sse
from tests.support.server import live_server
from tests.support.sse import stream

WEATHER = ToolSpec(
    "get_weather",
    "Current weather for a place.",
    {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]},
)


async def collect(
    model: Model,
    messages: Sequence[Message] = (user("hi"),),
    tools: Sequence[ToolSpec] = (),
) -> list[ModelEvent]:
    """Every event of one turn."""
    async with aclosing(model.stream(messages, tools)) as events:
        return [event async for event in events]


async def collect_until_error(model: Model) -> tuple[list[ModelEvent], ModelError]:
    """The events of a turn that must fail, and its ``ModelError``."""
    seen: list[ModelEvent] = []
    with pytest.raises(ModelError) as caught:
        async with aclosing(model.stream([user("hi")], [])) as events:
            async for event in events:
                seen.append(event)
    return seen, caught.value


# -- streaming: the upstream holds its reply after the first token ------------------------


async def assert_tokens_are_yielded_while_the_upstream_is_still_sending(
    model: Model, upstream: LoopbackServer, rest: list[ModelEvent]
) -> None:
    """The first token comes through alone; ``rest`` follows once the upstream is released."""
    async with aclosing(model.stream([user("hi")], [])) as events:
        async with asyncio.timeout(5):
            first = await anext(events)
        assert first == TextDelta("first")
        # The fake sends the rest only once released: the first token came through alone.
        assert await upstream.wait_for_held()
        assert not upstream.requests[-1].completed
        upstream.release()
        assert [event async for event in events] == rest

    assert await upstream.wait_for(lambda: upstream.requests[-1].completed)


async def assert_closing_the_stream_closes_the_upstream_connection(
    model: Model, upstream: LoopbackServer
) -> None:
    async with aclosing(model.stream([user("hi")], [])) as events:
        assert await anext(events) == TextDelta("first")

    assert await upstream.wait_for_disconnect(within=2)
    assert upstream.requests[-1].disconnected


async def assert_cancelling_the_consumer_closes_the_upstream_connection(
    model: Model, upstream: LoopbackServer
) -> None:
    seen: list[ModelEvent] = []

    async def consume() -> None:
        async with aclosing(model.stream([user("hi")], [])) as events:
            async for event in events:
                seen.append(event)

    task = asyncio.create_task(consume())
    assert await upstream.wait_for_held()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert seen == [TextDelta("first")]
    assert await upstream.wait_for_disconnect(within=2)


# -- a provider that breaks its wire format ------------------------------------------------


async def assert_a_malformed_chunk_fails_the_turn_and_keeps_its_text(
    settings: Settings, model: str
) -> None:
    """Through a live server: the tokens ``Once`` and `` upon``, then a malformed chunk."""
    with live_server(settings.with_(model=model)) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
            params = {"message": "tell me", "sessionId": "malformed"}
            result = await stream(http, "GET", "/api/chat/stream", params=params)
            session = await http.get("/api/chat/sessions/malformed")

    assert result.types == ["token", "token", "error"]
    assert [token["content"] for token in result.of("token")] == ["Once", " upon"]
    malformed = f"{model}: the model provider sent a malformed stream chunk."
    assert result.data[-1] == {"code": "MODEL_ERROR", "message": malformed}
    assert session.status_code == 200
    stored = session.json()["messages"]
    assert stored[-1] == {
        "role": "assistant",
        "content": "Once upon",
        "interrupted": True,
        "createdAt": stored[-1]["createdAt"],
    }


def places(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a JSON value: itself, and each item and field, depth first."""
    yield path
    if isinstance(value, dict | list):
        for key, item in value.items() if isinstance(value, dict) else enumerate(value):
            yield from places(item, (*path, key))


def replaced(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    """A copy of a JSON value with ``new`` at ``path``."""
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = replaced(value[path[0]], path[1:], new)
    return copy


WRONG_TYPES: list[Any] = [None, 5, -1, 2.5, True, False, "", "x", [], [1], {}, {"a": 1}]


def assert_well_typed(events: Sequence[ModelEvent]) -> None:
    """Text is a string, a tool call has string id and name and an object of arguments..."""
    for event in events:
        if isinstance(event, TextDelta):
            assert type(event.text) is str
        elif isinstance(event, ToolCallRequest):
            assert (type(event.id), type(event.name), type(event.arguments)) == (str, str, dict)
        else:
            assert type(event.prompt_tokens) is type(event.completion_tokens) is int
            assert event.prompt_tokens >= 0 and event.completion_tokens >= 0


def assert_no_wrong_type_gets_past_the_reader(
    reader: Callable[[str], EventReader], name: str, well_formed: list[Any], *, end: bytes = b""
) -> None:
    """Each place of each well-formed chunk given each wrong type, and the stream read whole:
    the reader fails with a plain error, or every event it gives is well typed."""
    plain_errors = {
        f"{name}: the model provider sent a malformed stream chunk.",
        f"{name}: the model sent a tool call without a name",
        f"{name}: the stream ended before the answer finished",
    }
    tried = 0
    for number, chunk in enumerate(well_formed):
        for path in places(chunk):
            for wrong in WRONG_TYPES:
                mutated = list(well_formed)
                mutated[number] = replaced(chunk, path, wrong)
                read = reader(name)
                events = read.feed(b"".join(sse(c) for c in mutated) + end)  # must not raise
                error = read.error
                if error is None:
                    try:
                        events += read.finish()
                    except ModelError as exc:
                        error = exc
                assert error is None or error.message in plain_errors
                assert_well_typed(events)
                tried += 1
    assert tried > 300
