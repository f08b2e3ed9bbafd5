"""The SessionStore protocol: where conversations live between turns.

A write may name a fencing token (``append(…, fence=)``): the token of the session lock
the writing run holds, which grows with each claim. A store keeps the token of the last
write that named one and refuses (``Fenced``) a write whose token is not newer, unless it
is that same write tried again: an instance that lost its lock (a Redis stall, a
partition) cannot write over a newer turn, and a token writes a session once, so the
owner of a turn and whoever stores it for a dead owner cannot both store it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import orjson

from chatstream.errors import ErrorCode, StoreError
from chatstream.messages import Message, history_length


class Fenced(StoreError):
    """A write refused: its fencing token is not newer than the session's last one."""

    code = ErrorCode.RUN_LOST


FENCED = "A newer turn has written this session (or this turn was stored already)."


@dataclass(frozen=True, slots=True)
class SessionRef:
    """A session as its owner names it: who owns it ("" without API keys), and its id.

    Each API key has its own namespace of session ids; ``key`` is the one string that
    stores and shared state file it under ('/' never occurs in a public id).
    """

    owner: str
    id: str

    @property
    def key(self) -> str:
        return f"{self.owner}/{self.id}" if self.owner else self.id

    def owned_by(self, caller: str) -> bool:
        """Whether ``caller`` may see the session (and its runs): the one visibility rule."""
        return self.owner == caller

    @classmethod
    def from_key(cls, key: str) -> SessionRef:
        owner, _, session_id = key.rpartition("/")
        return cls(owner, session_id)


def stamped(messages: Sequence[Message], now: float) -> tuple[Message, ...]:
    """``messages`` as a store writes them: each with its ``created_at``, ``now`` if unset."""
    return tuple(m if m.created_at is not None else replace(m, created_at=now) for m in messages)


def decoded(bodies: Iterable[bytes]) -> tuple[Message, ...]:
    """Messages from the JSON bodies a store keeps them as, in order."""
    return tuple(Message.from_dict(orjson.loads(body)) for body in bodies)


@dataclass(frozen=True, slots=True)
class Session:
    """A stored conversation, whole or its end: ``messages`` are its messages from
    position ``start`` on; ``total_history`` is the whole conversation's history length,
    which the stores keep as a count (None: count ``messages``, all of it)."""

    id: str
    messages: tuple[Message, ...] = field(default=())
    created_at: float = 0.0
    last_activity: float = 0.0
    start: int = 0
    total_history: int | None = None

    @property
    def history_length(self) -> int:
        """User messages and answers in the whole conversation (``messages.history_length``)."""
        if self.total_history is not None:
            return self.total_history
        return history_length(self.messages)


@dataclass(frozen=True, slots=True)
class SessionSummary:
    """A line in a list of sessions: enough to pick one."""

    id: str
    title: str
    created_at: float
    last_activity: float
    message_count: int


class SessionStore(Protocol):
    """Sessions by id. Every method is safe to call concurrently."""

    name: str

    async def load(self, ref: SessionRef, *, last: int | None = None) -> Session | None:
        """The session, or None when there is none by that id.

        With ``last``, only its last ``last`` messages are read (a turn shows the model
        no more): what a turn costs then does not grow with the conversation.
        """
        ...

    async def append(
        self,
        ref: SessionRef,
        messages: Sequence[Message],
        *,
        fence: int | None = None,
        replace_from: int | None = None,
    ) -> Session:
        """Add messages at the end of a session, creating it if needed; return its end:
        the messages written, where they start, and the whole session's history length.

        With ``fence``, in the same transaction: ``Fenced`` when the session's last fenced
        write named the same token or a newer one. With ``replace_from``, the stored
        messages from that position on are dropped in the same transaction (a regenerated
        answer replaces the turn it regenerates, and a crash keeps the old one).
        """
        ...

    async def delete(self, ref: SessionRef) -> bool:
        """Remove a session; False when there was none."""
        ...

    async def list(self, *, limit: int = 50, owner: str = "") -> list[SessionSummary]:
        """An owner's most recently active sessions first, by their public ids."""
        ...

    async def park(self, run_id: str, record: dict[str, Any] | None) -> None:
        """Keep ``record`` (JSON) under a run that was stopped while it waited for approval,
        so that an answer after a restart can continue it; None forgets it."""
        ...

    async def parked(self, run_id: str) -> dict[str, Any] | None:
        """What ``park`` kept for a run, or None."""
        ...

    async def ping(self) -> bool:
        """True when the store answers."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
