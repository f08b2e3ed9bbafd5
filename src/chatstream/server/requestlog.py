"""One log line per request: method, path, query, body, status, duration; stream figures too.

A pure ASGI middleware, because ``BaseHTTPMiddleware`` would buffer the event
stream. It never logs per token: a stream's figures (time to first event, event
count) are written by the stream into ``scope["state"]["stream"]`` and logged
once, when the response ends.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("chatstream.http")

SECRET_KEY = re.compile(r"(authorization|api[-_]?key|^key$|token|secret|password)", re.I)
REDACTED = "[redacted]"


def redact_query(query: str) -> str:
    """The query string with the values of secret-looking keys hidden."""
    pairs = parse_qsl(query, keep_blank_values=True)
    return urlencode([(k, REDACTED if SECRET_KEY.search(k) else v) for k, v in pairs])


def redact_body(body: bytes, limit: int) -> str:
    """A JSON body with secret-looking values hidden, cut to ``limit`` bytes."""
    if not body:
        return ""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body[:limit].decode("utf-8", "replace")
    else:
        text = orjson.dumps(_redact(value)).decode()
    return text if len(text) <= limit else text[:limit] + "…"


def _redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: REDACTED if isinstance(k, str) and SECRET_KEY.search(k) else _redact(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_redact(v) for v in value]
    return value


class RequestLog:
    """Log each HTTP request once, when its response is over."""

    def __init__(self, app: ASGIApp, *, body_limit: int = 2048) -> None:
        self.app = app
        self.body_limit = body_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        body = bytearray()
        status = 0

        async def receive_logged() -> Message:
            message = await receive()
            if message["type"] == "http.request" and len(body) < self.body_limit:
                body.extend(message.get("body", b"")[: self.body_limit - len(body) + 1])
            return message

        async def send_logged(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive_logged, send_logged)
        finally:
            self._log(scope, bytes(body), status or 500, time.perf_counter() - started)

    def _log(self, scope: Scope, body: bytes, status: int, duration: float) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        query = scope.get("query_string", b"").decode("latin-1")
        target = scope["path"] + ("?" + redact_query(query) if query else "")
        parts = [f"{scope['method']} {target} {status} {duration * 1000:.1f}ms"]
        if body:
            parts.append(f"body={redact_body(body, self.body_limit)}")
        stream = scope.get("state", {}).get("stream")
        if stream:
            first = stream.get("first_event_s")
            parts.append(
                f"run={stream.get('run_id')} events={stream.get('events', 0)}"
                + (f" first_event={first * 1000:.1f}ms" if first is not None else "")
                + (" client_left" if stream.get("disconnected") else "")
            )
        log.info(" ".join(parts))
