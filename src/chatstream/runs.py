"""Runs: turns that outlive the connection that started them.

A ``Run`` is one turn running in this process: its task, its log (``runlog.Log``), and
why it was stopped, if it was. The connection that starts a run is only its log's first
reader. When the last reader leaves, the run keeps going for a grace period so that it
can be resumed (``Last-Event-ID``); if nobody comes back it is cancelled. A finished
run's log is kept for ``run_ttl_s`` so that a late resume still gets its ending.

``RunManager`` starts runs, opens their logs for readers, enforces one active run per
session, cancels and drains them. It always has a ``RunLog`` (where logs are shared) and
a ``Coordinator`` (who holds which session, runs' states, messages to a run's owner):
in this process by default, in Redis for several instances. Which one it has changes
nothing here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TypeVar

from chatstream import messages as m
from chatstream.agent import Agent, Turn
from chatstream.config import Settings
from chatstream.coordinator import (
    Coordinator,
    MemoryCoordinator,
    Message,
    RunState,
    RunStatus,
)
from chatstream.errors import (
    ChatstreamError,
    ErrorCode,
    ModelError,
    Refused,
    SessionBusy,
    ShuttingDown,
    StoreError,
)
from chatstream.events import Done, Error, Token, ToolResult
from chatstream.metrics import Metrics
from chatstream.runlog import Entry, Log, MemoryRunLog, Reader, RunLog
from chatstream.store.base import SessionRef, SessionStore

log = logging.getLogger("chatstream.runs")
T = TypeVar("T")

__all__ = ["Run", "RunManager", "RunState", "RunStatus", "StopReason"]


@dataclass(frozen=True, slots=True)
class StopReason:
    """Why a run was cancelled: the error event its readers get."""

    code: ErrorCode
    message: str


STOPPED = StopReason(ErrorCode.CANCELLED, "The run was stopped.")
ABANDONED = StopReason(ErrorCode.CANCELLED, "Nobody was listening, so the run was stopped.")
SHUTTING_DOWN = StopReason(
    ErrorCode.SHUTTING_DOWN, "The server is restarting; the partial answer was saved. Try again."
)
LOCK_LOST = StopReason(
    ErrorCode.RUN_LOST,
    "This server could not reach the session store for longer than a turn holds its session, "
    "and the turn was given up for lost; it was stopped.",
)


class Run:
    """One turn running in this process: its task, its log, and how it ends."""

    def __init__(
        self, run_id: str, session: SessionRef, log: Log, *, max_events: int, resume_grace_s: float
    ) -> None:
        self.id = run_id
        self.session = session
        self.log = log
        self.state = RunState.RUNNING
        self.created_at = time.time()
        self.task: asyncio.Task[None] | None = None
        self.stop_reason: StopReason | None = None
        # Cleared once the turn is being stored: a cancel then would lose the write.
        self.stoppable = True
        # Set once the turn is in the store: the session then shows it, not the run.
        self.stored = False
        self._max_events = max_events
        self._resume_grace_s = resume_grace_s
        self._grace_timer: asyncio.TimerHandle | None = None
        self._finished = asyncio.Event()
        log.on_idle = self._idle

    @property
    def session_id(self) -> str:
        return self.session.id

    @property
    def finished(self) -> bool:
        return self.state is not RunState.RUNNING

    @property
    def last_seq(self) -> int:
        return self.log.last_seq

    @property
    def full(self) -> bool:
        # One slot stays free for the terminal event.
        return len(self.log.entries) >= self._max_events - 1

    @property
    def status(self) -> RunStatus:
        return RunStatus(self.id, self.session, self.state, self.log.last_seq)

    def mark_finished(self, state: RunState) -> None:
        self.state = state
        self._cancel_grace_timer()
        self._finished.set()

    async def wait_finished(self) -> None:
        await self._finished.wait()

    def cancel(self, reason: StopReason) -> bool:
        """Ask the run's task to stop; its readers get ``reason`` as an error event."""
        if self.finished or self.task is None or not self.stoppable:
            return False
        if self.stop_reason is None:
            self.stop_reason = reason
        self.task.cancel()
        return True

    def _idle(self) -> None:
        # The last reader left: the run goes on for the grace period, then stops.
        if self.finished:
            return
        self._cancel_grace_timer()
        loop = asyncio.get_running_loop()
        self._grace_timer = loop.call_later(self._resume_grace_s, self._abandon)

    def _abandon(self) -> None:
        self._grace_timer = None
        if not self.log.readers:
            log.info("run %s abandoned after %.0f s without readers", self.id, self._resume_grace_s)
            self.cancel(ABANDONED)

    def _cancel_grace_timer(self) -> None:
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None


def new_run_id() -> str:
    return "run_" + secrets.token_hex(8)


def new_session_id() -> str:
    return "s_" + secrets.token_hex(8)


def _store_unavailable(exc: ChatstreamError) -> StoreError:
    # What failed (a host, a port, a driver's words) is for the log, not for the client.
    log.warning("session store unavailable: %s", exc.message)
    return StoreError("The session store is unavailable; try again shortly.")


class RunManager:
    """Starts, opens, cancels and drains runs, over a run log and a coordinator."""

    def __init__(
        self,
        *,
        agent: Agent,
        store: SessionStore,
        settings: Settings,
        log: RunLog | None = None,
        coordinator: Coordinator | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.agent = agent
        self.store = store
        self.settings = settings
        self.log: RunLog = log or MemoryRunLog(ttl_s=settings.streams.run_ttl_s)
        self.coordinator: Coordinator = coordinator or MemoryCoordinator(
            ttl_s=settings.streams.run_ttl_s
        )
        self.coordinator.listen(self._on_message)
        self.metrics = metrics or Metrics()
        self.metrics.track_active_runs(lambda: len(self._active))
        self.accepting = True
        # Runs of this process by id (until their log expires) and by session while active.
        self._runs: dict[str, Run] = {}
        self._active: dict[str, Run] = {}
        self._expiry: dict[str, asyncio.TimerHandle] = {}

    @property
    def active_count(self) -> int:
        return len(self._active)

    def get(self, run_id: str) -> Run | None:
        """A run this process executes (or executed, until it expires)."""
        return self._runs.get(run_id)

    def active_run(self, session: SessionRef) -> Run | None:
        return self._active.get(session.key)

    async def _shared(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except ChatstreamError as exc:
            raise _store_unavailable(exc) from exc

    async def open(self, run_id: str, after_seq: int, *, caller: str) -> Reader | None:
        """A reader of a run's events after ``after_seq``, wherever the run runs.

        None when nothing is left to read: the run is unknown, expired, another caller's
        (as if it did not exist), or already read to its end.
        """
        run = self._runs.get(run_id)
        if run is not None:
            if not run.session.owned_by(caller):
                return None
            log_of_run: Log | None = run.log
        else:
            log_of_run = await self._shared(self.log.open(run_id, after_seq, owner=caller))
        if log_of_run is None:
            return None
        reader = log_of_run.reader(after_seq)
        if reader.delivered:
            reader.close()
            return None
        return reader

    async def active_run_id(self, session: SessionRef) -> str | None:
        """The run busy in a session, on any instance."""
        run = self._active.get(session.key)
        if run is not None:
            # Once stored, the turn is in the session: a reader must not also replay the run.
            return None if run.stored else run.id
        return await self._shared(self.coordinator.holder(session))

    async def start(self, session: SessionRef, message: str, *, enable_tools: bool = True) -> Run:
        """Start a turn in a session; refuse when that session already has one running."""
        if not self.accepting:
            raise ShuttingDown("The server is shutting down and takes no new turns.")
        busy = self._active.get(session.key)
        if busy is not None:
            raise SessionBusy(
                f"Session {session.id!r} already has a turn running "
                f"(run {busy.id}); wait for it, resume it or cancel it."
            )
        run_id = new_run_id()
        run = Run(
            run_id,
            session,
            self.log.create(run_id, session),
            max_events=self.settings.streams.run_log_max_events,
            resume_grace_s=self.settings.streams.resume_grace_s,
        )
        # Claim the session before the first await, so two requests cannot both start.
        self._active[session.key] = run
        self._runs[run.id] = run
        claimed = False
        try:
            holder = await self.coordinator.claim(run.id, session)
            if holder is not None:
                raise SessionBusy(
                    f"Session {session.id!r} already has a turn running (run {holder}); "
                    "wait for it, resume it or cancel it."
                )
            claimed = True
            stored = await self.store.load(session)
        except BaseException as exc:
            self._release(run)
            self._runs.pop(run.id, None)
            self.log.expire(run.id)
            if claimed:
                with contextlib.suppress(ChatstreamError):
                    await self.coordinator.release(RunStatus(run.id, session, RunState.FAILED))
            if isinstance(exc, ChatstreamError) and not isinstance(exc, Refused):
                raise _store_unavailable(exc) from exc
            raise
        history = stored.messages[-self.settings.turns.max_history_messages :] if stored else ()
        # A trimmed history must not start inside a tool round: begin at a user message.
        while history and history[0].role != "user":
            history = history[1:]
        turn = Turn(m.user(message))
        run.task = asyncio.create_task(
            self._drive(run, history, turn, enable_tools), name=f"chatstream-{run.id}"
        )
        self.coordinator.keep(run.id, session, on_lost=lambda: self._lost(run))
        return run

    def _lost(self, run: Run) -> None:
        if run.cancel(LOCK_LOST):
            log.warning("run %s: stopped, another run holds its session", run.id)

    async def _drive(
        self, run: Run, history: tuple[m.Message, ...], turn: Turn, enable_tools: bool
    ) -> None:
        outcome: Error | None = None
        state = RunState.FAILED
        metrics = self.metrics
        started = time.perf_counter()
        tokens = 0
        try:
            async with (
                asyncio.timeout(self.settings.turns.turn_timeout_s),
                # Closed on every exit (OUTPUT_LIMIT's break too), so running tools stop and
                # their results are in ``turn`` before it is stored.
                aclosing(self.agent.run(history, turn, enable_tools=enable_tools)) as events,
            ):
                async for event in events:
                    run.log.append(event)
                    if type(event) is Token:
                        tokens += 1
                        if tokens == 1:
                            metrics.time_to_first_token.observe(time.perf_counter() - started)
                    elif isinstance(event, ToolResult):
                        outcome_label = "error" if event.is_error else "ok"
                        metrics.tool_calls.labels(event.tool, outcome_label).inc()
                    if run.full:
                        outcome = Error(
                            ErrorCode.OUTPUT_LIMIT,
                            "The answer reached the limit of "
                            f"{self.settings.streams.run_log_max_events} events and was cut.",
                        )
                        break
        except TimeoutError:
            outcome = Error(
                ErrorCode.TIMEOUT,
                f"The turn took longer than {self.settings.turns.turn_timeout_s:g} s.",
            )
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            reason = run.stop_reason or STOPPED
            outcome = Error(reason.code, reason.message)
            state = RunState.CANCELLED
        except ModelError as exc:
            outcome = Error(exc.code, exc.message)
        except Exception:
            log.exception("run %s failed", run.id)
            outcome = Error(
                ErrorCode.INTERNAL_ERROR, "The turn failed because of an internal error."
            )
        await self._store_and_finish(run, turn, outcome, state)
        metrics.tokens_out.inc(tokens)
        metrics.turn_duration.observe(time.perf_counter() - started)
        ending = "done" if run.state is RunState.DONE else (outcome.code if outcome else "failed")
        metrics.runs.labels(ending.lower()).inc()
        if outcome is not None and outcome.code == ErrorCode.MODEL_ERROR:
            metrics.model_errors.inc()

    async def _store_and_finish(
        self, run: Run, turn: Turn, outcome: Error | None, state: RunState
    ) -> None:
        run.stoppable = False
        terminal: Done | Error
        if outcome is not None and outcome.code == ErrorCode.RUN_LOST:
            # The session's lock went to a newer turn: storing this one would write over it.
            terminal = outcome
        else:
            try:
                session = await self.store.append(run.session, turn.to_store())
                run.stored = True
            except Exception:
                log.exception("run %s: storing the turn failed", run.id)
                terminal = Error(
                    ErrorCode.INTERNAL_ERROR, "The turn could not be saved: the store failed."
                )
                state = RunState.FAILED
            else:
                if outcome is None:
                    terminal = Done(run.session_id, session.history_length, run.id, turn.usage)
                    state = RunState.DONE
                else:
                    terminal = outcome
        ending: Entry | None = None
        try:
            # Shared state first: a client that sends its next turn the moment it reads
            # the ending must find the session free on every instance.
            ending = await self.log.finish(run.log, terminal)
            if ending.event is not terminal:
                state = RunState.FAILED  # the shared log ended otherwise (RUN_LOST)
            await self.coordinator.release(RunStatus(run.id, run.session, state, ending.seq))
        finally:
            run.log.end(ending or run.log.next_entry(terminal))
            run.mark_finished(state)
            self._release(run)
            loop = asyncio.get_running_loop()
            self._expiry[run.id] = loop.call_later(
                self.settings.streams.run_ttl_s, self._expire, run.id
            )

    def _release(self, run: Run) -> None:
        if self._active.get(run.session.key) is run:
            del self._active[run.session.key]

    def _expire(self, run_id: str) -> None:
        self._expiry.pop(run_id, None)
        self._runs.pop(run_id, None)

    def _on_message(self, run_id: str, message: Message) -> None:
        if message is Message.CANCEL:
            self.cancel_local(run_id, STOPPED)

    def cancel_local(self, run_id: str, reason: StopReason = STOPPED) -> Run | None:
        """Stop a run this process executes; None when it executes no such run."""
        run = self._runs.get(run_id)
        if run is not None:
            run.cancel(reason)
        return run

    async def cancel(self, run_id: str, *, caller: str) -> tuple[RunStatus, bool] | None:
        """Stop a run wherever it runs and wait for its end: its state, and whether this
        request stopped it; None when no such run is known (to this caller)."""
        run = self._runs.get(run_id)
        if run is not None:
            if not run.session.owned_by(caller):
                return None
            cancelled = run.cancel(STOPPED)
            if cancelled:
                await run.wait_finished()
            return run.status, cancelled
        status = await self._shared(self.coordinator.status(run_id))
        if status is None or not status.session.owned_by(caller):
            return None
        if status.state is not RunState.RUNNING:
            return status, False
        await self._shared(self.coordinator.send(run_id, Message.CANCEL))
        # Its owner ends it, or, if the owner is gone, a reader declares it lost within
        # about two lock TTLs: either way its log gets an ending.
        reader = await self.open(run_id, status.last_seq, caller=caller)
        if reader is not None:
            try:
                async with asyncio.timeout(2 * self.settings.streams.lock_ttl_s + 2):
                    while not reader.delivered:
                        reader.read()
                        await reader.wait()
            except TimeoutError:
                log.warning("run %s did not end within the cancel's wait", run_id)
            finally:
                reader.close()
        return (await self._shared(self.coordinator.status(run_id))) or status, True

    async def status(self, run_id: str, *, caller: str) -> RunStatus | None:
        """A run's state, wherever it runs."""
        run = self._runs.get(run_id)
        if run is not None:
            return run.status if run.session.owned_by(caller) else None
        status = await self._shared(self.coordinator.status(run_id))
        if status is None or not status.session.owned_by(caller):
            return None
        return status

    async def drain(self, deadline_s: float) -> None:
        """Take no new turns; let running ones finish up to the deadline; cancel the rest."""
        self.accepting = False
        running = list(self._active.values())
        if not running:
            return
        log.info("draining %d running turn(s), up to %.0f s", len(running), deadline_s)
        waiters = [asyncio.create_task(r.wait_finished()) for r in running]
        _, pending = await asyncio.wait(waiters, timeout=deadline_s)
        for task in pending:
            task.cancel()
        for run in running:
            run.cancel(SHUTTING_DOWN)
        for run in running:
            if run.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await run.task

    async def close(self) -> None:
        """Cancel everything still running, forget every run, close the log and coordinator."""
        await self.drain(0)
        for handle in self._expiry.values():
            handle.cancel()
        self._expiry.clear()
        self._runs.clear()
        await self.coordinator.close()
        await self.log.close()
