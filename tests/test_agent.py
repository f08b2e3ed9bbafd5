"""The agent loop on its own: a model double that asks for tools, real tools, no server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import BaseModel

from chatstream.agent import CANCEL_GRACE_S, Agent, Turn
from chatstream.config import ToolSettings
from chatstream.events import Event, Token, ToolCall, ToolProgress, ToolResult
from chatstream.messages import Message, ToolCallRequest, user
from chatstream.models.base import ModelEvent, TextDelta, ToolSpec
from chatstream.tools import Tool, ToolContext, ToolRegistry, tool


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


class Stops(BaseException):
    """Not an Exception: what a library's own 'stop everything' may raise."""


def raising(kind: type[BaseException]) -> Tool:
    @tool(name=f"raises_{kind.__name__}")
    async def raises(ctx: ToolContext) -> str:
        """Raises what is no tool's to raise."""
        raise kind()

    return raises


@pytest.mark.parametrize(
    "kind", [SystemExit, KeyboardInterrupt, Stops, asyncio.CancelledError, GeneratorExit]
)
async def test_a_tool_that_raises_past_exception_fails_its_call_not_the_server(
    kind: type[BaseException],
) -> None:
    # SystemExit (argparse in a tool) used to stop the event loop, and every stream.
    broken = raising(kind)
    call = ToolCallRequest(id="c1", name=broken.name, arguments={})
    turn = Turn(user("go"))
    events = await turn_events(Agent(TwoRounds(call), ToolRegistry([broken])), turn)
    result = next(e for e in events if isinstance(e, ToolResult))
    assert result.is_error
    assert result.result == f"{broken.name} failed with an internal error ({kind.__name__})."
    assert turn.finished


@tool
async def deaf(ctx: ToolContext) -> str:
    """Catches every cancel and goes on (for 3 s, so that the test's loop can close)."""
    until = time.monotonic() + 3
    while time.monotonic() < until:
        try:
            await asyncio.sleep(0.05)
        except BaseException:
            pass
    return "finished at last"


async def test_a_tool_that_ignores_its_timeout_is_left_behind() -> None:
    call = ToolCallRequest(id="c1", name="deaf", arguments={})
    agent = Agent(TwoRounds(call), ToolRegistry([deaf]), tool_settings=ToolSettings(0.2))
    turn = Turn(user("go"))
    started = time.monotonic()
    events = await turn_events(agent, turn)
    assert time.monotonic() - started < 0.2 + CANCEL_GRACE_S + 1
    result = next(e for e in events if isinstance(e, ToolResult))
    assert (result.is_error, result.result) == (True, "deaf timed out after 0.2 s.")
    assert turn.finished


async def test_a_cancelled_turn_ends_though_its_tool_ignores_the_cancel() -> None:
    call = ToolCallRequest(id="c1", name="deaf", arguments={})
    turn = Turn(user("go"))
    events = Agent(TwoRounds(call), ToolRegistry([deaf])).run([], turn)

    async def drive() -> None:
        async for _ in events:
            pass

    task = asyncio.create_task(drive())
    await asyncio.sleep(0.2)  # the call runs
    task.cancel()
    started = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, CANCEL_GRACE_S + 2)
    assert time.monotonic() - started < CANCEL_GRACE_S + 1
    # The stored turn has the call's result, as providers require.
    assert [s.role for s in turn.steps] == ["assistant", "tool"]


async def test_a_turn_closed_mid_round_has_each_call_answered_at_once() -> None:
    # The run closes the turn's events when it is cut (a cancel, the event cap); the
    # round's results must be in the turn then, not when the garbage collector runs.
    call = ToolCallRequest(id="c1", name="deaf", arguments={})
    turn = Turn(user("go"))
    events = Agent(TwoRounds(call), ToolRegistry([deaf])).run([], turn)
    async for event in events:
        if isinstance(event, ToolCall):
            break
    await events.aclose()
    assert [s.role for s in turn.steps] == ["assistant", "tool"]
    assert turn.steps[1].is_error


@dataclass
class Reading:
    celsius: float


class Point(BaseModel):
    x: int


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ({"a": 1, "b": [True, None]}, '{"a":1,"b":[true,null]}'),
        (None, "null"),
        (float("nan"), "null"),
        (42, "42"),
        (Reading(21.5), '{"celsius":21.5}'),
        (Point(x=3), '{"x":3}'),
        ("half \ud800 pair", "half \ufffd pair"),
    ],
    ids=["dict", "none", "nan", "int", "dataclass", "pydantic", "surrogate"],
)
async def test_a_result_that_is_not_plain_text_is_written_as_text(value: object, text: str) -> None:
    @tool
    async def gives(ctx: ToolContext) -> str:
        """Returns whatever it was given."""
        return value  # type: ignore[return-value]

    call = ToolCallRequest(id="c1", name="gives", arguments={})
    turn = Turn(user("go"))
    events = await turn_events(Agent(TwoRounds(call), ToolRegistry([gives])), turn)
    result = next(e for e in events if isinstance(e, ToolResult))
    assert (result.is_error, result.result) == (False, text)
    assert turn.steps[1].content == text
    turn.to_store()[1].to_dict()  # storable as it is


async def test_a_result_with_no_text_to_give_is_the_tools_error() -> None:
    @tool
    async def raw(ctx: ToolContext) -> str:
        """Returns bytes."""
        return b"\x00\xff"  # type: ignore[return-value]

    call = ToolCallRequest(id="c1", name="raw", arguments={})
    events = await turn_events(Agent(TwoRounds(call), ToolRegistry([raw])), Turn(user("go")))
    result = next(e for e in events if isinstance(e, ToolResult))
    assert result.is_error
    assert result.result.startswith("raw returned bytes, which is not text")


async def test_a_huge_result_is_cut_to_the_bound_saying_so() -> None:
    @tool
    async def huge(ctx: ToolContext) -> str:
        """Returns a lot."""
        return "x" * 5_000

    call = ToolCallRequest(id="c1", name="huge", arguments={})
    settings = ToolSettings(tool_max_result_chars=1_000)
    agent = Agent(TwoRounds(call), ToolRegistry([huge]), tool_settings=settings)
    events = await turn_events(agent, Turn(user("go")))
    result = next(e for e in events if isinstance(e, ToolResult))
    assert result.result.startswith("x" * 1_000 + "\n[cut: the result had 5,000 characters")
    assert len(result.result) < 1_100


async def test_a_flood_of_progress_is_thinned_and_ends_with_its_last_report() -> None:
    @tool
    async def chatty(ctx: ToolContext) -> str:
        """Reports every step of many."""
        for i in range(100_000):
            ctx.progress(f"step {i + 1}", (i + 1) / 100_000)
            if i % 1_000 == 0:
                await asyncio.sleep(0.001)
        return "done"

    call = ToolCallRequest(id="c1", name="chatty", arguments={})
    events = await turn_events(Agent(TwoRounds(call), ToolRegistry([chatty])), Turn(user("go")))
    reports = [e for e in events if isinstance(e, ToolProgress)]
    assert 1 <= len(reports) < 200
    assert (reports[-1].message, reports[-1].progress) == ("step 100000", 1.0)
    kinds = [type(e) for e in events]
    assert kinds.index(ToolResult) > kinds.index(ToolProgress)
