"""uvicorn's HTTP protocol, with bounds on what a request's head may take, JSON refusals,
raw UTF-8 URLs, and HTTP/1.0 answered as HTTP/1.0.

* uvicorn closes a keep-alive connection that stays idle after a response, but a
  connection that sends nothing, or sends its headers a byte at a time (the
  slow-loris attack), is held open forever. This protocol gives a new connection
  and every request's headers ``header_timeout_s`` to arrive, then closes it.
* Nor does it bound the headers: the parser gathers a header line however long it
  grows, copying it on every read, so 16 connections each sending one endless line
  took the server to 800 MB and stalled every stream for seconds. Here the request
  line and headers may take ``max_header_bytes`` in all (64 KiB, counted as they
  arrive, before the parser sees them) and ``max_headers`` headers (100); past either,
  the request is refused with ``431 HEADERS_TOO_LARGE`` and nothing more is read.
  (Pipelining: the bytes of a request that share a read with the end of the one
  before it are not counted, so such a head may pass the bound by one read, 256 KiB.)
* What the parser refuses (bad framing, a bad request line) was answered with a
  ``text/plain`` 400; here it is ``400 INVALID_REQUEST`` with the JSON error body the
  rest of the API uses, with the parser's reason. A refusal goes out after the
  responses to the requests before it on the connection (pipelining), then the
  connection closes. A request whose body the parser refuses after its application
  started is told the client went away, as a dropped connection would tell it.
* ``curl "http://…/api/chat/stream?message=서울날씨알려줘"`` sends the Korean as raw
  UTF-8 bytes in the request line, which RFC 3986 does not allow and the parser
  refuses. Browsers percent-encode such bytes before sending; this protocol does
  the same on arrival (bytes 0x80-0xFF of the request line become ``%XX``), so the
  seed's own example works as written. Nothing else about the request changes.
* Responses to HTTP/1.0, and to requests that close their connection, go through
  ``httpcycle.CloseAwareCycle``: one Connection header, and no chunked encoding for
  HTTP/1.0 (a stream ends with the connection).

* A response can end before its request's body has all arrived: a 413 or 408, or any
  answer to a GET that declared a body. uvicorn then reads and throws the rest away for
  as long as it keeps coming, so a client that trickles a body held its connection
  (and a file descriptor) forever, and one that sends fast kept the CPU busy with it.
  Here the rest of the body has ``LINGER_S`` and ``LINGER_BYTES`` to arrive (a client
  that sent it whole goes on with its connection as before); past either, the
  connection closes.

``data_received`` counts only while a request's head is arriving: a body costs two
attribute tests per read.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httptools
import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from chatstream.config import Settings
from chatstream.errors import ErrorCode
from chatstream.server.httpcycle import CloseAwareCycle, needs_close_aware_cycle

_NON_ASCII = re.compile(rb"[\x80-\xff]")

MAX_HEADER_BYTES = 64 * 1024
MAX_HEADERS = 100
# How much of an answered request's unread body is taken (and dropped) before closing.
LINGER_S = 2.0
LINGER_BYTES = 1 << 20


class _TooManyHeaders(Exception):
    """Raised from the parser's header callback to stop the parse."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` that bounds and times request heads and refuses in JSON."""

    header_timeout_s = 10.0
    max_header_bytes = MAX_HEADER_BYTES
    max_headers = MAX_HEADERS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._in_request_line = True
        # Bytes the head of the request now arriving may still take; None while a
        # request's body is read.
        self._header_room: int | None = self.max_header_bytes
        self._head_ended = False  # on_headers_complete ran during the latest feed
        self._in_body = False  # the request being read has its cycle: its body is due
        self._refused = False
        self._refusal: bytes | None = None  # held until earlier responses are sent
        # Bytes an answered request's body may still take before the connection closes,
        # and the timer that closes it; None while no answered body is due.
        self._linger_room: int | None = None
        self._linger_timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        if self._linger_room is not None:
            self._linger_room -= len(data)
            if self._linger_room < 0:
                self._close()
                return
        if self._refused:
            self.transport.pause_reading()  # uvicorn resumes reading after a response
            return
        while self._header_room is not None and len(data) > self._header_room:
            # Feed what fits; if the head has not ended within it, it is too large.
            room = self._header_room
            self._head_ended = False
            self._feed_head(data[:room])
            if self._refused:
                return
            if not self._head_ended:
                self._refuse_too_large(
                    f"The request line and headers exceed {self.max_header_bytes} bytes."
                )
                return
            data = data[room:]  # a body, or the next request (counted on the next turn)
        if self._header_room is None:
            self._feed(data)
        else:
            self._header_room -= len(data)
            self._feed_head(data)

    def _feed_head(self, data: bytes) -> None:
        if self._in_request_line:
            end = data.find(b"\n")
            line, rest = (data, b"") if end < 0 else (data[:end], data[end:])
            if not line.isascii():
                line = _NON_ASCII.sub(lambda m: b"%%%02X" % m.group()[0], line)
            self._in_request_line = end < 0
            data = line + rest
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        # uvicorn's data_received, with the parser's refusals answered in JSON.
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, _TooManyHeaders):
                self._refuse_too_large(f"The request has more than {self.max_headers} headers.")
                return
            # A callback's own failure (parse_url's, say) says more than the parser's.
            reason = cause if isinstance(cause, httptools.HttpParserError) else exc
            self._refuse(400, ErrorCode.INVALID_REQUEST, f"Invalid HTTP request: {reason}.")

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self.headers) >= self.max_headers:
            raise _TooManyHeaders
        super().on_header(name, value)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        self._header_room = None
        self._head_ended = True
        super().on_headers_complete()
        cycle = self.cycle
        # None or an earlier request's cycle when uvicorn upgraded the connection.
        self._in_body = cycle is not None and cycle.scope is self.scope
        if self._in_body and needs_close_aware_cycle(cycle):
            # uvicorn builds the cycle itself, with no say in its class; it is switched
            # before the cycle's task first runs, so every send goes through it.
            cycle.__class__ = CloseAwareCycle
            if self.scope["http_version"] == "1.0":
                cycle.keep_alive = self.parser.should_keep_alive()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._stop_lingering()
        self._in_request_line = True
        self._in_body = False
        self._header_room = self.max_header_bytes

    def on_response_complete(self) -> None:
        last = not self.pipeline
        # The request being read (the last one) was answered before its body ended.
        unread = self._in_body and self.cycle is not None and self.cycle.response_complete
        super().on_response_complete()
        if self._refused and last:
            self._send_refusal()
        elif unread and self._linger_room is None:
            self._linger_room = LINGER_BYTES
            self._linger_timer = self.loop.call_later(LINGER_S, self._close)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._stop_lingering()
        super().connection_lost(exc)

    def _stop_lingering(self) -> None:
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        self._linger_room = None

    def _refuse_too_large(self, message: str) -> None:
        self._refuse(431, ErrorCode.HEADERS_TOO_LARGE, message)

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Stop reading, and answer once the responses before this request are sent."""
        self._refused = True
        self._disarm()
        self.transport.pause_reading()
        self.logger.warning("Refused a request from %s: %s", _peer(self.client), message)
        self._refusal = _error_response(status, code, message, self.server_state.default_headers)
        waiting = bool(self.pipeline)
        broken = self.cycle if self._in_body else None
        if broken is None:
            waiting = waiting or (self.cycle is not None and not self.cycle.response_complete)
        elif queued := [entry for entry in self.pipeline if entry[0] is broken]:
            # Refused before its turn came: it never runs; the one before it is running.
            self.pipeline.remove(queued[0])
            waiting = True
        else:
            # Its application runs and reads the body: it is told the client is gone,
            # and sends nothing more. Too late for a 400 once its response has started.
            broken.disconnected = True
            broken.message_event.set()
            if broken.response_started:
                self._refusal = None
        if not waiting:
            self._send_refusal()

    def _send_refusal(self) -> None:
        if self._refusal is not None and not self.transport.is_closing():
            self.transport.write(self._refusal)
        self._close()
        self._refusal = None

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _too_slow(self) -> None:
        self._header_timer = None
        self._close()

    def _close(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()


def _error_response(
    status: int, code: str, message: str, default_headers: list[tuple[bytes, bytes]]
) -> bytes:
    """A whole response with the API's JSON error body, closing the connection."""
    body = orjson.dumps({"error": {"code": code, "message": message}})
    head = [STATUS_LINE[status]]
    head += [name + b": " + value + b"\r\n" for name, value in default_headers]
    head += [
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
        b"connection: close\r\n\r\n",
    ]
    return b"".join(head) + body


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "an unknown peer"


def uvicorn_config(
    app: Any,
    settings: Settings,
    *,
    max_header_bytes: int = MAX_HEADER_BYTES,
    max_headers: int = MAX_HEADERS,
    **options: Any,
) -> uvicorn.Config:
    """The uvicorn configuration chatstream serves with (the CLI and the tests alike)."""
    protocol = type(
        "ChatstreamHttpProtocol",
        (GuardedHttpToolsProtocol,),
        {
            "header_timeout_s": settings.http.header_timeout_s,
            "max_header_bytes": max_header_bytes,
            "max_headers": max_headers,
        },
    )
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=protocol,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=int(settings.streams.shutdown_grace_s) + 5,
        lifespan="on",
        **options,
    )
