"""Limits that keep one caller from starving the others: turns per minute, open streams,
and request body size."""

from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict, deque
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatstream.errors import ErrorCode, RateLimited, ServerBusy
from chatstream.server.errors import error_response


class TurnRate:
    """At most ``per_minute`` turns per caller in any sliding minute (0: no limit)."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._starts: dict[str, deque[float]] = defaultdict(deque)
        self._checks = 0

    def check(self, caller: str) -> Callable[[], None]:
        """Count a turn for ``caller``, or refuse it with 429 and how long to wait.

        The returned function takes the turn back off the count (it was refused later).
        """
        if self.per_minute <= 0:
            return _nothing
        now = time.monotonic()
        self._checks += 1
        if self._checks % 1024 == 0:
            # Forget callers idle for a minute, so a flood of addresses cannot grow this.
            for idle in [c for c, s in self._starts.items() if not s or now - s[-1] >= 60]:
                del self._starts[idle]
        starts = self._starts[caller]
        while starts and now - starts[0] >= 60:
            starts.popleft()
        if len(starts) >= self.per_minute:
            wait = math.ceil(60 - (now - starts[0]))
            raise RateLimited(
                f"At most {self.per_minute} turns a minute; try again in {wait} s.",
                retry_after_s=wait,
            )
        starts.append(now)

        def refund() -> None:
            if now in starts:
                starts.remove(now)

        return refund


def _nothing() -> None:
    return None


class StreamSlots:
    """Open event streams, per caller and in all (0: no limit)."""

    def __init__(self, per_caller: int, total: int, on_change: Callable[[int], None]) -> None:
        self.per_caller = per_caller
        self.total = total
        self._open: dict[str, int] = defaultdict(int)
        self._count = 0
        self._on_change = on_change

    def acquire(self, caller: str) -> Callable[[], None]:
        """Take a slot for one stream; the returned function gives it back (once)."""
        if self.total and self._count >= self.total:
            raise ServerBusy(
                f"The server has {self._count} streams open, its limit; try again shortly."
            )
        if self.per_caller and self._open[caller] >= self.per_caller:
            raise RateLimited(
                f"At most {self.per_caller} streams may be open at once per caller.",
                code=ErrorCode.TOO_MANY_STREAMS,
                retry_after_s=1,
            )
        self._open[caller] += 1
        self._count += 1
        self._on_change(self._count)
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self._count -= 1
            self._open[caller] -= 1
            if not self._open[caller]:
                del self._open[caller]
            self._on_change(self._count)

        return release


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes (413) or slower than ``timeout_s`` (408)."""

    def __init__(self, app: ASGIApp, *, limit: int, timeout_s: float) -> None:
        self.app = app
        self.limit = limit
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        # Read the body up front (it is small by definition) so an oversized chunked
        # body is refused before the application sees any of it.
        chunks: list[bytes] = []
        size = 0
        more = True
        try:
            async with asyncio.timeout(self.timeout_s):
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.limit:
                        await self._refuse(scope, receive, send)
                        return
                    chunks.append(chunk)
                    more = message.get("more_body", False)
        except TimeoutError:
            response = error_response(
                408, ErrorCode.REQUEST_TIMEOUT, f"The request body took over {self.timeout_s:g} s."
            )
            await response(scope, receive, send)
            return
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413, ErrorCode.REQUEST_TOO_LARGE, f"The request body is over {self.limit} bytes."
        )
        await response(scope, receive, send)
