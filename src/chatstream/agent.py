"""The agent loop: model turn -> tool calls (concurrent, timed) -> model turn … -> answer.

``Agent.run`` is an async generator of stream events for one turn. It records
everything the turn produced in a ``Turn`` as it goes, so that whoever drives it
can store a consistent session whether the turn finishes, fails or is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from chatstream import messages as m
from chatstream.config import ToolSettings
from chatstream.errors import ToolError
from chatstream.events import Event, Token, ToolCall, ToolProgress, ToolResult
from chatstream.messages import Message, ToolCallRequest
from chatstream.models.base import Model, TextDelta, Usage
from chatstream.models.http import RAW_ARGUMENTS
from chatstream.prompts import SYSTEM_PROMPT
from chatstream.tools.base import ToolContext, ToolRegistry

log = logging.getLogger("chatstream.agent")


@dataclass(slots=True)
class Turn:
    """What one turn has produced so far: the messages to store and the usage spent."""

    user: Message
    steps: list[Message] = field(default_factory=list)
    answer: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finished: bool = False

    def to_store(self) -> list[Message]:
        """The user message, every finished tool round, and the answer.

        An unfinished turn (failure, cancel, lost connection) stores the text
        streamed so far as an answer marked ``interrupted``, so the session
        always alternates user/answer and the model later sees what was cut.
        """
        answer = m.assistant("".join(self.answer), interrupted=not self.finished)
        return [self.user, *self.steps, answer]

    @property
    def usage(self) -> dict[str, int]:
        return {
            "promptTokens": self.prompt_tokens,
            "completionTokens": self.completion_tokens,
            "totalTokens": self.prompt_tokens + self.completion_tokens,
        }


class Agent:
    """Drives turns of one model over one tool registry."""

    def __init__(
        self,
        model: Model,
        tools: ToolRegistry,
        *,
        max_tool_rounds: int = 5,
        tool_settings: ToolSettings | None = None,
        deps: object = None,
        system_prompt: str = SYSTEM_PROMPT,
    ) -> None:
        self.model = model
        self.tools = tools
        self.max_tool_rounds = max_tool_rounds
        self.tool_settings = tool_settings or ToolSettings()
        self.tool_timeout_s = self.tool_settings.tool_timeout_s
        # Handed to every tool as ``ctx.deps``: the application's own dependencies.
        self.deps = deps
        self.system_prompt = system_prompt

    async def run(
        self, history: Sequence[Message], turn: Turn, *, enable_tools: bool = True
    ) -> AsyncGenerator[Event, None]:
        """Stream one turn's events; ``turn`` records what to store."""
        conversation = [Message(role="system", content=self.system_prompt), *history, turn.user]
        specs = self.tools.specs() if enable_tools else []
        for round_index in range(self.max_tool_rounds + 1):
            # The last round offers no tools, so the model has to answer.
            offered = specs if round_index < self.max_tool_rounds else []
            calls: list[ToolCallRequest] = []
            turn.answer.clear()
            async with aclosing(self.model.stream(conversation + turn.steps, offered)) as stream:
                async for item in stream:
                    if isinstance(item, TextDelta):
                        if item.text:
                            turn.answer.append(item.text)
                            yield Token(item.text)
                    elif isinstance(item, ToolCallRequest):
                        if offered:  # a call in the round that offers no tools is ignored
                            calls.append(item)
                    elif isinstance(item, Usage):
                        turn.prompt_tokens += item.prompt_tokens
                        turn.completion_tokens += item.completion_tokens
            if not calls:
                turn.finished = True
                return
            turn.steps.append(m.assistant("".join(turn.answer), tool_calls=tuple(calls)))
            turn.answer.clear()
            results: dict[str, Message] = {}
            try:
                async for event in self._run_tools(calls):
                    if isinstance(event, ToolResult):
                        call = next(c for c in calls if c.id == event.id)
                        results[event.id] = m.tool_result(
                            call, event.result, is_error=event.is_error
                        )
                    yield event
            finally:
                # Keep the stored history valid for providers: every call gets a
                # result, in the order the model asked, even when cut short.
                turn.steps.extend(
                    results.get(c.id)
                    or m.tool_result(c, "The tool was stopped before it finished.", is_error=True)
                    for c in calls
                )

    async def _run_tools(self, calls: list[ToolCallRequest]) -> AsyncIterator[Event]:
        """Run calls concurrently; yield each call, then progress and results as they happen."""
        updates: asyncio.Queue[Event] = asyncio.Queue()
        for call in calls:
            yield ToolCall(id=call.id, tool=call.name, args=call.arguments)
        tasks = [asyncio.create_task(self._run_one(call, updates)) for call in calls]
        try:
            pending = len(calls)
            while pending:
                event = await updates.get()
                if isinstance(event, ToolResult):
                    pending -= 1
                yield event
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run_one(self, call: ToolCallRequest, updates: asyncio.Queue[Event]) -> None:
        def report(message: str, progress: float | None) -> None:
            updates.put_nowait(ToolProgress(call.id, call.name, message, progress))

        try:
            ctx = ToolContext[Any](report, self.tool_settings, self.deps)
            result, is_error = await self._call(call, ctx)
        except Exception:
            # Whatever fails here, the round waits for one result per call: never leave it
            # waiting until the turn times out.
            log.exception("tool call %s of %r failed", call.id, call.name)
            result, is_error = f"{call.name} failed with an internal error.", True
        updates.put_nowait(ToolResult(call.id, call.name, result, is_error))

    async def _call(self, call: ToolCallRequest, ctx: ToolContext) -> tuple[str, bool]:
        tool = self.tools.get(call.name)
        if tool is None:
            return f"There is no tool called {call.name!r}.", True
        if RAW_ARGUMENTS in call.arguments:
            raw = str(call.arguments[RAW_ARGUMENTS])[:200]
            return f"The arguments for {call.name} were not a JSON object: {raw}", True
        timeout_s = tool.timeout_s or self.tool_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                return await tool(ctx, call.arguments), False
        except ToolError as exc:
            return exc.message, True
        except TimeoutError:
            return f"{call.name} timed out after {timeout_s:g} s.", True
        except Exception as exc:
            # The exception's text stays in the log: it may name files, hosts or secrets.
            log.exception("tool %s failed", call.name)
            return f"{call.name} failed with an internal error ({type(exc).__name__}).", True
