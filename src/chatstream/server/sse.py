"""The event-stream response: one reader of a run's log, written to one connection.

A raw ASGI response rather than ``StreamingResponse``: it writes every frame the
run has ready in one ``send`` (several tokens that arrived together cost one
write), sends ``: ping`` comments while nothing is due, and notices a client
that went away without waiting for the next write to fail.

What it writes comes from an ``Encoder``: the native stream's (``EventStream``) joins
the frames the run log already holds; the frontends' protocols (``ui_stream.py``,
``agui.py``) encode the log's typed entries into their own, and may end the stream
before the run ends (a protocol whose stream ends while the run waits for a person).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from chatstream.events import HEARTBEAT, encode_cursor, encode_retry
from chatstream.runlog import Entry, Reader

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


class NativeEncoder:
    """chatstream's own frames: made once, when each entry was logged."""

    __slots__ = ("reader", "retry_ms")

    def __init__(self, reader: Reader, *, retry_ms: int) -> None:
        self.reader = reader
        self.retry_ms = retry_ms

    @property
    def ended(self) -> bool:
        return self.reader.delivered

    def opening(self) -> bytes:
        # Before any event: the retry delay, and the id to resume from. An EventSource that
        # loses the line before the first event then reconnects with Last-Event-ID (and
        # resumes) instead of sending the turn again.
        return encode_retry(self.retry_ms) + encode_cursor(self.reader.log.run_id, self.reader.seq)

    def encode(self, entries: Sequence[Entry]) -> bytes:
        return b"".join([e.frame for e in entries])

    def closing(self) -> bytes:
        return b""


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


class EventStream(EncodedStream):
    """The native stream of a reader's entries, until the run's terminal event."""

    def __init__(
        self,
        reader: Reader,
        *,
        heartbeat_s: float,
        retry_ms: int,
        headers: dict[str, str] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        encoder = NativeEncoder(reader, retry_ms=retry_ms)
        super().__init__(
            reader, encoder, heartbeat_s=heartbeat_s, headers=headers, on_close=on_close
        )
