"""Runs: turns that outlive the connection that started them.

A ``Run`` is one turn in one session. It owns an append-only log of encoded SSE
frames (seq 1, 2, …) and a set of subscribers. A subscriber is just a cursor
into that log plus a wake-up flag, so a slow reader costs the server nothing
but its cursor: it reads the shared log at its own pace while the socket's flow
control holds it back, and it never has a queue of its own that could grow.

The connection that starts a run is only its first subscriber. When the last
one leaves, the run keeps going for a grace period so that it can be resumed
(``Last-Event-ID``); if nobody comes back it is cancelled. A finished run's log
is kept for ``run_ttl_s`` so that a late resume still gets its ending.

``RunManager`` starts runs, finds them, enforces one active run per session,
cancels them, and drains them on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import secrets
import time
from dataclasses import dataclass

from chatstream import messages as m
from chatstream.agent import Agent, Turn
from chatstream.config import Settings
from chatstream.errors import ChatstreamError, ModelError, RequestError
from chatstream.events import Done, Error, Event, Token, encode, encode_token
from chatstream.store.base import SessionStore

log = logging.getLogger("chatstream.runs")


class RunState(enum.StrEnum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class StopReason:
    """Why a run was cancelled: the error event its subscribers get."""

    code: str
    message: str


STOPPED = StopReason("CANCELLED", "The run was stopped.")
ABANDONED = StopReason("CANCELLED", "Nobody was listening, so the run was stopped.")
SHUTTING_DOWN = StopReason(
    "SHUTTING_DOWN", "The server is restarting; the partial answer was saved. Try again."
)


class Subscriber:
    """A reader of one run's log: where it has read up to, and a flag to wake it."""

    __slots__ = ("cursor", "wake")

    def __init__(self, cursor: int) -> None:
        self.cursor = cursor
        self.wake = asyncio.Event()


class Run:
    """One turn's event log, state and subscribers."""

    def __init__(
        self, run_id: str, session_id: str, *, max_events: int, resume_grace_s: float
    ) -> None:
        self.id = run_id
        self.session_id = session_id
        self.state = RunState.RUNNING
        self.created_at = time.time()
        self.finished_at: float | None = None
        self.task: asyncio.Task[None] | None = None
        self.stop_reason: StopReason | None = None
        self._frames: list[bytes] = []
        self._subscribers: set[Subscriber] = set()
        self._max_events = max_events
        self._resume_grace_s = resume_grace_s
        self._grace_timer: asyncio.TimerHandle | None = None
        self._finished = asyncio.Event()
        # Cleared once the turn is being stored: a cancel then would lose the write.
        self.stoppable = True

    # -- the log ---------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        return len(self._frames)

    @property
    def finished(self) -> bool:
        return self.state is not RunState.RUNNING

    def append(self, event: Event) -> None:
        """Encode ``event`` once, add it to the log, and wake every subscriber."""
        seq = len(self._frames) + 1
        event_id = f"{self.id}:{seq}"
        if type(event) is Token:
            frame = encode_token(event.content, event_id=event_id)
        else:
            frame = encode(event, event_id=event_id)
        self._frames.append(frame)
        for subscriber in self._subscribers:
            subscriber.wake.set()

    @property
    def full(self) -> bool:
        # One slot stays free for the terminal event.
        return len(self._frames) >= self._max_events - 1

    def read(self, subscriber: Subscriber) -> list[bytes]:
        """Frames the subscriber has not read yet; advances its cursor."""
        frames = self._frames[subscriber.cursor :]
        subscriber.cursor = len(self._frames)
        return frames

    def delivered(self, subscriber: Subscriber) -> bool:
        """True once the subscriber has read the terminal event."""
        return self.finished and subscriber.cursor >= len(self._frames)

    def finish(self, event: Done | Error, state: RunState) -> None:
        self.append(event)
        self.state = state
        self.finished_at = time.time()
        self._cancel_grace_timer()
        self._finished.set()

    async def wait_finished(self) -> None:
        await self._finished.wait()

    # -- subscribers -----------------------------------------------------------

    def subscribe(self, after_seq: int = 0) -> Subscriber:
        """Follow the log from just after ``after_seq``."""
        self._cancel_grace_timer()
        subscriber = Subscriber(min(max(after_seq, 0), len(self._frames)))
        self._subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.discard(subscriber)
        if not self._subscribers and not self.finished:
            loop = asyncio.get_running_loop()
            self._grace_timer = loop.call_later(self._resume_grace_s, self._abandon)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def cancel(self, reason: StopReason) -> bool:
        """Ask the run's task to stop; its subscribers get ``reason`` as an error event."""
        if self.finished or self.task is None or not self.stoppable:
            return False
        if self.stop_reason is None:
            self.stop_reason = reason
        self.task.cancel()
        return True

    def _abandon(self) -> None:
        self._grace_timer = None
        if not self._subscribers:
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


class RunManager:
    """Starts, finds, cancels and drains the runs of one server process."""

    def __init__(self, *, agent: Agent, store: SessionStore, settings: Settings) -> None:
        self.agent = agent
        self.store = store
        self.settings = settings
        self.accepting = True
        self._runs: dict[str, Run] = {}
        self._active: dict[str, Run] = {}
        self._expiry: dict[str, asyncio.TimerHandle] = {}

    @property
    def active_count(self) -> int:
        return len(self._active)

    def get(self, run_id: str) -> Run | None:
        return self._runs.get(run_id)

    def active_run(self, session_id: str) -> Run | None:
        return self._active.get(session_id)

    async def start(self, session_id: str, message: str, *, enable_tools: bool = True) -> Run:
        """Start a turn in a session; refuse when that session already has one running."""
        if not self.accepting:
            raise RequestError(
                503,
                "SHUTTING_DOWN",
                "The server is shutting down and takes no new turns.",
                headers={"Retry-After": "5"},
            )
        if session_id in self._active:
            raise RequestError(
                409,
                "SESSION_BUSY",
                f"Session {session_id!r} already has a turn running "
                f"(run {self._active[session_id].id}); wait for it, resume it or cancel it.",
            )
        run = Run(
            new_run_id(),
            session_id,
            max_events=self.settings.run_log_max_events,
            resume_grace_s=self.settings.resume_grace_s,
        )
        # Claim the session before the first await, so two requests cannot both start.
        self._active[session_id] = run
        self._runs[run.id] = run
        try:
            session = await self.store.load(session_id)
        except ChatstreamError as exc:
            self._release(run)
            self._runs.pop(run.id, None)
            raise RequestError(503, "STORE_UNAVAILABLE", exc.message) from exc
        history = session.messages if session else ()
        turn = Turn(m.user(message))
        run.task = asyncio.create_task(
            self._drive(run, history, turn, enable_tools), name=f"chatstream-{run.id}"
        )
        return run

    async def _drive(
        self, run: Run, history: tuple[m.Message, ...], turn: Turn, enable_tools: bool
    ) -> None:
        outcome: Error | None = None
        state = RunState.FAILED
        try:
            async for event in self.agent.run(history, turn, enable_tools=enable_tools):
                run.append(event)
                if run.full:
                    outcome = Error(
                        "OUTPUT_LIMIT",
                        f"The answer reached the limit of {self.settings.run_log_max_events} "
                        "events and was cut.",
                    )
                    break
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            reason = run.stop_reason or STOPPED
            outcome = Error(reason.code, reason.message)
            state = RunState.CANCELLED
        except ModelError as exc:
            outcome = Error(exc.code, exc.message)
        except Exception as exc:
            log.exception("run %s failed", run.id)
            outcome = Error("INTERNAL_ERROR", f"The turn failed: {type(exc).__name__}")
        await self._store_and_finish(run, turn, outcome, state)

    async def _store_and_finish(
        self, run: Run, turn: Turn, outcome: Error | None, state: RunState
    ) -> None:
        run.stoppable = False
        try:
            session = await self.store.append(run.session_id, turn.to_store())
        except Exception as exc:
            log.exception("run %s: storing the turn failed", run.id)
            run.finish(
                Error("INTERNAL_ERROR", f"The turn could not be saved: {exc}"), RunState.FAILED
            )
        else:
            if outcome is None:
                done = Done(run.session_id, session.history_length, run.id, turn.usage)
                run.finish(done, RunState.DONE)
            else:
                run.finish(outcome, state)
        finally:
            self._release(run)
            loop = asyncio.get_running_loop()
            self._expiry[run.id] = loop.call_later(self.settings.run_ttl_s, self._expire, run.id)

    def _release(self, run: Run) -> None:
        if self._active.get(run.session_id) is run:
            del self._active[run.session_id]

    def _expire(self, run_id: str) -> None:
        self._expiry.pop(run_id, None)
        self._runs.pop(run_id, None)

    def cancel(self, run_id: str, reason: StopReason = STOPPED) -> Run | None:
        """Stop a run at once; None when no such run is known."""
        run = self._runs.get(run_id)
        if run is not None:
            run.cancel(reason)
        return run

    async def drain(self, deadline_s: float) -> None:
        """Take no new turns; let running ones finish up to the deadline; cancel the rest."""
        self.accepting = False
        running = [r for r in self._active.values()]
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
        """Cancel everything still running and forget every run (server shutdown)."""
        await self.drain(0)
        for handle in self._expiry.values():
            handle.cancel()
        self._expiry.clear()
        self._runs.clear()
