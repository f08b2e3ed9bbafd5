"""One log line per request: method, path, query, body, status, duration; stream figures too.

A pure ASGI middleware, because ``BaseHTTPMiddleware`` would buffer the event
stream. It never logs per token: a stream's figures (time to first event, event
count) are written by the stream into ``scope["state"]["stream"]`` and logged
once, when the response ends.

What the line shows of a request is bounded and has no secrets in it:

* the values of secret-looking keys (``api_key``, ``access_token``, ``password``…)
  are hidden in the query and the body; the target (path and query) and the body
  are each cut to ``body_limit`` characters;
* the middleware keeps only ``body_limit`` bytes of a body, so a larger JSON body no
  longer parses: its text is redacted by pattern (``"api_key": "…"`` pairs, a value
  cut off mid-way included), as a form-encoded body or a query is. A value needs
  only its key, which comes before it, so redacting a cut text shows no secret;
* the path is logged as sent (percent-encoded), and text that did not parse has its
  control characters escaped, so no request can write a log line of its own.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any
from urllib.parse import unquote_plus

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("chatstream.http")

SECRET_KEY = re.compile(r"(authorization|api[-_]?key|^key$|token|secret|password)", re.I)
REDACTED = "[redacted]"

# Every key SECRET_KEY matches holds one of these: JSON text without any of them (most
# text) is passed by a few substring scans, before the Python loop over its keys runs.
_HINTS = ("authoriz", "key", "token", "secret", "password")
# A JSON key and its colon, in text that did not parse; then the key's value: a string,
# perhaps cut off; an object or array, whose end cannot be found without parsing, so
# it hides the rest of the text; or a number, true, false or null. The possessive
# quantifiers keep the scan linear whatever the text.
_JSON_KEY = re.compile(r'"([^"\\]{0,256}+)"\s*+:\s*+')
_JSON_VALUE = re.compile(r'"(?:[^"\\]++|\\.)*+\\?"?|[\[{][\s\S]*|[^\s,\]}]++')
# One key=value pair of a query or a form body; the key is judged once decoded.
_PAIR = re.compile(r"(?:^|(?<=&))([^&=]*+)=[^&]*+")
# What a log reader could take for the end of a line, or a terminal for a command.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x85\u2028\u2029]")


def redact_query(query: str) -> str:
    """The query string, as sent, with the values of secret-looking keys hidden."""
    return _PAIR.sub(_hide_pair, query)


def _hide_pair(pair: re.Match[str]) -> str:
    key = pair[1]
    decoded = unquote_plus(key) if "%" in key else key
    return f"{key}={REDACTED}" if SECRET_KEY.search(decoded) else pair[0]


def redact_text(text: str) -> str:
    """Text that may hold ``"key": "value"`` or ``key=value`` pairs, secret values hidden.

    Meant for a body that did not parse: its control characters come out escaped
    (``\\n``), so the text stays on its own log line.
    """
    if text.lstrip()[:1] in ("{", "["):
        lowered = text.lower()
        if any(hint in lowered for hint in _HINTS):
            text = _redact_json_text(text)
    else:
        text = redact_query(text)
    if not text.isprintable():
        # Line breaks by C-speed replacements (a pretty-printed body has many), the rare
        # rest one match at a time; tabs stay.
        text = text.replace("\n", "\\n").replace("\r", "\\r")
        if not text.replace("\t", " ").isprintable():
            text = _CONTROL.sub(_escaped, text)
    return text


def _escaped(char: re.Match[str]) -> str:
    return char[0].encode("unicode_escape").decode("ascii")


def _redact_json_text(text: str) -> str:
    parts: list[str] = []
    done = 0
    for key in _JSON_KEY.finditer(text):
        if key.start() < done or not SECRET_KEY.search(key[1]):
            continue
        value = _JSON_VALUE.match(text, key.end())
        if value is not None:
            parts += (text[done : key.end()], f'"{REDACTED}"')
            done = value.end()
    parts.append(text[done:])
    return "".join(parts)


def redact_body(body: bytes, limit: int) -> str:
    """A body with secret-looking values hidden, then cut to ``limit`` characters."""
    if not body:
        return ""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        # Cut already (the middleware keeps one byte over ``limit`` to tell), or not JSON.
        text = redact_text(body[:limit].decode("utf-8", "replace"))
        return text + "…" if len(body) > limit else text
    return _cut(orjson.dumps(_redact(value)).decode(), limit)


def _redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: REDACTED if isinstance(k, str) and SECRET_KEY.search(k) else _redact(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_redact(v) for v in value]
    return value


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


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
        raw_path = scope.get("raw_path")
        path = raw_path.decode("latin-1") if raw_path else scope["path"]
        # Hiding a value needs only its key, which comes first, so cutting the query to the
        # bound before redacting shows no secret and keeps the work per request bounded;
        # the target is cut to the bound again after.
        query = scope.get("query_string", b"")[: self.body_limit + 1].decode("latin-1")
        target = _cut(path + ("?" + redact_query(query) if query else ""), self.body_limit)
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
