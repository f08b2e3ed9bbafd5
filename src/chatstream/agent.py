"""The agent loop: model turn -> tool calls (concurrent, timed) -> model turn … -> answer.

``Agent.run`` is an async generator of stream events for one turn. It records
everything the turn produced in a ``Turn`` as it goes, so that whoever drives it
can store a consistent session whether the turn finishes, fails or is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any

from chatstream import messages as m
from chatstream.approvals import Answer, Gate, Pending, Verdict, iso, refusal
from chatstream.config import ToolSettings
from chatstream.errors import ToolError
from chatstream.events import ApprovalRequired, Event, Token, ToolCall, ToolProgress, ToolResult
from chatstream.messages import Message, ToolCallRequest
from chatstream.models.base import Model, TextDelta, Usage
from chatstream.models.http import RAW_ARGUMENTS
from chatstream.prompts import SYSTEM_PROMPT
from chatstream.tools.base import Tool, ToolContext, ToolRegistry
from chatstream.tools.results import as_text, bounded, clean

log = logging.getLogger("chatstream.agent")


@dataclass(slots=True)
class Turn:
    """What one turn has produced so far: the messages to store and the usage spent.

    ``user`` is None for a turn that continues a parked one (its user message is stored).
    ``approvals`` says, per call that needed approval, how it stands (``Verdict``).
    """

    user: Message | None
    # Stored before ``user``: the end of a parked turn that this one's message leaves.
    prelude: list[Message] = field(default_factory=list)
    steps: list[Message] = field(default_factory=list)
    answer: list[str] = field(default_factory=list)
    approvals: dict[str, str] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finished: bool = False
    # Set when the server stops while a call waits: stored up to the call, to go on later.
    parked: bool = False
    # The run driving the turn: a pending call is stored with it, to be answered there.
    run_id: str | None = None
    # Set for a regenerated answer: the position of the stored turn it replaces.
    replace_from: int | None = None

    def to_store(self) -> list[Message]:
        """The user message, every finished tool round, and the answer.

        An unfinished turn (failure, cancel, lost connection) stores the text
        streamed so far as an answer marked ``interrupted``, so the session
        always alternates user/answer and the model later sees what was cut.
        A parked turn ends at its tool round, with the calls still waiting marked
        ``pending``: the run that continues it appends the rest.
        """
        steps = [self._with_approvals(step) for step in self.steps]
        head = [*self.prelude, *([self.user] if self.user is not None else [])]
        if self.parked:
            return [*head, *steps]
        answer = m.assistant("".join(self.answer), interrupted=not self.finished)
        return [*head, *steps, answer]

    def _with_approvals(self, step: Message) -> Message:
        if not self.approvals or not any(c.id in self.approvals for c in step.tool_calls):
            return step
        calls = tuple(self._call_with_approval(c) for c in step.tool_calls)
        return replace(step, tool_calls=calls)

    def _call_with_approval(self, call: ToolCallRequest) -> ToolCallRequest:
        approval = self.approvals.get(call.id)
        if approval is None:
            return call
        run_id = self.run_id if approval == Verdict.PENDING else None
        return replace(call, approval=approval, run_id=run_id)

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
        approval_timeout_s: float = 600.0,
    ) -> None:
        self.model = model
        self.tools = tools
        self.max_tool_rounds = max_tool_rounds
        self.tool_settings = tool_settings or ToolSettings()
        self.tool_timeout_s = self.tool_settings.tool_timeout_s
        # Handed to every tool as ``ctx.deps``: the application's own dependencies.
        self.deps = deps
        self.system_prompt = system_prompt
        self.approval_timeout_s = approval_timeout_s

    def gate(self) -> Gate:
        """A gate for a turn run on its own, outside a run manager: answers come from
        ``Gate.resolve`` and nothing else; an unanswered call expires."""

        async def ask(calls: Sequence[Pending]) -> None:
            return None

        async def expire(call_id: str) -> Answer:
            return Answer(call_id, Verdict.EXPIRED)

        return Gate(timeout_s=self.approval_timeout_s, ask=ask, expire=expire)

    async def run(
        self,
        history: Sequence[Message],
        turn: Turn,
        *,
        enable_tools: bool = True,
        gate: Gate | None = None,
        waiting: Sequence[Pending] = (),
    ) -> AsyncGenerator[Event, None]:
        """Stream one turn's events; ``turn`` records what to store.

        ``waiting`` continues a parked turn: ``history`` ends with its tool round, and
        these are its calls still waiting for approval; that round is finished first.
        """
        gate = gate or self.gate()
        head = [turn.user] if turn.user is not None else []
        conversation = [Message(role="system", content=self.system_prompt), *history, *head]
        specs = self.tools.specs() if enable_tools else []
        first_round = 0
        if waiting:
            calls = [ToolCallRequest(p.call_id, p.tool, p.args) for p in waiting]
            expiry = {p.call_id: p.expires_at for p in waiting}
            async with aclosing(self._tool_round(calls, turn, gate, expiry)) as events:
                async for event in events:
                    yield event
            first_round = 1
        for round_index in range(first_round, self.max_tool_rounds + 1):
            # The last round offers no tools, so the model has to answer.
            offered = specs if round_index < self.max_tool_rounds else []
            calls = []
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
            # aclosing: a turn cut here (a cancel, the event cap) gives each call its
            # result in ``turn.steps`` now, before the turn is stored, not when the
            # garbage collector finalises the round.
            async with aclosing(self._tool_round(calls, turn, gate, {})) as events:
                async for event in events:
                    yield event

    def needs_approval(self, call: ToolCallRequest) -> bool:
        try:
            tool = self.tools.get(call.name)
        except Exception:
            # A registry that cannot look the call up cannot run it either: it fails in
            # ``_call`` with a result, as any other broken call does.
            return False
        return tool is not None and tool.approval and RAW_ARGUMENTS not in call.arguments

    async def _tool_round(
        self, calls: list[ToolCallRequest], turn: Turn, gate: Gate, expiry: dict[str, float]
    ) -> AsyncGenerator[Event, None]:
        """Run one round's calls, asking first for those that need approval; every call
        ends up with a result in ``turn.steps``, in the order the model asked."""
        now = time.time()
        asks = [
            Pending(c.id, c.name, c.arguments, expiry.get(c.id, now + gate.timeout_s))
            for c in calls
            if self.needs_approval(c)
        ]
        results: dict[str, Message] = {}
        try:
            for call in calls:
                yield ToolCall(id=call.id, tool=call.name, args=call.arguments)
            if asks:
                # Asked together, before anyone can see the request: an answer that comes
                # the moment the event is read must find the call waiting.
                for ask in asks:
                    turn.approvals[ask.call_id] = Verdict.PENDING
                await gate.ask(asks)
                for ask in asks:
                    if gate.is_pending(ask.call_id):
                        yield ApprovalRequired(ask.call_id, ask.tool, ask.args, iso(ask.expires_at))
            waits = {ask.call_id: ask for ask in asks}
            async with aclosing(self._run_tools(calls, turn, gate, waits)) as events:
                async for event in events:
                    if isinstance(event, ToolResult):
                        call = next(c for c in calls if c.id == event.id)
                        results[event.id] = m.tool_result(
                            call,
                            event.result,
                            is_error=event.is_error,
                            approval=turn.approvals.get(call.id),
                        )
                    yield event
        finally:
            # Keep the stored history valid for providers: every call gets a result, in
            # the order the model asked, even when cut short; a parked turn leaves its
            # waiting calls pending, to be answered after the restart.
            for call in calls:
                result = results.get(call.id)
                if result is None:
                    result = self._unfinished(call, turn, gate)
                if result is not None:
                    turn.steps.append(result)

    def _unfinished(self, call: ToolCallRequest, turn: Turn, gate: Gate) -> Message | None:
        if turn.approvals.get(call.id) != Verdict.PENDING:
            return m.tool_result(call, "The tool was stopped before it finished.", is_error=True)
        if gate.parking:
            return None
        turn.approvals[call.id] = Verdict.CANCELLED
        answer = Answer(call.id, Verdict.CANCELLED)
        text = refusal(call.name, answer, gate.timeout_s)
        return m.tool_result(call, text, is_error=True, approval=Verdict.CANCELLED)

    async def _run_tools(
        self,
        calls: list[ToolCallRequest],
        turn: Turn,
        gate: Gate,
        waits: dict[str, Pending],
    ) -> AsyncGenerator[Event, None]:
        """Run calls concurrently; yield progress and results as they happen."""
        updates: asyncio.Queue[Event] = asyncio.Queue()
        tasks = [
            asyncio.create_task(self._run_one(call, updates, turn, gate, waits.get(call.id)))
            for call in calls
        ]
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

    async def _run_one(
        self,
        call: ToolCallRequest,
        updates: asyncio.Queue[Event],
        turn: Turn,
        gate: Gate,
        waiting: Pending | None,
    ) -> None:
        progress = _Progress(call, updates)
        if waiting is not None:
            # Nothing of the tool runs before a person says yes.
            try:
                answer = await gate.wait(waiting)
            except Exception:
                # The shared state failed to record the expiry: it expired all the same.
                log.exception("approval of call %s could not be settled", call.id)
                answer = Answer(call.id, Verdict.EXPIRED)
            turn.approvals[call.id] = answer.verdict
            if not answer.approved:
                text = refusal(call.name, answer, gate.timeout_s)
                updates.put_nowait(ToolResult(call.id, call.name, text, True, answer.verdict))
                return
        try:
            ctx = ToolContext[Any](progress.report, self.tool_settings, self.deps)
            result, is_error = await self._call(call, ctx)
        except Exception:
            # Whatever fails here, the round waits for one result per call: never leave it
            # waiting until the turn times out.
            log.exception("tool call %s of %r failed", call.id, call.name)
            result, is_error = f"{call.name} failed with an internal error.", True
        result = bounded(clean(result), self.tool_settings.tool_max_result_chars)
        approval = turn.approvals.get(call.id)
        progress.end()
        updates.put_nowait(ToolResult(call.id, call.name, result, is_error, approval))

    async def _call(self, call: ToolCallRequest, ctx: ToolContext) -> tuple[str, bool]:
        tool = self.tools.get(call.name)
        if tool is None:
            return f"There is no tool called {call.name!r}.", True
        if RAW_ARGUMENTS in call.arguments:
            raw = str(call.arguments[RAW_ARGUMENTS])[:200]
            return f"The arguments for {call.name} were not a JSON object: {raw}", True
        timeout_s = tool.timeout_s or self.tool_timeout_s
        try:
            value = await _within(_guarded(tool, ctx, call.arguments), timeout_s)
            return as_text(value, call.name), False
        except ToolError as exc:
            return exc.message, True
        except _TimedOut:
            return f"{call.name} timed out after {timeout_s:g} s.", True
        except _Escaped as exc:
            log.error("tool %s raised %s", call.name, exc.kind, exc_info=exc.__cause__)
            return f"{call.name} failed with an internal error ({exc.kind}).", True
        except Exception as exc:
            # The exception's text stays in the log: it may name files, hosts or secrets.
            log.exception("tool %s failed", call.name)
            return f"{call.name} failed with an internal error ({type(exc).__name__}).", True


# A call's progress goes out as it comes for a burst of PROGRESS_BURST updates, then at
# PROGRESS_RATE a second at most; an update that must wait is replaced by a newer one. A
# tool that reports each of 100,000 steps would otherwise fill the run's event log (and
# end its turn), and no person reads 1,000 updates a second.
PROGRESS_BURST = 10
PROGRESS_RATE = 20.0


class _Progress:
    """One call's progress reports, passed on within ``PROGRESS_BURST``/``PROGRESS_RATE``."""

    def __init__(self, call: ToolCallRequest, updates: asyncio.Queue[Event]) -> None:
        self._call = call
        self._updates = updates
        self._loop = asyncio.get_running_loop()
        self._allowance = float(PROGRESS_BURST)
        self._counted_at = self._loop.time()
        self._held: ToolProgress | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._ended = False

    def report(self, message: str, progress: float | None) -> None:
        if self._ended:
            return  # after the call's result: nobody reads it any more
        event = ToolProgress(self._call.id, self._call.name, message, progress)
        if self._held is None and self._refilled() >= 1:
            self._send(event)
            return
        self._held = event
        if self._timer is None:
            wait = (1 - self._allowance) / PROGRESS_RATE
            self._timer = self._loop.call_later(wait, self._flush)

    def end(self) -> None:
        """Before the call's result: what is held goes out first, then nothing more."""
        if self._timer is not None:
            self._timer.cancel()
        self._flush()
        self._ended = True

    def _refilled(self) -> float:
        now = self._loop.time()
        gained = (now - self._counted_at) * PROGRESS_RATE
        self._allowance = min(float(PROGRESS_BURST), self._allowance + gained)
        self._counted_at = now
        return self._allowance

    def _flush(self) -> None:
        self._timer = None
        if self._held is not None:
            held, self._held = self._held, None
            self._refilled()
            self._send(held)

    def _send(self, event: ToolProgress) -> None:
        self._allowance -= 1
        self._updates.put_nowait(event)


# How long a tool call that was cancelled (stopped, timed out) gets to end before it is
# left to itself: a tool that catches the cancel and goes on must not hold the turn.
CANCEL_GRACE_S = 1.0


class _TimedOut(Exception):
    """A tool call ran past its time limit (a tool's own TimeoutError is its failure)."""


class _Escaped(Exception):
    """A tool raised what is not an ``Exception``: ``kind`` names it."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


async def _guarded(tool: Tool, ctx: ToolContext[Any], arguments: dict[str, Any]) -> object:
    """Await the tool; what it raises that is not an ``Exception`` becomes ``_Escaped``.

    A ``SystemExit`` or ``KeyboardInterrupt`` (argparse or click inside a tool) would
    stop the event loop and every stream with it, and a ``CancelledError`` of the
    tool's own would pass for a cancel of the turn: none of them is the tool's to give.
    """
    try:
        return await tool(ctx, arguments)
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # a cancel of this call: it passes on
        raise _Escaped("CancelledError") from None
    except Exception:
        raise
    except BaseException as exc:
        raise _Escaped(type(exc).__name__) from exc


async def _within(call: Awaitable[object], timeout_s: float) -> object:
    """``await call`` in a task of its own, for at most ``timeout_s`` (``_TimedOut``).

    Timed out or cancelled from here, the task is cancelled and given
    ``CANCEL_GRACE_S`` to end, then left running: a tool that ignores its cancel
    cannot keep its turn (and its session) from ending.
    """
    task = asyncio.ensure_future(call)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
    except asyncio.CancelledError:
        await _let_go(task)
        raise
    if not done:
        await _let_go(task)
        raise _TimedOut
    return task.result()


async def _let_go(task: asyncio.Future[object]) -> None:
    task.cancel()
    await asyncio.wait({task}, timeout=CANCEL_GRACE_S)
    if not task.done():
        log.warning("a tool call goes on after its cancel; it is left running, unheard")
    task.add_done_callback(_forget)


def _forget(task: asyncio.Future[object]) -> None:
    """Retrieve what a task that nobody awaits any more ended with, so it is not reported."""
    if not task.cancelled():
        task.exception()
