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
from collections.abc import Awaitable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from chatstream import messages as m
from chatstream.agent import Agent, Turn
from chatstream.config import Settings
from chatstream.errors import (
    ChatstreamError,
    ErrorCode,
    ModelError,
    Refused,
    SessionBusy,
    ShuttingDown,
    StoreError,
)
from chatstream.events import Done, Error, Event, Token, ToolResult, encode, encode_token
from chatstream.metrics import Metrics
from chatstream.store.base import SessionStore, scoped

if TYPE_CHECKING:
    from chatstream.cluster import Cluster

log = logging.getLogger("chatstream.runs")
T = TypeVar("T")


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


STOPPED = StopReason(ErrorCode.CANCELLED, "The run was stopped.")
ABANDONED = StopReason(ErrorCode.CANCELLED, "Nobody was listening, so the run was stopped.")
SHUTTING_DOWN = StopReason(
    ErrorCode.SHUTTING_DOWN, "The server is restarting; the partial answer was saved. Try again."
)


class Subscriber:
    """A reader of one run's log: where it has read up to, and a flag to wake it."""

    __slots__ = ("cursor", "wake")

    def __init__(self, cursor: int) -> None:
        self.cursor = cursor
        self.wake = asyncio.Event()


class Run:
    """One turn's event log, state and subscribers.

    A run that another instance executes is seen here as a *replica*: the same
    object, fed with frames read from the shared store, whose log starts after
    ``first_seq`` (the point the resuming client asked for).
    """

    def __init__(
        self,
        run_id: str,
        session_id: str,
        *,
        max_events: int,
        resume_grace_s: float,
        first_seq: int = 0,
        owner: str = "",
    ) -> None:
        self.id = run_id
        self.session_id = session_id
        self.owner = owner
        self.state = RunState.RUNNING
        self.created_at = time.time()
        self.finished_at: float | None = None
        self.task: asyncio.Task[None] | None = None
        self.stop_reason: StopReason | None = None
        self._frames: list[bytes] = []
        self._offset = first_seq
        self._subscribers: set[Subscriber] = set()
        # Internal readers (the shared-store mirror): they wake like subscribers but
        # do not keep a run alive for the grace period.
        self._followers: set[Subscriber] = set()
        self._max_events = max_events
        self._resume_grace_s = resume_grace_s
        self._grace_timer: asyncio.TimerHandle | None = None
        self._finished = asyncio.Event()
        # Cleared once the turn is being stored: a cancel then would lose the write.
        self.stoppable = True
        # Set once the turn is in the store: the session then shows it, not the run.
        self.stored = False

    # -- the log ---------------------------------------------------------------

    @property
    def store_key(self) -> str:
        """The session's id in the store: callers with API keys each have their own ids."""
        return scoped(self.owner, self.session_id)

    @property
    def last_seq(self) -> int:
        return self._offset + len(self._frames)

    @property
    def finished(self) -> bool:
        return self.state is not RunState.RUNNING

    def append(self, event: Event) -> None:
        """Encode ``event`` once, add it to the log, and wake every reader."""
        self.append_frame(self.encode_next(event))

    def encode_next(self, event: Event) -> bytes:
        """``event`` as the frame that would be appended next."""
        event_id = f"{self.id}:{self.last_seq + 1}"
        if type(event) is Token:
            return encode_token(event.content, event_id=event_id)
        return encode(event, event_id=event_id)

    def append_frame(self, frame: bytes) -> None:
        """Add an encoded frame (the next seq) and wake every reader."""
        self._frames.append(frame)
        for subscriber in self._subscribers:
            subscriber.wake.set()
        for follower in self._followers:
            follower.wake.set()

    @property
    def full(self) -> bool:
        # One slot stays free for the terminal event.
        return len(self._frames) >= self._max_events - 1

    def read(self, subscriber: Subscriber) -> list[bytes]:
        """Frames the subscriber has not read yet; advances its cursor."""
        frames = self._frames[subscriber.cursor :]
        subscriber.cursor = len(self._frames)
        return frames

    def seq_of(self, subscriber: Subscriber) -> int:
        """The seq of the last frame the subscriber has read."""
        return self._offset + subscriber.cursor

    def delivered(self, subscriber: Subscriber) -> bool:
        """True once the subscriber has read the terminal event."""
        return self.finished and subscriber.cursor >= len(self._frames)

    def finish(self, event: Done | Error, state: RunState) -> None:
        """Append the terminal event and mark the run over."""
        self.append(event)
        self.mark_finished(state)

    def mark_finished(self, state: RunState) -> None:
        """Mark the run over; its terminal frame is already in the log."""
        self.state = state
        self.finished_at = time.time()
        self._cancel_grace_timer()
        self._finished.set()
        self.wake_followers()

    async def wait_finished(self) -> None:
        await self._finished.wait()

    # -- subscribers -----------------------------------------------------------

    def subscribe(self, after_seq: int = 0) -> Subscriber:
        """Follow the log from just after ``after_seq``."""
        self._cancel_grace_timer()
        subscriber = Subscriber(min(max(after_seq - self._offset, 0), len(self._frames)))
        self._subscribers.add(subscriber)
        return subscriber

    def follow(self) -> Subscriber:
        """An internal reader from the start of the log; it does not count as a subscriber."""
        follower = Subscriber(0)
        self._followers.add(follower)
        return follower

    def unfollow(self, follower: Subscriber) -> None:
        self._followers.discard(follower)

    def wake_followers(self) -> None:
        for follower in self._followers:
            follower.wake.set()

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.discard(subscriber)
        if not self._subscribers and not self.finished:
            loop = asyncio.get_running_loop()
            self._grace_timer = loop.call_later(self._resume_grace_s, self._abandon)

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


def _store_unavailable(exc: ChatstreamError) -> StoreError:
    # What failed (a host, a port, a driver's words) is for the log, not for the client.
    log.warning("session store unavailable: %s", exc.message)
    return StoreError("The session store is unavailable; try again shortly.")


def frame_event(frame: bytes) -> bytes:
    """The event type of an encoded frame (its second line is ``event: <type>``)."""
    start = frame.index(b"\nevent: ") + 8
    return frame[start : frame.index(b"\n", start)]


TERMINAL_FRAMES = (b"done", b"error")


def new_run_id() -> str:
    return "run_" + secrets.token_hex(8)


def new_session_id() -> str:
    return "s_" + secrets.token_hex(8)


@dataclass(frozen=True, slots=True)
class RunStatus:
    """What the API says about a run."""

    run_id: str
    session_id: str
    state: str
    last_seq: int
    # Whether the run was stopped (for a cancel: whether this request stopped it).
    cancelled: bool = False


class RunManager:
    """Starts, finds, cancels and drains runs: this process's, and with a cluster, all of them."""

    def __init__(
        self,
        *,
        agent: Agent,
        store: SessionStore,
        settings: Settings,
        cluster: Cluster | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.agent = agent
        self.metrics = metrics or Metrics()
        self.metrics.track_active_runs(lambda: len(self._active))
        self.store = store
        self.settings = settings
        self.cluster = cluster
        if cluster is not None:
            cluster.listen_for_cancels(lambda run_id: self.cancel_local(run_id, STOPPED))
        self.accepting = True
        self._runs: dict[str, Run] = {}
        self._active: dict[str, Run] = {}
        self._expiry: dict[str, asyncio.TimerHandle] = {}

    @property
    def active_count(self) -> int:
        return len(self._active)

    def get(self, run_id: str) -> Run | None:
        """A run this process executes (or executed, until it expires)."""
        return self._runs.get(run_id)

    def active_run(self, session_id: str) -> Run | None:
        return self._active.get(session_id)

    async def find(self, run_id: str, after_seq: int = 0, *, owner: str = "") -> Run | None:
        """A run to read from ``after_seq`` on: local, or a replica of another instance's.

        A run of another caller is not found, as if it did not exist.
        """
        run = self._runs.get(run_id)
        if run is None and self.cluster is not None:
            run = await self._shared(self.cluster.replica(run_id, after_seq))
        if run is not None and run.owner != owner:
            return None
        return run

    async def active_run_id(self, store_key: str) -> str | None:
        """The run busy in a session (by its store key), on any instance."""
        run = self._active.get(store_key)
        if run is not None:
            # Once stored, the turn is in the session: a reader must not also replay the run.
            return None if run.stored else run.id
        if self.cluster is not None:
            return await self._shared(self.cluster.holder(store_key))
        return None

    async def _shared(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except ChatstreamError as exc:
            raise _store_unavailable(exc) from exc

    async def start(
        self, session_id: str, message: str, *, enable_tools: bool = True, owner: str = ""
    ) -> Run:
        """Start a turn in a session; refuse when that session already has one running."""
        if not self.accepting:
            raise ShuttingDown("The server is shutting down and takes no new turns.")
        key = scoped(owner, session_id)
        if key in self._active:
            raise SessionBusy(
                f"Session {session_id!r} already has a turn running "
                f"(run {self._active[key].id}); wait for it, resume it or cancel it."
            )
        run = Run(
            new_run_id(),
            session_id,
            max_events=self.settings.run_log_max_events,
            resume_grace_s=self.settings.resume_grace_s,
            owner=owner,
        )
        # Claim the session before the first await, so two requests cannot both start.
        self._active[key] = run
        self._runs[run.id] = run
        claimed = False
        try:
            if self.cluster is not None:
                holder = await self.cluster.claim(run)
                if holder is not None:
                    raise SessionBusy(
                        f"Session {session_id!r} already has a turn running (run {holder}); "
                        "wait for it, resume it or cancel it."
                    )
                claimed = True
            session = await self.store.load(key)
        except BaseException as exc:
            self._release(run)
            self._runs.pop(run.id, None)
            if claimed and self.cluster is not None:
                await self.cluster.release(run)
            if isinstance(exc, ChatstreamError) and not isinstance(exc, Refused):
                raise _store_unavailable(exc) from exc
            raise
        history = session.messages[-self.settings.max_history_messages :] if session else ()
        # A trimmed history must not start inside a tool round: begin at a user message.
        while history and history[0].role != "user":
            history = history[1:]
        turn = Turn(m.user(message))
        run.task = asyncio.create_task(
            self._drive(run, history, turn, enable_tools), name=f"chatstream-{run.id}"
        )
        if self.cluster is not None:
            self.cluster.attach(run)
        return run

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
                asyncio.timeout(self.settings.turn_timeout_s),
                # Closed on every exit (OUTPUT_LIMIT's break too), so running tools stop and
                # their results are in ``turn`` before it is stored.
                aclosing(self.agent.run(history, turn, enable_tools=enable_tools)) as events,
            ):
                async for event in events:
                    run.append(event)
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
                            f"The answer reached the limit of {self.settings.run_log_max_events} "
                            "events and was cut.",
                        )
                        break
        except TimeoutError:
            outcome = Error(
                ErrorCode.TIMEOUT, f"The turn took longer than {self.settings.turn_timeout_s:g} s."
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
                session = await self.store.append(run.store_key, turn.to_store())
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
        frame = run.encode_next(terminal)
        try:
            if self.cluster is not None:
                # Shared state first: a client that sends its next turn the moment it
                # reads ``done`` must find the session free on every instance.
                await self.cluster.finish(run, frame, state)
        finally:
            run.append_frame(frame)
            run.mark_finished(state)
            self._release(run)
            loop = asyncio.get_running_loop()
            self._expiry[run.id] = loop.call_later(self.settings.run_ttl_s, self._expire, run.id)

    def _release(self, run: Run) -> None:
        if self._active.get(run.store_key) is run:
            del self._active[run.store_key]

    def _expire(self, run_id: str) -> None:
        self._expiry.pop(run_id, None)
        self._runs.pop(run_id, None)

    def cancel_local(self, run_id: str, reason: StopReason = STOPPED) -> Run | None:
        """Stop a run this process executes; None when it executes no such run."""
        run = self._runs.get(run_id)
        if run is not None:
            run.cancel(reason)
        return run

    async def cancel(self, run_id: str, *, owner: str = "") -> RunStatus | None:
        """Stop a run wherever it runs and wait for its end; None when no such run is known."""
        run = self._runs.get(run_id)
        if run is not None and run.owner != owner:
            return None
        if run is not None:
            cancelled = run.cancel(STOPPED)
            if cancelled:
                await run.wait_finished()
            return RunStatus(run.id, run.session_id, run.state.value, run.last_seq, cancelled)
        if self.cluster is None:
            return None
        info = await self._shared(self.cluster.info(run_id))
        if info is None or info.get("owner_key", "") != owner:
            return None
        cancelled = info["state"] == "running"
        if cancelled:
            await self._shared(self.cluster.request_cancel(run_id))
            deadline = time.monotonic() + 10
            while info is not None and info["state"] == "running" and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                info = await self._shared(self.cluster.info(run_id))
        if info is None:
            return None
        return RunStatus(
            run_id, info["session"], info["state"], int(info.get("last_seq", 0)), cancelled
        )

    async def status(self, run_id: str, *, owner: str = "") -> RunStatus | None:
        """A run's state, wherever it runs."""
        run = self._runs.get(run_id)
        if run is not None:
            if run.owner != owner:
                return None
            return RunStatus(
                run.id,
                run.session_id,
                run.state.value,
                run.last_seq,
                cancelled=run.state is RunState.CANCELLED,
            )
        if self.cluster is None:
            return None
        info = await self._shared(self.cluster.info(run_id))
        if info is None or info.get("owner_key", "") != owner:
            return None
        state = info["state"]
        return RunStatus(
            run_id,
            info["session"],
            state,
            int(info.get("last_seq", 0)),
            cancelled=state == RunState.CANCELLED.value,
        )

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
