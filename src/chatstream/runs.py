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
import re
import secrets
import time
from collections.abc import Awaitable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import TypeVar

from chatstream import messages as m
from chatstream.agent import Agent, Turn
from chatstream.approvals import Answer, Gate, Pending, Taken, Verdict
from chatstream.config import Settings
from chatstream.coordinator import (
    Coordinator,
    MemoryCoordinator,
    Message,
    Opening,
    RunState,
    RunStatus,
)
from chatstream.errors import (
    ApprovalAnswered,
    ChatstreamError,
    ErrorCode,
    InvalidRequest,
    ModelError,
    NotFound,
    Refused,
    SessionBusy,
    ShuttingDown,
    StoreError,
)
from chatstream.events import Done, Error, Token, ToolResult
from chatstream.metrics import Metrics
from chatstream.runlog import Entry, Log, MemoryRunLog, Reader, RunLog
from chatstream.store.base import Fenced, Session, SessionRef, SessionStore

log = logging.getLogger("chatstream.runs")
T = TypeVar("T")

__all__ = ["AnswerOutcome", "Run", "RunManager", "RunState", "RunStatus", "StopReason"]


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
PARKED = StopReason(
    ErrorCode.SHUTTING_DOWN,
    "The server is restarting. The tool call waiting for approval is kept: answer it after "
    "the restart and the turn goes on.",
)
# The store refused the turn's write: a newer turn's claim wrote the session meanwhile.
FENCED_OUT = Error(
    ErrorCode.RUN_LOST,
    "This server lost the session to a newer turn while it stored this one, so this turn "
    "was not stored over it.",
)
LOCK_LOST = StopReason(
    ErrorCode.RUN_LOST,
    "This server could not reach the session store for longer than a turn holds its session, "
    "and the turn was given up for lost; it was stopped.",
)


class Run:
    """One turn running in this process: its task, its log, and how it ends."""

    def __init__(
        self,
        run_id: str,
        session: SessionRef,
        log: Log,
        gate: Gate,
        *,
        max_events: int,
        resume_grace_s: float,
    ) -> None:
        self.id = run_id
        self.session = session
        self.log = log
        self.gate = gate
        self.turn: Turn | None = None
        # The parked runs this one continues: their ids still name it.
        self.continues: tuple[str, ...] = ()
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
        pending = self.gate.pending if self.state is RunState.RUNNING else ()
        return RunStatus(self.id, self.session, self.state, self.log.last_seq, pending)

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

    def park(self) -> bool:
        """Stop a run that waits for approval so that it can go on after a restart."""
        if not self.gate.pending or self.turn is None or not self.stoppable:
            return False
        self.gate.parking = True
        self.turn.parked = True
        return self.cancel(PARKED)

    def _idle(self) -> None:
        # The last reader left: the run goes on for the grace period, then stops; but one
        # that asked a person for approval waits for them (they may close the tab and come
        # back), and once answered it finishes what they approved.
        if self.finished or self.gate.asked:
            return
        self._cancel_grace_timer()
        loop = asyncio.get_running_loop()
        self._grace_timer = loop.call_later(self._resume_grace_s, self._abandon)

    def _abandon(self) -> None:
        self._grace_timer = None
        if not self.log.readers and not self.gate.asked:
            log.info("run %s abandoned after %.0f s without readers", self.id, self._resume_grace_s)
            self.cancel(ABANDONED)

    def _cancel_grace_timer(self) -> None:
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None


@dataclass(frozen=True, slots=True)
class AnswerOutcome:
    """What an approval's answer did: the run it went to, and its state after."""

    run_id: str
    call_id: str
    approved: bool
    state: str
    # Set when the answer continued a parked turn in a new run.
    continued_run_id: str | None = None


@dataclass(frozen=True, slots=True)
class _Continuation:
    """A parked turn to go on with: its calls still waiting, and the answer that woke it."""

    run_ids: tuple[str, ...]
    waiting: tuple[Pending, ...]
    answer: Answer


def wire_state(status: RunStatus) -> str:
    """A run's state as clients see it: ``waiting`` while it waits for a person."""
    if status.state is RunState.RUNNING and status.pending:
        return "waiting"
    return status.state.value


# What ``new_run_id`` makes (with room for longer ids). Ids from a URL or a client's body
# are looked up only when they match: shared state files a run's parts under keys that
# extend its id ("<run>:log"), so another string could name one of them.
RUN_ID = re.compile(r"run_[0-9a-f]{1,64}")


UNSAVED = (
    "The turn may not have been saved: the session store did not answer. Look at the "
    "session before sending the message again."
)


def new_run_id() -> str:
    return "run_" + secrets.token_hex(8)


def is_run_id(text: str) -> bool:
    """Whether ``text`` could be a run's id."""
    return RUN_ID.fullmatch(text) is not None


def new_session_id() -> str:
    return "s_" + secrets.token_hex(8)


def _ended_as(ending: Entry) -> RunState:
    """The state a run's log's last entry says it ended in."""
    if isinstance(ending.event, Done):
        return RunState.DONE
    if isinstance(ending.event, Error) and ending.event.code == ErrorCode.CANCELLED:
        return RunState.CANCELLED
    return RunState.FAILED if isinstance(ending.event, Error) else RunState.RUNNING


def _regenerated(session: SessionRef, stored: Session | None) -> Turn:
    """The turn that answers the session's last user message again, in place of its turn."""
    messages = stored.messages if stored is not None else ()
    last = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].role == "user"), None)
    if last is None or stored is None:
        raise InvalidRequest(f"Session {session.id!r} has no answer to regenerate.")
    turn = Turn(m.user(messages[last].content))
    turn.replace_from = stored.start + last
    return turn


def _no_approval(run_id: str, call_id: str) -> NotFound:
    # The ids come from the URL: a long one is not echoed back whole.
    return NotFound(
        f"No call {call_id[:100]!r} of run {run_id[:100]!r} waits for approval.",
        code=ErrorCode.APPROVAL_NOT_FOUND,
    )


def _close_parked(messages: Sequence[m.Message]) -> list[m.Message]:
    """The end of a parked turn that a new message leaves: its waiting calls declined,
    and an interrupted answer, so the history stays whole for providers."""
    closing = [
        m.tool_result(
            call,
            f"The user sent a new message instead of answering, so {call.name} did not run.",
            is_error=True,
            approval=Verdict.DECLINED,
        )
        for call in m.pending_calls(messages)
    ]
    return [*closing, m.assistant("", interrupted=True)]


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
        # Parked runs continued in this process, and the runs continuing them.
        self._continued: dict[str, str] = {}

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
        if not is_run_id(run_id):
            return None
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

    async def start(
        self,
        session: SessionRef,
        message: str | None,
        *,
        enable_tools: bool = True,
        regenerate: bool = False,
    ) -> Run:
        """Start a turn in a session; refuse when that session already has one running.

        ``regenerate`` answers the session's last user message again, in place of its
        answer (``message`` is then not used): the new turn replaces the old one when it
        is stored, in the same write, so a failure before then keeps the old one.
        """
        return await self._start(session, message, enable_tools=enable_tools, regenerate=regenerate)

    async def _start(
        self,
        session: SessionRef,
        message: str | None,
        *,
        enable_tools: bool = True,
        continuation: _Continuation | None = None,
        regenerate: bool = False,
    ) -> Run:
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
            self._gate(run_id),
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
            # The model sees the last max_history_messages; a regenerated turn is looked
            # for in the whole session, and its window is what is left before it.
            shown = self.settings.turns.max_history_messages
            window = None if regenerate or shown <= 0 else shown
            stored = await self.store.load(session, last=window)
            waiting: tuple[Pending, ...] = ()
            if regenerate:
                turn = _regenerated(session, stored)
            elif continuation is not None:
                turn, waiting = self._continue(run, stored, continuation)
                # Recorded as answered, so that a second answer is told so.
                answered = [
                    p for p in continuation.waiting if p.call_id == continuation.answer.call_id
                ]
                await self.coordinator.ask(run.id, answered)
                await self.coordinator.answer(run.id, continuation.answer)
            else:
                turn = Turn(m.user(message or ""))
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
        messages = stored.messages if stored else ()
        if turn.replace_from is not None:
            messages = messages[: turn.replace_from - (stored.start if stored else 0)]
        if continuation is None and m.pending_calls(messages):
            # A new message in a session whose turn waits for approval: those calls are
            # declined, and that turn ends here, so the history stays whole for providers.
            turn.prelude = _close_parked(messages)
        history = (*messages, *turn.prelude)[-self.settings.turns.max_history_messages :]
        # A trimmed history must not start inside a tool round: begin at a user message.
        while history and history[0].role != "user":
            history = history[1:]
        run.turn = turn
        turn.run_id = run.id
        run.task = asyncio.create_task(
            self._drive(run, history, turn, enable_tools, waiting), name=f"chatstream-{run.id}"
        )
        # What the turn stores before its events: for whoever stores it if this instance dies.
        head = (*turn.prelude, *([turn.user] if turn.user is not None else []))
        opening = Opening(head, continues=continuation is not None, replace_from=turn.replace_from)
        self.coordinator.keep(run.id, session, on_lost=lambda: self._lost(run), opening=opening)
        return run

    def _gate(self, run_id: str) -> Gate:
        async def ask(calls: Sequence[Pending]) -> None:
            await self.coordinator.ask(run_id, calls)

        async def expire(call_id: str) -> Answer:
            expired = Answer(call_id, Verdict.EXPIRED)
            _, decided = await self.coordinator.answer(run_id, expired)
            return decided or expired

        return Gate(timeout_s=self.settings.turns.approval_timeout_s, ask=ask, expire=expire)

    def _continue(
        self, run: Run, stored: Session | None, continuation: _Continuation
    ) -> tuple[Turn, tuple[Pending, ...]]:
        """The turn that goes on with a parked one, and its calls still waiting."""
        still = {c.id for c in m.pending_calls(stored.messages if stored else ())}
        waiting = tuple(p for p in continuation.waiting if p.call_id in still)
        if continuation.answer.call_id not in still:
            raise ApprovalAnswered("That tool call was already answered.")
        run.continues = continuation.run_ids
        run.gate.preset(continuation.answer)
        return Turn(None), waiting

    def _lost(self, run: Run) -> None:
        if run.cancel(LOCK_LOST):
            log.warning("run %s: stopped, another run holds its session", run.id)

    async def _drive(
        self,
        run: Run,
        history: tuple[m.Message, ...],
        turn: Turn,
        enable_tools: bool,
        waiting: tuple[Pending, ...],
    ) -> None:
        outcome: Error | None = None
        state = RunState.FAILED
        metrics = self.metrics
        started = time.perf_counter()
        tokens = 0
        try:
            async with asyncio.timeout(self.settings.turns.turn_timeout_s) as deadline:
                # Paused while a call waits for a person.
                run.gate.deadline = deadline
                agent_run = self.agent.run(
                    history, turn, enable_tools=enable_tools, gate=run.gate, waiting=waiting
                )
                # Closed on every exit (OUTPUT_LIMIT's break too), so running tools stop and
                # their results are in ``turn`` before it is stored.
                async with aclosing(agent_run) as events:
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
                fence = self.coordinator.fence(run.id)
                session = await self.store.append(
                    run.session, turn.to_store(), fence=fence, replace_from=turn.replace_from
                )
                await self._settle_parking(run, turn)
                run.stored = True
            except Fenced:
                log.warning("run %s: a newer turn wrote its session; not stored", run.id)
                terminal, state = FENCED_OUT, RunState.FAILED
            except StoreError as exc:
                # The store did not answer in time (it outlasted a short outage first):
                # the write may still land, so the person is told to look, not to resend.
                log.warning("run %s: storing the turn failed: %s", run.id, exc.message)
                terminal = Error(ErrorCode.STORE_UNAVAILABLE, UNSAVED)
                state = RunState.FAILED
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

    async def _settle_parking(self, run: Run, turn: Turn) -> None:
        """After a turn is stored: keep a parked run's waiting calls for after the restart,
        and forget the parked runs it continued (their ids then lead here no more)."""
        ids = (run.id, *run.continues)
        if turn.parked:
            record = {
                "session": run.session.key,
                "pending": [p.to_dict() for p in run.gate.pending],
                "runIds": list(ids),
            }
            for run_id in ids:
                await self.store.park(run_id, record)
            return
        for run_id in run.continues:
            await self.store.park(run_id, None)
        # Calls left waiting (the run was stopped) cannot be answered any more.
        for call in run.gate.pending:
            with contextlib.suppress(ChatstreamError):
                await self.coordinator.answer(run.id, Answer(call.call_id, Verdict.CANCELLED))

    def _release(self, run: Run) -> None:
        if self._active.get(run.session.key) is run:
            del self._active[run.session.key]

    def _expire(self, run_id: str) -> None:
        self._expiry.pop(run_id, None)
        run = self._runs.pop(run_id, None)
        for parked_id in run.continues if run is not None else ():
            self._continued.pop(parked_id, None)

    def _on_message(self, run_id: str, message: Message | Answer) -> None:
        if isinstance(message, Answer):
            run = self._runs.get(run_id)
            if run is not None:
                run.gate.resolve(message)
        elif message is Message.CANCEL:
            self.cancel_local(run_id, STOPPED)

    async def answer(
        self, run_id: str, call_id: str, *, approved: bool, reason: str | None, caller: str
    ) -> AnswerOutcome:
        """Answer a call waiting for approval, wherever its run runs; after a restart, the
        answer continues the parked turn in a new run. ``NotFound`` for an unknown call
        (or another caller's), ``ApprovalAnswered`` for one answered or expired."""
        verdict = Verdict.APPROVED if approved else Verdict.DECLINED
        answer = Answer(call_id, verdict, reason)
        # An answer to a parked run that was continued goes to the run continuing it.
        run_id = self._continued.get(run_id, run_id)
        status = await self._live_status(run_id, caller=caller)
        if status is None or status.state is not RunState.RUNNING:
            return await self._answer_parked(run_id, answer, caller=caller, ended=status)
        taken, _ = await self._shared(self.coordinator.answer(run_id, answer))
        if taken is Taken.UNKNOWN:
            raise _no_approval(run_id, call_id)
        if taken is Taken.ANSWERED:
            raise ApprovalAnswered(f"Call {call_id!r} was already answered, or it expired.")
        local = self._runs.get(run_id)
        if local is not None:
            # Here at once; the coordinator's message, if it sends one, then finds it done.
            local.gate.resolve(answer)
        after = await self._live_status(run_id, caller=caller) or status
        return AnswerOutcome(run_id, call_id, approved, wire_state(after))

    async def _answer_parked(
        self, run_id: str, answer: Answer, *, caller: str, ended: RunStatus | None
    ) -> AnswerOutcome:
        record = await self._shared(self.store.parked(run_id))
        if record is None:
            if ended is not None:
                # The run is over: its call was answered, expired or stopped, if it had it.
                taken, _ = await self._shared(self.coordinator.answer(run_id, answer))
                if taken is not Taken.UNKNOWN:
                    raise ApprovalAnswered(
                        f"Call {answer.call_id!r} was already answered, expired, or its run "
                        "was stopped."
                    )
            raise _no_approval(run_id, answer.call_id)
        session = SessionRef.from_key(str(record["session"]))
        waiting = tuple(Pending.from_dict(p) for p in record.get("pending", ()))
        call = next((p for p in waiting if p.call_id == answer.call_id), None)
        if not session.owned_by(caller) or call is None:
            raise _no_approval(run_id, answer.call_id)
        if call.expires_at <= time.time():
            raise ApprovalAnswered(f"The approval of call {answer.call_id!r} expired.")
        run_ids = tuple(str(i) for i in record.get("runIds", (run_id,)))
        try:
            run = await self._start(
                session, None, continuation=_Continuation(run_ids, waiting, answer)
            )
        except SessionBusy:
            # Another answer to this turn is continuing it (or a new message is closing
            # it): either way this one comes second.
            raise ApprovalAnswered(
                f"Call {answer.call_id!r} is being answered already, or its turn was closed."
            ) from None
        for parked_id in run_ids:
            self._continued[parked_id] = run.id
        log.info("run %s continues parked run %s", run.id, run_id)
        return AnswerOutcome(run_id, answer.call_id, answer.approved, "running", run.id)

    def cancel_local(self, run_id: str, reason: StopReason = STOPPED) -> Run | None:
        """Stop a run this process executes; None when it executes no such run."""
        run = self._runs.get(run_id)
        if run is not None:
            run.cancel(reason)
        return run

    async def cancel(self, run_id: str, *, caller: str) -> tuple[RunStatus, bool] | None:
        """Stop a run wherever it runs and wait for its end: its state, and whether this
        request stopped it; None when no such run is known (to this caller)."""
        if not is_run_id(run_id):
            return None
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
        ending: Entry | None = None
        if reader is not None:
            try:
                async with asyncio.timeout(2 * self.settings.streams.lock_ttl_s + 2):
                    while not reader.delivered:
                        ending = next(reversed(reader.read()), ending)
                        await reader.wait()
                    ending = next(reversed(reader.read()), ending)
            except TimeoutError:
                log.warning("run %s did not end within the cancel's wait", run_id)
            finally:
                reader.close()
        after = (await self._shared(self.coordinator.status(run_id))) or status
        if after.state is RunState.RUNNING and ending is not None:
            # The owner writes its log's ending before it records the state: the ending
            # already says how the run ended.
            after = RunStatus(run_id, after.session, _ended_as(ending), ending.seq)
        return after, True

    async def status(self, run_id: str, *, caller: str) -> RunStatus | None:
        """A run's state, wherever it runs; a parked one waits, as the store says."""
        status = await self._live_status(run_id, caller=caller)
        if status is None:
            return await self._parked_status(run_id, caller=caller)
        return status

    async def _live_status(self, run_id: str, *, caller: str) -> RunStatus | None:
        if not is_run_id(run_id):
            return None
        run = self._runs.get(run_id)
        if run is not None:
            return run.status if run.session.owned_by(caller) else None
        status = await self._shared(self.coordinator.status(run_id))
        if status is None or not status.session.owned_by(caller):
            return None
        return status

    async def _parked_status(self, run_id: str, *, caller: str) -> RunStatus | None:
        record = await self._shared(self.store.parked(run_id))
        if record is None:
            return None
        session = SessionRef.from_key(str(record["session"]))
        if not session.owned_by(caller):
            return None
        pending = tuple(Pending.from_dict(p) for p in record.get("pending", ()))
        return RunStatus(run_id, session, RunState.RUNNING, 0, pending)

    async def drain(self, deadline_s: float) -> None:
        """Take no new turns; let running ones finish up to the deadline; cancel the rest."""
        self.accepting = False
        running = list(self._active.values())
        if not running:
            return
        log.info("draining %d running turn(s), up to %.0f s", len(running), deadline_s)
        # A run waiting for a person would hold the drain to its end: park it at once.
        for run in running:
            run.park()
        waiters = [asyncio.create_task(r.wait_finished()) for r in running]
        _, pending = await asyncio.wait(waiters, timeout=deadline_s)
        for task in pending:
            task.cancel()
        for run in running:
            if not run.park():
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
