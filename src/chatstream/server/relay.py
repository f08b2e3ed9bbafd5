"""A run's log in another wire format: an ``Encoder`` per protocol, one streaming response.

The frontends' protocols (``ui_stream.py``, ``agui.py``) read the same run log as the
native stream and encode its typed entries into their own frames. ``EncodedStream`` is
``sse.EventStream``'s sibling: the same writer (all that is ready in one ``send``, a
``: ping`` comment while nothing is due, a hang-up noticed at once), with the frames
made by an encoder instead of taken from the entries, and an end the encoder may call
before the run's (a protocol whose stream ends while the run waits for a person).

``Rounds`` is what both encoders need to know of a run beyond the entry in hand: which
tool calls are open, which of them wait for a person, and whether the run therefore
waits. It is a pure function of the entries, so a stream that continues another one
(after an approval answered through the protocol) finds the point where that one ended
by reading the same entries.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from chatstream.events import HEARTBEAT, ApprovalRequired, Event, ToolCall, ToolResult
from chatstream.runlog import Entry, Reader

# One frame of these streams as an SSE parser sees it: only ``data``, compact JSON (the UI
# message stream's last one is ``[DONE]``).
DATA_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["data"],
    "properties": {"event": {"const": "message"}, "data": {"type": "string"}},
}
HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class Encoder(Protocol):
    """A run's entries as one protocol's frames."""

    @property
    def ended(self) -> bool:
        """True once the stream should end: the run's ending or a pause was written."""
        ...

    def opening(self) -> bytes:
        """The frames before any entry."""
        ...

    def encode(self, entries: Sequence[Entry]) -> bytes:
        """The frames of ``entries``, the next ones of the run (may be empty)."""
        ...

    def closing(self) -> bytes:
        """The frames after the last one (``data: [DONE]``), when the stream ends whole."""
        ...


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


class EncodedStream(Response):
    """Stream a reader's entries through an encoder until it ends or the client hangs up."""

    def __init__(
        self,
        reader: Reader,
        encoder: Encoder,
        *,
        heartbeat_s: float,
        headers: dict[str, str] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(status_code=200, media_type="text/event-stream")
        self.reader = reader
        self.encoder = encoder
        self.heartbeat_s = heartbeat_s
        self.on_close = on_close
        self.stream_headers = HEADERS + [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stats: dict[str, Any] = scope.setdefault("state", {}).setdefault("stream", {})
        reader = self.reader
        encoder = self.encoder
        stats.update(events=0, first_event_s=None, run_id=reader.log.run_id)
        started = time.perf_counter()
        wake = reader.wake
        gone = False
        last_write = time.monotonic()
        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle | None = None

        def tick() -> None:
            # Wake the writer when the line has been quiet for a heartbeat period.
            nonlocal timer
            due = last_write + self.heartbeat_s - time.monotonic()
            if due <= 0:
                wake.set()
                due = self.heartbeat_s
            timer = loop.call_later(due, tick)

        async def watch_disconnect() -> None:
            nonlocal gone
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone = True
                    wake.set()
                    return

        watcher = asyncio.create_task(watch_disconnect())
        timer = loop.call_later(self.heartbeat_s, tick)
        try:
            await send(
                {"type": "http.response.start", "status": 200, "headers": self.stream_headers}
            )
            await send({"type": "http.response.body", "body": encoder.opening(), "more_body": True})
            while not gone and not encoder.ended:
                wake.clear()
                entries = reader.read()
                if entries:
                    if stats["first_event_s"] is None:
                        stats["first_event_s"] = time.perf_counter() - started
                    stats["events"] += len(entries)
                    body = encoder.encode(entries)
                    if body:
                        await send({"type": "http.response.body", "body": body, "more_body": True})
                        last_write = time.monotonic()
                    continue
                if reader.delivered:
                    break
                if time.monotonic() - last_write >= self.heartbeat_s * 0.99:
                    await send({"type": "http.response.body", "body": HEARTBEAT, "more_body": True})
                    last_write = time.monotonic()
                await wake.wait()
            if not gone:
                await send(
                    {"type": "http.response.body", "body": encoder.closing(), "more_body": False}
                )
        except OSError:
            gone = True  # the client went away while we were writing
        finally:
            if timer is not None:
                timer.cancel()
            watcher.cancel()
            reader.close()
            if self.on_close is not None:
                self.on_close()
            stats["disconnected"] = gone
            stats["duration_s"] = time.perf_counter() - started
