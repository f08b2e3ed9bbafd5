"""Approvals: a person says yes or no before a tool with side effects runs.

A call of a tool that needs approval becomes a ``Pending`` approval; the run's ``Gate``
asks for it (the coordinator records it, so that any instance can take the answer) and
the agent waits on the gate for that call's ``Answer`` before it runs anything of the
tool. An answer comes from a person (``approved`` or not, with a reason), from the clock
(``expired`` after the approval timeout) or from the stop button (``cancelled``); only
an approved call runs, and every other verdict becomes an error result that tells the
model why, so the turn goes on.

While a call waits, the turn's own time limit is paused: a person may take ten minutes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any


class Verdict(enum.StrEnum):
    """How an approval ended; stored on the call and its result."""

    PENDING = "pending"
    APPROVED = "approved"
    DECLINED = "declined"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class Pending:
    """A call waiting for a person: what it would do, and until when it waits."""

    call_id: str
    tool: str
    args: dict[str, Any]
    expires_at: float

    def data(self) -> dict[str, Any]:
        """The wire form (``approval_required``, ``pendingApprovals``)."""
        return {
            "id": self.call_id,
            "tool": self.tool,
            "args": self.args,
            "expiresAt": iso(self.expires_at),
        }

    def to_dict(self) -> dict[str, Any]:
        """The stored form (epoch seconds, as the clock reads)."""
        return {
            "id": self.call_id,
            "tool": self.tool,
            "args": self.args,
            "expiresAt": self.expires_at,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Pending:
        return cls(data["id"], data["tool"], dict(data.get("args") or {}), float(data["expiresAt"]))


@dataclass(frozen=True, slots=True)
class Answer:
    """The answer to one pending call."""

    call_id: str
    verdict: Verdict
    reason: str | None = None

    @property
    def approved(self) -> bool:
        return self.verdict is Verdict.APPROVED

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.call_id, "verdict": self.verdict.value, "reason": self.reason}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Answer:
        return cls(data["id"], Verdict(data["verdict"]), data.get("reason"))


class Taken(enum.Enum):
    """What became of an answer given to a run's pending call."""

    TAKEN = "taken"  # it was pending: this answer decides it
    ANSWERED = "answered"  # it was already answered, or expired
    UNKNOWN = "unknown"  # no such pending call in that run


def iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="milliseconds")


def refusal(tool: str, answer: Answer, timeout_s: float) -> str:
    """The result the model reads for a call that did not run."""
    if answer.verdict is Verdict.EXPIRED:
        return f"Nobody approved {tool} within {timeout_s:g} s, so it did not run."
    if answer.verdict is Verdict.CANCELLED:
        return f"The run was stopped while {tool} waited for approval, so it did not run."
    reason = f" Their reason: {answer.reason}" if answer.reason else ""
    return f"The user declined to run {tool}.{reason}"


# Records the calls a run asks about where any instance can answer them.
Ask = Callable[[Sequence[Pending]], Awaitable[None]]
# Decides a pending call by the clock; returns the answer that decided it (a person's
# answer may have been taken a moment before).
Expire = Callable[[str], Awaitable[Answer]]


class Gate:
    """One run's approvals: what it asked, the answers it got, and the waits between."""

    def __init__(self, *, timeout_s: float, ask: Ask, expire: Expire) -> None:
        self.timeout_s = timeout_s
        self._ask = ask
        self._expire = expire
        self._pending: dict[str, Pending] = {}
        self._answers: dict[str, asyncio.Future[Answer]] = {}
        # Set once a run asked a person anything: it then outlives its readers.
        self.asked = False
        # Set when the run is parked (the server stops while it waits): pending calls are
        # then stored as pending, not given a result.
        self.parking = False
        # The turn's time limit, paused while any call waits.
        self.deadline: asyncio.Timeout | None = None
        self._paused_left: float | None = None

    @property
    def pending(self) -> tuple[Pending, ...]:
        """The calls waiting for an answer, in the order they were asked."""
        return tuple(self._pending.values())

    def is_pending(self, call_id: str) -> bool:
        return call_id in self._pending

    async def ask(self, calls: Sequence[Pending]) -> None:
        """Record ``calls`` as waiting; answers may arrive from the moment this returns.

        A call answered beforehand (``preset``) is not asked again.
        """
        loop = asyncio.get_running_loop()
        fresh = []
        for call in calls:
            future = self._answers.setdefault(call.call_id, loop.create_future())
            if not future.done():
                self._pending[call.call_id] = call
                fresh.append(call)
        if fresh:
            self.asked = True
            self._pause()
            await self._ask(fresh)

    def preset(self, answer: Answer) -> None:
        """An answer known before the call is asked again (a parked turn's continuation)."""
        loop = asyncio.get_running_loop()
        future = self._answers.setdefault(answer.call_id, loop.create_future())
        if not future.done():
            future.set_result(answer)

    def resolve(self, answer: Answer) -> bool:
        """Deliver an answer the coordinator took; False when nothing waits for it."""
        future = self._answers.get(answer.call_id)
        if future is None or future.done():
            return False
        future.set_result(answer)
        self._pending.pop(answer.call_id, None)
        return True

    async def wait(self, call: Pending) -> Answer:
        """The answer to ``call``: a person's, or expired at its deadline.

        Cancelled (a stop, a park), the call stays pending: it was not answered.
        """
        future = self._answers[call.call_id]
        left = call.expires_at - time.time()
        try:
            async with asyncio.timeout(max(left, 0.0)):
                answer = await asyncio.shield(future)
        except TimeoutError:
            answer = future.result() if future.done() else await self._expire(call.call_id)
            self.resolve(answer)
        self._pending.pop(call.call_id, None)
        if not self._pending:
            self._resume()
        return answer

    def _pause(self) -> None:
        if self.deadline is None or self._paused_left is not None:
            return
        when = self.deadline.when()
        if when is not None:
            self._paused_left = when - asyncio.get_running_loop().time()
            self.deadline.reschedule(None)

    def _resume(self) -> None:
        if self.deadline is None or self._paused_left is None:
            return
        left, self._paused_left = self._paused_left, None
        self.deadline.reschedule(asyncio.get_running_loop().time() + max(left, 0.0))
