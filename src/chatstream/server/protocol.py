"""uvicorn's HTTP protocol with two changes: a header timeout, and raw UTF-8 URLs.

* uvicorn closes a keep-alive connection that stays idle after a response, but a
  connection that sends nothing, or sends its headers a byte at a time (the
  slow-loris attack), is held open forever. This protocol gives a new connection
  and every request's headers ``header_timeout_s`` to arrive, then closes it.
* ``curl "http://…/api/chat/stream?message=서울날씨알려줘"`` sends the Korean as raw
  UTF-8 bytes in the request line, which RFC 3986 does not allow and the parser
  refuses. Browsers percent-encode such bytes before sending; this protocol does
  the same on arrival (bytes 0x80-0xFF of the request line become ``%XX``), so the
  seed's own example works as written. Nothing else about the request changes.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from chatstream.config import Settings

_NON_ASCII = re.compile(rb"[\x80-\xff]")


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` that closes connections whose request headers dawdle."""

    header_timeout_s = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._in_request_line = True

    def data_received(self, data: bytes) -> None:
        if self._in_request_line:
            end = data.find(b"\n")
            line, rest = (data, b"") if end < 0 else (data[:end], data[end:])
            if not line.isascii():
                line = _NON_ASCII.sub(lambda m: b"%%%02X" % m.group()[0], line)
            self._in_request_line = end < 0
            data = line + rest
        super().data_received(data)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_request_line = True

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def uvicorn_config(app: Any, settings: Settings, **options: Any) -> uvicorn.Config:
    """The uvicorn configuration chatstream serves with (the CLI and the tests alike)."""
    protocol = type(
        "ChatstreamHttpProtocol",
        (GuardedHttpToolsProtocol,),
        {"header_timeout_s": settings.header_timeout_s},
    )
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=protocol,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 5,
        lifespan="on",
        **options,
    )
