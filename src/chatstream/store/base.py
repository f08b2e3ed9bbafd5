"""The SessionStore protocol: where conversations live between turns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from chatstream.messages import Message, history_length


def scoped(owner: str, session_id: str) -> str:
    """A session id in its owner's namespace; '/' never occurs in a public id."""
    return f"{owner}/{session_id}" if owner else session_id


def unscoped(store_key: str) -> tuple[str, str]:
    """``(owner, session_id)`` of a store key."""
    owner, _, session_id = store_key.rpartition("/")
    return owner, session_id


@dataclass(frozen=True, slots=True)
class Session:
    """A stored conversation."""

    id: str
    messages: tuple[Message, ...] = field(default=())
    created_at: float = 0.0
    last_activity: float = 0.0

    @property
    def history_length(self) -> int:
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

    async def load(self, session_id: str) -> Session | None:
        """The session, or None when there is none by that id."""
        ...

    async def append(self, session_id: str, messages: Sequence[Message]) -> Session:
        """Add messages at the end of a session, creating it if needed; return it whole."""
        ...

    async def delete(self, session_id: str) -> bool:
        """Remove a session; False when there was none."""
        ...

    async def list(self, *, limit: int = 50, owner: str = "") -> list[SessionSummary]:
        """An owner's most recently active sessions first, by their public ids."""
        ...

    async def ping(self) -> bool:
        """True when the store answers."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
