"""The event-stream response: one reader of a run's log, written to one connection.

A raw ASGI response rather than ``StreamingResponse``: it writes every frame the
run has ready in one ``send`` (several tokens that arrived together cost one
write), sends ``: ping`` comments while nothing is due, and notices a client
that went away without waiting for the next write to fail.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from chatstream.events import HEARTBEAT, encode_cursor, encode_retry
from chatstream.runlog import Reader

HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class EventStream(Response):
    """Stream a reader's entries until the run's terminal event or a disconnect."""

    def __init__(
        self,
        reader: Reader,
        *,
        heartbeat_s: float,
        retry_ms: int,
        headers: dict[str, str] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(status_code=200, media_type="text/event-stream")
        self.reader = reader
        self.heartbeat_s = heartbeat_s
        self.retry_ms = retry_ms
        self.on_close = on_close
        self.stream_headers = HEADERS + [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stats: dict[str, Any] = scope.setdefault("state", {}).setdefault("stream", {})
        reader = self.reader
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
            # Before any event: the retry delay, and the id to resume from. An EventSource
            # that loses the line before the first event then reconnects with
            # Last-Event-ID (and resumes) instead of sending the turn again.
            preamble = encode_retry(self.retry_ms) + encode_cursor(reader.log.run_id, reader.seq)
            await send({"type": "http.response.body", "body": preamble, "more_body": True})
            while not gone:
                wake.clear()
                entries = reader.read()
                if entries:
                    if stats["first_event_s"] is None:
                        stats["first_event_s"] = time.perf_counter() - started
                    stats["events"] += len(entries)
                    body = b"".join([e.frame for e in entries])
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                    last_write = time.monotonic()
                    if reader.delivered:
                        break
                    continue
                if reader.delivered:
                    break
                if time.monotonic() - last_write >= self.heartbeat_s * 0.99:
                    await send({"type": "http.response.body", "body": HEARTBEAT, "more_body": True})
                    last_write = time.monotonic()
                await wake.wait()
            if not gone:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
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
