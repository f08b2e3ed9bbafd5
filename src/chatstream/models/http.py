"""Streaming HTTP shared by the remote models: SSE payloads, errors, and the request loop.

Both OpenAI's and Anthropic's APIs answer a streaming request with Server-Sent
Events over HTTP; what differs is the JSON inside, which each backend's
``EventReader`` turns into model events. Everything else lives here once.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Protocol

import httpx
import orjson

from chatstream.errors import ModelError, ModelTimeout
from chatstream.models.base import ModelEvent

RAW_ARGUMENTS = "_raw"
# Error bodies are read for their message only; a proxy's HTML page need not be read whole.
_MAX_ERROR_BODY = 64 * 1024
# httpcore's pool walks all its connections on every request and release, which is
# quadratic work at a thousand concurrent streams (bench/run.py measured it taking most
# of the CPU and seconds of time to first token at C=1,000). Several small pools, used in
# turn, keep each walk short; together they allow as many connections as one big pool.
POOL_SHARDS = 16
LIMITS = httpx.Limits(max_connections=128, max_keepalive_connections=32, keepalive_expiry=30)


class ClientPool:
    """``POOL_SHARDS`` httpx clients with the same settings; a request takes the least busy.

    The least busy, lowest first: one request at a time always uses the first client and
    its kept-alive connection, while concurrent requests spread over all of them.
    """

    def __init__(
        self,
        *,
        headers: dict[str, str],
        timeout: float,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        # Connecting gets at most 10 s whatever the read timeout: a dead host fails fast.
        timeouts = httpx.Timeout(timeout, connect=min(timeout, 10.0))
        self._clients = [
            httpx.AsyncClient(headers=headers, timeout=timeouts, transport=transport, limits=LIMITS)
            for _ in range(POOL_SHARDS)
        ]
        self._busy = [0] * POOL_SHARDS

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[httpx.AsyncClient]:
        """A client for one request, counted busy until the block ends."""
        index = self._busy.index(min(self._busy))
        self._busy[index] += 1
        try:
            yield self._clients[index]
        finally:
            self._busy[index] -= 1

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()


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
    """The human message in an error body (OpenAI, Anthropic, FastAPI shapes), else its text."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        error = data.get("error", data.get("detail", data.get("message")))
        if isinstance(error, dict):
            error = error.get("message") or error.get("type")
        if isinstance(error, str) and error:
            return error
    text = " ".join(body.decode("utf-8", "replace").split())
    return (text[:300] + "...") if len(text) > 300 else (text or fallback)


async def _read_capped(response: httpx.Response) -> bytes:
    body = b""
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) >= _MAX_ERROR_BODY:
            break
    return body


async def http_error(name: str, response: httpx.Response) -> ModelError:
    """A ``ModelError`` for a 4xx/5xx answer, carrying the status and the upstream's message."""
    detail = error_detail(await _read_capped(response), response.reason_phrase)
    message = f"{name}: HTTP {response.status_code}: {detail}"
    if retry_after := response.headers.get("retry-after"):
        unit = " s" if retry_after.isdigit() else ""
        message += f" (retry after {retry_after}{unit})"
    return ModelError(message)


async def not_an_event_stream(name: str, response: httpx.Response) -> ModelError:
    """A ``ModelError`` for a 200 answer that is not ``text/event-stream``."""
    detail = error_detail(await _read_capped(response), "")
    kind = response.headers.get("content-type", "no content type")
    return ModelError(f"{name}: expected an event stream, got {kind}: {detail}")


def transport_error(name: str, exc: httpx.HTTPError, *, started: bool) -> ModelError:
    """A ``ModelError`` for a network failure, saying whether the stream had begun."""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return ModelTimeout(f"{name}: the provider did not answer in time ({detail})")
    if started:
        return ModelError(f"{name}: connection lost mid-stream ({detail})")
    return ModelError(f"{name}: request failed ({detail})")


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


async def stream_events(
    clients: ClientPool, url: str, body: bytes, reader: EventReader, name: str
) -> AsyncGenerator[ModelEvent, None]:
    """POST ``body`` to ``url`` and yield the events ``reader`` finds in the streamed answer."""
    started = False
    try:
        # ``async with`` inside the generator: closing the generator (cancel, aclose)
        # closes the HTTP response, so the provider stops generating.
        async with clients.lease() as client, client.stream("POST", url, content=body) as response:
            if response.status_code >= 400:
                raise await http_error(name, response)
            if "text/event-stream" not in response.headers.get("content-type", ""):
                raise await not_an_event_stream(name, response)
            started = True
            async for chunk in response.aiter_bytes():
                if reader.done:
                    continue  # drain what follows the end so the connection is reused
                for event in reader.feed(chunk):
                    yield event
                if reader.error is not None:
                    raise reader.error
            for event in reader.finish():
                yield event
    except httpx.HTTPError as exc:
        raise transport_error(name, exc, started=started) from exc
