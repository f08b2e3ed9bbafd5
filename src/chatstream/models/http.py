"""Streaming HTTP shared by the remote models: SSE payloads, errors, and the request loop.

Both OpenAI's and Anthropic's APIs answer a streaming request with Server-Sent
Events over HTTP; what differs is the request body and the JSON inside, which each
backend writes as an ``HTTPModel`` (its ``request_body``) and a ``StreamReader`` (its
``_read`` and ``finish``). Everything else lives here once.

What a ``ModelError`` says reaches the chat client, so it is a plain sentence: the
provider's own error message is kept (cut to ``MAX_DETAIL`` characters), but exception
text, the provider's host and port, a redirect's target and raw bodies go to the log.
A chunk whose fields have the wrong type is a malformed chunk, never passed on.
"""

from __future__ import annotations

import logging
import ssl
import urllib.parse
import urllib.request
from collections.abc import AsyncGenerator, Sequence
from typing import Any, Protocol

import aiohttp
import certifi
import orjson

from chatstream.errors import ModelError, ModelTimeout
from chatstream.messages import Message
from chatstream.models.base import ModelEvent, ToolSpec

log = logging.getLogger(__name__)

RAW_ARGUMENTS = "_raw"
# Error bodies are read for their message only; a proxy's HTML page need not be read whole.
_MAX_ERROR_BODY = 64 * 1024
# The most of an upstream's words (its error message, a body's text) put in a ModelError.
MAX_DETAIL = 300
# How long an idle connection to the provider is kept for the next request.
KEEPALIVE_S = 30.0


class UpstreamClient:
    """The HTTP client a remote model streams through: one aiohttp session, made on first use.

    aiohttp rather than httpx on this path: each read of a streamed answer is the per-token
    hot path, and ``bench/upstream_client.py`` measured httpx (httpcore, h11, an anyio cancel
    scope per read, a pool walk per request) at 2 to 4x aiohttp's CPU per read and per
    request. httpx
    still serves the tools and the Python client, where nothing is per token.

    The session is made lazily because aiohttp binds it to the running event loop, and a
    model is built before the server's loop starts.
    """

    def __init__(self, url: str, *, headers: dict[str, str], timeout: float) -> None:
        self.url = url
        # Read once: aiohttp's ``trust_env`` would read the environment and ~/.netrc again
        # on every request (a tenth of a turn's CPU at 1,000 concurrent turns).
        self.proxy = env_proxy(url)
        self._headers = headers
        # Connecting gets at most 10 s whatever the read timeout, so a dead host fails fast:
        # ``connect`` covers the whole of it (DNS, a proxy's CONNECT, TLS), ``sock_connect``
        # each TCP attempt. ``sock_read`` is the longest silence between two reads.
        connect = min(timeout, 10.0)
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect, sock_connect=connect, sock_read=timeout
        )
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No cap of its own on connections (aiohttp's default is 100): how many turns
            # stream at once is the server's to limit (CHATSTREAM_MAX_STREAMS_TOTAL).
            connector = aiohttp.TCPConnector(
                limit=0, keepalive_timeout=KEEPALIVE_S, ssl=trusted_roots()
            )
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                timeout=self._timeout,
                connector=connector,
                proxy=self.proxy,
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def trusted_roots() -> ssl.SSLContext:
    """TLS verification against the system's CAs and certifi's bundle.

    The system's include ``SSL_CERT_FILE``/``SSL_CERT_DIR`` (a corporate CA); certifi's
    let a slim container without a CA store still reach the providers.
    """
    context = ssl.create_default_context()
    context.load_verify_locations(cafile=certifi.where())
    return context


def env_proxy(url: str) -> str | None:
    """The proxy that ``HTTP(S)_PROXY``, ``ALL_PROXY`` and ``NO_PROXY`` choose for ``url``.

    As curl and httpx read them: a proxy given without a scheme is an ``http://`` one.
    """
    parts = urllib.parse.urlsplit(url)
    proxies = urllib.request.getproxies()
    if not parts.hostname or urllib.request.proxy_bypass(parts.hostname):
        return None
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if proxy and "://" not in proxy:
        proxy = "http://" + proxy
    return proxy or None


class SSEDecoder:
    """Cuts a byte stream into the ``data`` payloads of its Server-Sent Events.

    Only ``data:`` lines matter: both OpenAI and Anthropic repeat the event type inside
    the JSON, so ``event:``, ``id:``, ``retry:`` and comment lines are skipped. Lines end
    in LF or CRLF (a lone CR, allowed by the SSE spec, is not used by either provider).
    """

    __slots__ = ("_data", "_partial")

    def __init__(self) -> None:
        self._partial = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[bytes]:
        """Take the next bytes; return the payloads of the events they complete."""
        if self._partial:
            chunk = self._partial + chunk
        lines = chunk.split(b"\n")
        self._partial = lines.pop()
        events: list[bytes] = []
        data = self._data
        for line in lines:
            if line[-1:] == b"\r":
                line = line[:-1]
            if not line:
                if data:
                    payload = data[0] if len(data) == 1 else b"\n".join(data)
                    data.clear()
                    if payload:  # an event of empty data is not dispatched (SSE spec)
                        events.append(payload)
            elif line[:5] == b"data:":
                data.append(line[6:] if line[5:6] == b" " else line[5:])
        return events


def parse_arguments(raw: str) -> dict[str, Any]:
    """Tool-call arguments from their JSON text; ``{"_raw": raw}`` when not a JSON object."""
    if not raw or raw.isspace():
        return {}
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {RAW_ARGUMENTS: raw}
    return value if isinstance(value, dict) else {RAW_ARGUMENTS: raw}


def error_detail(body: bytes, fallback: str) -> str:
    """The human message in an error body (OpenAI, Anthropic, FastAPI shapes), else its text.

    Either is cut to ``MAX_DETAIL`` characters, on one line.
    """
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    text = ""
    if isinstance(data, dict):
        error = data.get("error", data.get("detail", data.get("message")))
        if isinstance(error, dict):
            error = error.get("message") or error.get("type")
        if isinstance(error, str):
            text = error
    if not text or text.isspace():
        text = body.decode("utf-8", "replace")
    return _cut(text) or fallback


def _cut(text: str, limit: int = MAX_DETAIL) -> str:
    text = " ".join(text.split())
    return (text[:limit] + "...") if len(text) > limit else text


class Malformed(Exception):
    """A field of a provider's chunk has the wrong type; a reader turns it into a ModelError."""


def load_object(data: bytes) -> dict[str, Any]:
    """One event's JSON, which must be an object (else ``Malformed``)."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise Malformed("not JSON") from None
    if type(value) is not dict:
        raise Malformed(f"a JSON {type(value).__name__}, not an object")
    return value


def malformed_chunk(name: str, problem: object, data: bytes) -> ModelError:
    """The ``ModelError`` for a chunk that breaks the wire format; what was wrong is logged."""
    log.warning("%s: malformed stream chunk (%s): %r", name, problem, data[:500])
    return ModelError(f"{name}: the model provider sent a malformed stream chunk.")


def text_field(obj: dict[str, Any], key: str) -> str:
    """``obj[key]`` when it is a string; ``""`` when missing or null."""
    value = obj.get(key)
    if type(value) is str:
        return value
    if value is None:
        return ""
    raise Malformed(f"{key} is {type(value).__name__}, not a string")


def object_field(obj: dict[str, Any], key: str) -> dict[str, Any]:
    """``obj[key]`` when it is an object; ``{}`` when missing or null."""
    value = obj.get(key)
    if type(value) is dict:
        return value
    if value is None:
        return {}
    raise Malformed(f"{key} is {type(value).__name__}, not an object")


def count_field(obj: dict[str, Any], key: str) -> int | None:
    """``obj[key]`` when it is a token count (an integer, not negative); ``None`` when missing."""
    value = obj.get(key)
    if type(value) is int and value >= 0:
        return value
    if value is None:
        return None
    raise Malformed(f"{key} is {value!r:.40}, not a token count")


def index_field(obj: dict[str, Any], key: str = "index") -> int | None:
    """``obj[key]`` when it is an integer; ``None`` when missing or null."""
    value = obj.get(key)
    if type(value) is int or value is None:
        return value
    raise Malformed(f"{key} is {type(value).__name__}, not an integer")


async def _read_capped(response: aiohttp.ClientResponse) -> bytes:
    body = b""
    while len(body) < _MAX_ERROR_BODY:
        chunk = await response.content.read(_MAX_ERROR_BODY - len(body))
        if not chunk:
            break
        body += chunk
    return body


async def http_error(name: str, response: aiohttp.ClientResponse) -> ModelError:
    """A ``ModelError`` for a 3xx/4xx/5xx answer, with the status and the upstream's message.

    Redirects are not followed (the API key would go along to wherever they point); the
    log names the new location so the base URL can be fixed.
    """
    body = await _read_capped(response)
    detail = error_detail(body, _cut(response.reason or "", 60))
    log.warning("%s: HTTP %d from the provider: %r", name, response.status, body[:2000])
    if location := response.headers.get("location"):
        log.warning("%s: the provider redirected to %s (not followed)", name, location)
        detail += " (a redirect, not followed: the server log names its target)"
    message = f"{name}: HTTP {response.status}: {detail}"
    if retry_after := response.headers.get("retry-after"):
        unit = " s" if retry_after.isdigit() else ""
        message += f" (retry after {_cut(retry_after, 40)}{unit})"
    return ModelError(message)


async def not_an_event_stream(name: str, response: aiohttp.ClientResponse) -> ModelError:
    """A ``ModelError`` for a 200 answer that is not ``text/event-stream``."""
    body = await _read_capped(response)
    log.warning("%s: the provider answered without an event stream: %r", name, body[:2000])
    kind = _cut(response.headers.get("content-type", "no content type"), 60)
    return ModelError(f"{name}: expected an event stream, got {kind}: {error_detail(body, '')}")


# What a network failure is called in a ModelError: the first class that matches wins.
# aiohttp's own words name the host and port, so they go to the log only.
_TRANSPORT_ERRORS: tuple[tuple[type[Exception], str], ...] = (
    (aiohttp.ClientConnectorCertificateError, "the provider's TLS certificate was not trusted"),
    (aiohttp.ClientSSLError, "a TLS connection to the provider could not be made"),
    (aiohttp.ClientProxyConnectionError, "the proxy could not be reached"),
    (aiohttp.ClientHttpProxyError, "the proxy refused the connection"),
    (aiohttp.ClientConnectorError, "the provider could not be reached"),  # DNS too
    (aiohttp.ServerDisconnectedError, "the provider closed the connection"),
)


def transport_error(name: str, exc: Exception, *, started: bool) -> ModelError:
    """A ``ModelError`` for a network failure, saying whether the stream had begun."""
    log.warning("%s: %s failed: %r", name, "the stream" if started else "the request", exc)
    if isinstance(exc, TimeoutError):  # aiohttp's connect and read timeouts are TimeoutErrors
        return ModelTimeout(f"{name}: the provider did not answer in time")
    if started:
        return ModelError(f"{name}: connection lost mid-stream")
    what = next((text for kind, text in _TRANSPORT_ERRORS if isinstance(exc, kind)), None)
    return ModelError(f"{name}: {what or 'the request to the provider failed'}")


class EventReader(Protocol):
    """Turns the bytes of one provider's event stream into model events; no I/O.

    ``done`` is set once the provider's end marker was read; ``error`` when the stream
    went wrong, after ``feed`` returned the events that came before the fault (so the
    partial answer is not lost).
    """

    done: bool
    error: ModelError | None

    def feed(self, chunk: bytes) -> list[ModelEvent]:
        """Take the next bytes of the body; return the events they complete."""
        ...

    def finish(self) -> list[ModelEvent]:
        """The body ended: return what is left, or raise ``ModelError`` if it ended early."""
        ...


class StreamReader:
    """The part of an ``EventReader`` both providers share: the SSE decoder, and a fault kept.

    A provider's reader writes ``_read`` (append the events of the payloads in ``chunk``,
    raise ``ModelError`` at a fault) and ``finish``.
    """

    __slots__ = ("_decoder", "_name", "done", "error")

    def __init__(self, name: str) -> None:
        self._name = name
        self._decoder = SSEDecoder()
        self.done = False
        self.error: ModelError | None = None

    def feed(self, chunk: bytes) -> list[ModelEvent]:
        """Take the next bytes of the body; return the events they complete."""
        events: list[ModelEvent] = []
        try:
            self._read(chunk, events)
        except ModelError as exc:
            self.error = exc  # after the events before it, so the partial answer is kept
        return events

    def _read(self, chunk: bytes, events: list[ModelEvent]) -> None:
        raise NotImplementedError

    def finish(self) -> list[ModelEvent]:
        """The body ended: return what is left, or raise ``ModelError`` if it ended early."""
        raise NotImplementedError


class HTTPModel:
    """A model behind a provider's streaming HTTP API: the request, warm-up and closing.

    A provider writes ``request_body`` and ``reader``.
    """

    def __init__(self, name: str, url: str, *, headers: dict[str, str], timeout: float) -> None:
        self.name = name
        self._client = UpstreamClient(url, headers=headers, timeout=timeout)

    def request_body(self, messages: Sequence[Message], tools: Sequence[ToolSpec]) -> bytes:
        """The JSON body of one streaming request."""
        raise NotImplementedError

    def reader(self) -> EventReader:
        """A fresh reader for one answer."""
        raise NotImplementedError

    def stream(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec]
    ) -> AsyncGenerator[ModelEvent, None]:
        """Stream one model turn: text deltas and tool calls as they come, then usage."""
        body = self.request_body(messages, tools)
        return stream_events(self._client, body, self.reader(), self.name)

    async def warm_up(self, tools: Sequence[ToolSpec], *, system_prompt: str = "") -> None:
        """Nothing to do: the model runs at the provider; the first request connects."""

    async def aclose(self) -> None:
        """Close the HTTP client and its pooled connections."""
        await self._client.aclose()


async def stream_events(
    client: UpstreamClient, body: bytes, reader: EventReader, name: str
) -> AsyncGenerator[ModelEvent, None]:
    """POST ``body`` to the client's URL; yield the events ``reader`` finds in the answer."""
    started = False
    try:
        # ``async with`` inside the generator: closing the generator (cancel, aclose)
        # releases the response unread, which closes its connection, so the provider
        # stops generating.
        async with client.session().post(client.url, data=body, allow_redirects=False) as response:
            if response.status >= 300:
                raise await http_error(name, response)
            if "text/event-stream" not in response.headers.get("content-type", ""):
                raise await not_an_event_stream(name, response)
            started = True
            async for chunk in response.content.iter_any():
                if reader.done:
                    continue  # drain what follows the end so the connection is reused
                for event in reader.feed(chunk):
                    yield event
                if reader.error is not None:
                    raise reader.error
            for event in reader.finish():
                yield event
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise transport_error(name, exc, started=started) from exc
