"""The agent loop on its own: a model double that asks for tools, real tools, no server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from chatstream.agent import Agent, Turn
from chatstream.events import Event, Token, ToolCall, ToolResult
from chatstream.messages import Message, ToolCallRequest, user
from chatstream.models.base import ModelEvent, TextDelta, ToolSpec
from chatstream.tools import ToolContext, ToolRegistry, tool


class TwoRounds:
    """Asks for ``calls`` in its first round, then answers with the results it was given."""

    name = "two-rounds"

    def __init__(self, *calls: ToolCallRequest) -> None:
        self.calls = calls

    async def warm_up(self, tools: Sequence[ToolSpec], *, system_prompt: str = "") -> None:
        """Nothing to load."""

    async def aclose(self) -> None:
        """Nothing to release."""

    async def stream(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec]
    ) -> AsyncGenerator[ModelEvent, None]:
        results = [m for m in messages if m.role == "tool"]
        if not results:
            for call in self.calls:
                yield call
            return
        yield TextDelta(" | ".join(m.content for m in results))


@tool
async def leaky(ctx: ToolContext) -> str:
    """Fails with text that must not reach anyone but the log."""
    raise RuntimeError("cannot open /srv/secrets/api-key.txt")


async def turn_events(agent: Agent, turn: Turn) -> list[Event]:
    async with asyncio.timeout(5):  # a round that waits for a lost result would hang here
        return [event async for event in agent.run([], turn)]


async def test_a_tool_that_crashes_tells_the_model_so_without_its_internals() -> None:
    call = ToolCallRequest(id="c1", name="leaky", arguments={})
    agent = Agent(TwoRounds(call), ToolRegistry([leaky]))
    turn = Turn(user("go"))
    events = await turn_events(agent, turn)
    result = next(e for e in events if isinstance(e, ToolResult))
    assert result.is_error
    assert result.result == "leaky failed with an internal error (RuntimeError)."
    assert "secrets" not in "".join(e.content for e in events if isinstance(e, Token))
    assert turn.finished


async def test_a_call_the_registry_cannot_even_look_up_still_gets_a_result() -> None:
    class Exploding(ToolRegistry):
        def get(self, name: str) -> Any:
            raise TypeError("unhashable name")

    calls = (
        ToolCallRequest(id="c1", name="anything", arguments={}),
        ToolCallRequest(id="c2", name="other", arguments={}),
    )
    turn = Turn(user("go"))
    events = await turn_events(Agent(TwoRounds(*calls), Exploding([leaky])), turn)
    assert [type(e) for e in events[:2]] == [ToolCall, ToolCall]
    results = [e for e in events if isinstance(e, ToolResult)]
    assert sorted(r.id for r in results) == ["c1", "c2"]
    assert all(r.is_error and "internal error" in r.result for r in results)
    # The stored turn keeps one tool message per call, as providers require.
    stored = turn.to_store()
    assert [m.role for m in stored] == ["user", "assistant", "tool", "tool", "assistant"]
