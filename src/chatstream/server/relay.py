"""What the frontends' protocols share: where a run's tool calls stand, and their frames' shape.

The frontends' protocols (``ui_stream.py``, ``agui.py``) read the same run log as the
native stream and encode its typed entries into their own frames, written by the same
response as the native stream (``sse.EncodedStream`` with their ``sse.Encoder``).

``Rounds`` is what both encoders need to know of a run beyond the entry in hand: which
tool calls are open, which of them wait for a person, and whether the run therefore
waits. It is a pure function of the entries, so a stream that continues another one
(after an approval answered through the protocol) finds the point where that one ended
by reading the same entries.
"""

from __future__ import annotations

from typing import Any

from chatstream.events import ApprovalRequired, Event, ToolCall, ToolResult

# One frame of these streams as an SSE parser sees it: only ``data``, compact JSON (the UI
# message stream's last one is ``[DONE]``).
DATA_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["data"],
    "properties": {"event": {"const": "message"}, "data": {"type": "string"}},
}


class Rounds:
    """The tool calls of a run that are open, and those that wait for a person's answer.

    ``answered`` are calls that the request being served answers: a run whose only open
    calls wait for answers is paused, unless this request brings the answers.
    """

    __slots__ = ("answered", "asked", "open")

    def __init__(self, answered: frozenset[str] = frozenset()) -> None:
        self.open: dict[str, ToolCall] = {}
        self.asked: dict[str, ApprovalRequired] = {}
        self.answered = answered

    def take(self, event: Event) -> None:
        """Follow one event (tokens, progress and endings change nothing here)."""
        if isinstance(event, ToolCall):
            self.open[event.id] = event
        elif isinstance(event, ApprovalRequired):
            self.asked[event.id] = event
        elif isinstance(event, ToolResult):
            self.open.pop(event.id, None)
            self.asked.pop(event.id, None)

    @property
    def waiting(self) -> bool:
        """Every open call waits for a person: nothing happens until someone answers."""
        return bool(self.open) and all(c in self.asked for c in self.open)

    @property
    def paused(self) -> bool:
        """Waiting, and for an answer that this request does not bring."""
        return self.waiting and any(c not in self.answered for c in self.open)

    @property
    def resumed_here(self) -> bool:
        """Waiting for answers that this request brings (where its stream picks up)."""
        return self.waiting and any(c in self.answered for c in self.open)

    def pending(self) -> list[ApprovalRequired]:
        """The open calls that wait for a person, in the order they were asked."""
        return [ask for ask in self.asked.values() if ask.id in self.open]
