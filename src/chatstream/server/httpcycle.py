"""The response side of a request that closes its connection, or comes over HTTP/1.0.

uvicorn's ``RequestResponseCycle`` writes the application's headers as they are, adds
``connection: close`` when the connection will not be kept unless one is there
already, and sends any response without a length chunked. Two things go wrong:

* An event stream sets ``connection: keep-alive``. When the connection is not kept
  (an HTTP/1.0 client, ``Connection: close`` from an HTTP/1.1 one), the response
  carried both ``connection: keep-alive`` and ``connection: close``.
* An HTTP/1.0 client knows no chunked encoding (RFC 9112 section 7: a server must not
  send it one), yet got every stream chunked.

``CloseAwareCycle`` writes the one Connection header itself, from what the server will
do, and sends an HTTP/1.0 response without a length as it is, ended by closing the
connection (RFC 9112 section 6.3). An HTTP/1.0 client that asks to keep the connection
(``Connection: keep-alive``, HTTP/1.0's extension, as ``ab -k`` sends) keeps it for a
response with a length and is told so with ``connection: keep-alive``. The status line
stays ``HTTP/1.1``: RFC 9110 section 6.2 has a server send its own version, and the
framing above is what an HTTP/1.0 client relies on.

Other requests keep uvicorn's cycle, so a stream's per-token path is uvicorn's own.
"""

from __future__ import annotations

from uvicorn._types import ASGISendEvent, HTTPResponseStartEvent
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

# Headers about the connection that only the server may set on a response.
_CONNECTION_HEADERS = frozenset({b"connection", b"keep-alive", b"transfer-encoding"})
_BODYLESS_STATUSES = frozenset({204, 304})


def needs_close_aware_cycle(cycle: RequestResponseCycle) -> bool:
    """Whether ``cycle``'s response needs ``CloseAwareCycle``: HTTP/1.0, or not kept alive."""
    return cycle.scope["http_version"] == "1.0" or not cycle.keep_alive


class CloseAwareCycle(RequestResponseCycle):
    """``RequestResponseCycle`` with one Connection header and HTTP/1.0 framing."""

    # True once the response is an HTTP/1.0 one without a length: its end is the close.
    close_delimited = False

    async def send(self, message: ASGISendEvent) -> None:
        if message["type"] == "http.response.start" and not self.response_started:
            message = self._start(message)
        elif self.close_delimited and message["type"] == "http.response.body":
            if not self.response_complete:
                await self._send_close_delimited(
                    message.get("body", b""), message.get("more_body", False)
                )
                return
        await super().send(message)

    def _start(self, message: HTTPResponseStartEvent) -> HTTPResponseStartEvent:
        """The application's headers less those about the connection, plus one Connection."""
        headers = []
        framed = self.scope["method"] == "HEAD" or message["status"] in _BODYLESS_STATUSES
        for name, value in message.get("headers", []):
            lowered = name.lower()
            if lowered == b"connection":
                if b"close" in (token.strip().lower() for token in value.split(b",")):
                    self.keep_alive = False  # the application asked to close
            elif lowered not in _CONNECTION_HEADERS:
                framed = framed or lowered == b"content-length"
                headers.append((name, value))
            elif lowered == b"transfer-encoding" and self.scope["http_version"] != "1.0":
                headers.append((name, value))
        if self.scope["http_version"] == "1.0" and not framed:
            self.keep_alive = False
            self.close_delimited = True
            self.chunked_encoding = False  # so that uvicorn adds no transfer-encoding
        headers.append((b"connection", b"keep-alive" if self.keep_alive else b"close"))
        return {**message, "headers": headers}

    async def _send_close_delimited(self, body: bytes, more_body: bool) -> None:
        # uvicorn's own body path, less the length it would insist on.
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        if body:
            self.transport.write(body)
        if not more_body:
            self.response_complete = True
            self.message_event.set()
            self.transport.close()
            self.on_response()
