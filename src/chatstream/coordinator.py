"""Who runs what: sessions' busy claims, runs' states, and messages to a run's owner.

A session takes one turn at a time: the run that starts a turn ``claim``s the session,
``keep``s the claim while it runs and ``release``s it at the end, recording how the run
ended. Any instance may ask who holds a session, what state a run is in, and ``send`` a
message (a stop request, an approval's answer) to whichever instance runs it, which hears
it through ``listen``. A run that waits for approvals ``ask``s them here, so that any
instance can ``answer`` one exactly once (the first answer, or the clock's expiry, wins).

Each claim takes a fencing token, larger than any the session's claims took before
(``fence``): the run's write to its session names it, and the store refuses a write whose
token is not newer than the last one it took (``store.base``). A run ``keep``s its claim
with its ``Opening``: what the turn stores before what it streams, for whoever stores the
turn if its instance dies (``chatstream.cluster``).

``MemoryCoordinator`` does this within one process; the Redis one (``chatstream.cluster``)
across every instance that shares a Redis.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from chatstream import messages as m
from chatstream.approvals import Answer, Pending, Taken
from chatstream.store.base import SessionRef


class RunState(enum.StrEnum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class RunStatus:
    """What any instance can learn about a run."""

    run_id: str
    session: SessionRef
    state: RunState
    last_seq: int = 0
    # The calls waiting for a person's answer, while it runs.
    pending: tuple[Pending, ...] = ()


@dataclass(frozen=True, slots=True)
class Opening:
    """How a turn begins: the messages it stores before what it streams (a parked turn's
    closing and the user's message), and whether its first tool round continues a parked
    turn's (whose call is stored already). Enough, with the run's events, to store it."""

    messages: tuple[m.Message, ...] = ()
    continues: bool = False
    # A regenerated answer's: the position of the stored turn it replaces.
    replace_from: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "messages": [msg.to_dict() for msg in self.messages],
            "continues": self.continues,
            "replaceFrom": self.replace_from,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Opening:
        messages = tuple(m.Message.from_dict(msg) for msg in data.get("messages", ()))
        replace_from = data.get("replaceFrom")
        return cls(messages, bool(data.get("continues", False)), replace_from)


def next_fence(last: int) -> int:
    """A token after ``last``, and at least the clock in microseconds: a counter that was
    lost (a restart of whatever kept it) starts again above every token it gave."""
    return max(last + 1, time.time_ns() // 1000)


class Message(enum.StrEnum):
    """What one instance may ask of the instance that runs a turn."""

    CANCEL = "cancel"


# A message's handler: the run it is for, and the message (or an approval's answer).
Handler = Callable[[str, Message | Answer], None]


class Coordinator(Protocol):
    """Sessions' claims, runs' states and messages to runs, wherever they run."""

    async def claim(self, run_id: str, session: SessionRef) -> str | None:
        """Make the session busy with ``run_id``, with a new fencing token; the holding
        run's id when it is busy."""
        ...

    def fence(self, run_id: str) -> int | None:
        """The token this process's claim for ``run_id`` took, until it is released."""
        ...

    def keep(
        self,
        run_id: str,
        session: SessionRef,
        on_lost: Callable[[], None],
        *,
        opening: Opening | None = None,
    ) -> None:
        """Hold the claim while the run lives; ``on_lost`` when another run took the session.
        ``opening`` is kept with the run, for whoever stores it if this instance dies."""
        ...

    async def release(self, status: RunStatus) -> None:
        """The run is over, or never started: record its end and free its session."""
        ...

    async def holder(self, session: SessionRef) -> str | None:
        """The id of the run busy in the session, if any."""
        ...

    async def status(self, run_id: str) -> RunStatus | None:
        """A run's state, until its record expires; None when no such run is known."""
        ...

    async def send(self, run_id: str, message: Message | Answer) -> None:
        """Deliver ``message`` to the instance that runs ``run_id`` (nothing if none does)."""
        ...

    def listen(self, handler: Handler) -> None:
        """Hear the messages sent to runs of this instance."""
        ...

    async def ask(self, run_id: str, calls: Sequence[Pending]) -> None:
        """Record calls of a running run as waiting for approval."""
        ...

    async def answer(self, run_id: str, answer: Answer) -> tuple[Taken, Answer | None]:
        """Decide a waiting call, once: ``TAKEN`` (the run's owner hears ``answer``),
        ``ANSWERED`` with the answer that decided it before, or ``UNKNOWN``."""
        ...

    async def ping(self) -> bool:
        """True when the shared state answers."""
        ...

    async def close(self) -> None:
        """Stop listening and keeping claims; release connections."""
        ...


class MemoryCoordinator:
    """Claims and states in this process; an ended run's record lives ``ttl_s``."""

    def __init__(self, *, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._holders: dict[str, str] = {}
        self._fences: dict[str, int] = {}
        self._last_fence = 0
        self._runs: dict[str, RunStatus] = {}
        self._handler: Handler | None = None
        self._expiry: dict[str, asyncio.TimerHandle] = {}
        # Per run: each asked call, and its answer once it has one.
        self._approvals: dict[str, dict[str, tuple[Pending, Answer | None]]] = {}

    async def claim(self, run_id: str, session: SessionRef) -> str | None:
        holder = self._holders.setdefault(session.key, run_id)
        if holder != run_id:
            return holder
        if run_id not in self._fences:
            self._last_fence = self._fences[run_id] = next_fence(self._last_fence)
        self._runs[run_id] = RunStatus(run_id, session, RunState.RUNNING)
        return None

    def fence(self, run_id: str) -> int | None:
        return self._fences.get(run_id)

    def keep(
        self,
        run_id: str,
        session: SessionRef,
        on_lost: Callable[[], None],
        *,
        opening: Opening | None = None,
    ) -> None:
        """Nothing to renew: a claim in this process lasts until it is released, and dies
        with the process, with nobody to store the turn for it."""

    async def release(self, status: RunStatus) -> None:
        self._fences.pop(status.run_id, None)
        if self._holders.get(status.session.key) == status.run_id:
            del self._holders[status.session.key]
        self._runs[status.run_id] = status
        loop = asyncio.get_running_loop()
        old = self._expiry.pop(status.run_id, None)
        if old is not None:
            old.cancel()
        self._expiry[status.run_id] = loop.call_later(self.ttl_s, self._expire, status.run_id)

    def _expire(self, run_id: str) -> None:
        self._expiry.pop(run_id, None)
        self._runs.pop(run_id, None)
        self._approvals.pop(run_id, None)

    async def holder(self, session: SessionRef) -> str | None:
        return self._holders.get(session.key)

    async def status(self, run_id: str) -> RunStatus | None:
        status = self._runs.get(run_id)
        if status is None or status.state is not RunState.RUNNING:
            return status
        waiting = self._approvals.get(run_id, {}).values()
        pending = tuple(call for call, answer in waiting if answer is None)
        return RunStatus(status.run_id, status.session, status.state, status.last_seq, pending)

    async def send(self, run_id: str, message: Message | Answer) -> None:
        if self._handler is not None:
            self._handler(run_id, message)

    def listen(self, handler: Handler) -> None:
        self._handler = handler

    async def ask(self, run_id: str, calls: Sequence[Pending]) -> None:
        asked = self._approvals.setdefault(run_id, {})
        for call in calls:
            asked.setdefault(call.call_id, (call, None))

    async def answer(self, run_id: str, answer: Answer) -> tuple[Taken, Answer | None]:
        asked = self._approvals.get(run_id, {})
        if answer.call_id not in asked:
            return Taken.UNKNOWN, None
        call, earlier = asked[answer.call_id]
        if earlier is not None:
            return Taken.ANSWERED, earlier
        asked[answer.call_id] = (call, answer)
        await self.send(run_id, answer)
        return Taken.TAKEN, answer

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        for handle in self._expiry.values():
            handle.cancel()
        self._expiry.clear()
