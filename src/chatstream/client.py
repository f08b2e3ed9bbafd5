"""A Python client for a chatstream server: the stream parsed back into typed events.

``Client`` (blocking) and ``AsyncClient`` (asyncio) have the same methods::

    with Client("http://127.0.0.1:3002") as client:
        for event in client.stream("What's the weather in Seoul?"):
            ...
        result = client.chat("hello")          # ChatResult: text, tool calls and results
        client.approve(run_id, call_id)        # a tool call that waits for approval: yes

A stream whose connection drops before its terminal event is resumed by itself:
the client asks again with ``Last-Event-ID: <runId>:<seq>``, waits the server's
``retry:`` between tries (doubling after each try that brought nothing), and
gives up after ``max_retries`` such tries in a row. No event is yielded twice.

What it raises::

    ClientException            the root of this module's exceptions
    ├── ClientError            the server refused the request: status, code, message
    ├── RunFailed              chat() only: the run ended with an `error` event
    └── ConnectionFailed       the server could not be reached, or a dropped stream
                               could not be resumed (retries spent, or the run expired)

An ``error`` event is an event like the others while streaming; only ``chat()``
turns it into ``RunFailed``.

The two clients are thin shells, as in httpx: what to send and what an answer means
has no I/O and lives once (``_Turn`` for a stream, ``_Call`` for a JSON endpoint), so
the blocking and asyncio code only sends, reads and sleeps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import httpx

from chatstream.events import (
    ApprovalRequired,
    Done,
    Error,
    Event,
    Frame,
    FrameDecoder,
    ToolCall,
    ToolResult,
    Transcript,
    parse_event,
)

__all__ = [
    "Approval",
    "ApprovalRequired",
    "AsyncChatStream",
    "AsyncClient",
    "ChatResult",
    "ChatStream",
    "Client",
    "ClientError",
    "ClientException",
    "ConnectionFailed",
    "RunFailed",
]

DEFAULT_URL = "http://127.0.0.1:3002"
# The server sends a comment every 15 s while a run is quiet, so a read that waits
# much longer than that means the connection is dead: treat it as a drop and resume.
DEFAULT_TIMEOUT = httpx.Timeout(10.0, read=60.0)
DEFAULT_RETRY_S = 3.0
MAX_RETRY_DELAY_S = 30.0
STREAM_PATH = "/api/chat/stream"
# A resume answered with one of these is tried again, like a dropped connection.
RETRYABLE = frozenset({502, 503, 504})

_T = TypeVar("_T")


class ClientException(Exception):
    """Root of the exceptions this module raises."""


class ClientError(ClientException):
    """The server refused the request with a JSON error (``{"error": {code, message}}``)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class RunFailed(ClientException):
    """The run ended with an ``error`` event; ``text`` is the answer written before it."""

    def __init__(self, code: str, message: str, *, text: str = "", run_id: str | None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.text = text
        self.run_id = run_id


class ConnectionFailed(ClientException):
    """The server could not be reached, or a dropped stream could not be resumed."""


@dataclass(frozen=True, slots=True)
class ChatResult:
    """A finished turn: the answer (the text after the last tool call), its tools, its session."""

    text: str
    session_id: str
    run_id: str
    history_length: int
    usage: dict[str, int] = field(default_factory=dict)
    tool_calls: tuple[ToolCall, ...] = ()
    tool_results: tuple[ToolResult, ...] = ()


@dataclass(frozen=True, slots=True)
class Approval:
    """What an answer to an approval did; ``continued_run_id`` when it continued a turn
    parked by a server restart (stream that run from its start)."""

    run_id: str
    call_id: str
    approved: bool
    state: str
    continued_run_id: str | None = None


# Decides an ``approval_required`` for ``chat()``: True runs the tool; False, or
# ``(False, reason)``, declines it.
Approver = Callable[[ApprovalRequired], bool | tuple[bool, str]]


class _Collector:
    """Folds a stream's events into a ChatResult, as ``POST /api/chat`` does (``Transcript``)."""

    def __init__(self) -> None:
        self.transcript = Transcript()

    def add(self, event: Event, run_id: str | None) -> ChatResult | None:
        end = self.transcript.add(event)
        if isinstance(end, Error):
            raise RunFailed(end.code, end.message, text=self.transcript.text, run_id=run_id)
        if isinstance(end, Done):
            return ChatResult(
                text=self.transcript.text,
                session_id=end.session_id,
                run_id=end.run_id,
                history_length=end.history_length,
                usage=end.usage,
                tool_calls=tuple(self.transcript.calls),
                tool_results=tuple(self.transcript.results),
            )
        return None

    def unfinished(self) -> ConnectionFailed:
        """The stream ended with no terminal event."""
        return ConnectionFailed("the stream ended without a terminal event")


def _split_id(event_id: str) -> tuple[str, int] | None:
    run_id, sep, seq = event_id.rpartition(":")
    if not sep or not seq.isdigit():
        return None
    return run_id, int(seq)


class _Turn:
    """One streamed turn, with no I/O: the next request, what an answer means, where it stands.

    The blocking and asyncio streams are loops around it that only send, read and sleep.
    """

    def __init__(self, body: dict[str, Any], *, max_retries: int) -> None:
        self.body = body
        self.session_id: str | None = body.get("sessionId")
        self.run_id: str | None = None
        self.last_seq = 0
        self.retry_s = DEFAULT_RETRY_S
        self.max_retries = max_retries
        self.failures = 0
        self.resumes = 0
        self.finished = False
        self._decoder = FrameDecoder()

    @property
    def last_event_id(self) -> str | None:
        return f"{self.run_id}:{self.last_seq}" if self.run_id else None

    def request(self, http: httpx.Client | httpx.AsyncClient) -> httpx.Request:
        """The turn's POST, or once the server has named the run, a resume from the last event."""
        if self.run_id is None:
            return http.build_request("POST", STREAM_PATH, json=self.body)
        headers = {"last-event-id": self.last_event_id or ""}
        return http.build_request("GET", STREAM_PATH, headers=headers)

    def unreachable(self, exc: httpx.TransportError, base_url: httpx.URL) -> Exception:
        """No answer came: raise for the first request, else the cause to resume after."""
        if self.run_id is None:
            raise ConnectionFailed(f"cannot reach {base_url}: {exc}") from exc
        return exc

    def opened(self, response: httpx.Response) -> bool:
        """True for a 200, whose body is the stream; False for a refusal (read it, then
        ``refused``); a 204 raises, as the server has nothing more for this run."""
        if response.status_code == 204:
            raise ConnectionFailed(
                f"run {self.run_id} can no longer be resumed (unknown or expired on the server)"
            )
        if response.status_code != 200:
            return False
        self.run_id = response.headers.get("x-run-id", self.run_id)
        self.session_id = response.headers.get("x-session-id", self.session_id)
        self._decoder = FrameDecoder()
        return True

    def refused(self, response: httpx.Response) -> Exception:
        """Raise a refusal, unless it answered a resume and may pass (a gateway, or a server
        restarting): then it is the cause to resume after."""
        if self.run_id is None or response.status_code not in RETRYABLE:
            raise _refusal(response)
        return _refusal(response)

    def events(self, chunk: bytes) -> Iterator[Event]:
        """The new events that ``chunk`` completes, each counted as seen when it is taken."""
        for frame in self._decoder.feed(chunk):
            if (event := self._accept(frame)) is not None:
                yield event

    def _accept(self, frame: Frame) -> Event | None:
        """The frame's event, or None for one already seen (a replay) or after the end."""
        if frame.retry is not None:
            self.retry_s = frame.retry / 1000
        if self.finished:
            return None
        if frame.id is not None and (parts := _split_id(frame.id)) is not None:
            run_id, seq = parts
            if run_id == self.run_id and seq <= self.last_seq:
                return None
            self.run_id, self.last_seq = run_id, seq
        event = parse_event(frame)
        self.finished = event.type in ("done", "error")
        self.failures = 0
        return event

    def dropped(self, cause: Exception | None) -> float:
        """The connection ended before the terminal event: the delay before resuming."""
        if self.run_id is None:
            raise ConnectionFailed(
                "the connection dropped before the server named the run, so it cannot be "
                "resumed" + (f": {cause}" if cause else "")
            ) from cause
        self.failures += 1
        if self.failures > self.max_retries:
            raise ConnectionFailed(
                f"run {self.run_id}: the stream dropped and {self.max_retries} attempts to "
                f"resume it failed" + (f" (last: {cause})" if cause else "")
            ) from cause
        self.resumes += 1
        return float(min(self.retry_s * 2.0 ** (self.failures - 1), MAX_RETRY_DELAY_S))


def _turn_body(message: str, session_id: str | None, enable_tools: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"message": message, "enableTools": enable_tools}
    if session_id is not None:
        body["sessionId"] = session_id
    return body


def _refusal(response: httpx.Response) -> ClientError:
    """The ClientError for a non-2xx answer, from its JSON error body when it has one."""
    code, message = f"HTTP_{response.status_code}", response.reason_phrase
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        if response.text.strip():
            message = response.text.strip()[:300]
    return ClientError(response.status_code, code, message)


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"accept": "application/json"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    return headers


@dataclass(frozen=True, slots=True)
class _Call(Generic[_T]):
    """One JSON endpoint, with no I/O: the request, and what its answer means."""

    method: str
    path: str
    read: Callable[[Any], _T]
    body: dict[str, Any] | None = None

    def failed(self, exc: httpx.TransportError) -> ConnectionFailed:
        return ConnectionFailed(f"{self.method} {self.path}: {exc}")

    def answer(self, response: httpx.Response) -> _T:
        if response.is_error:
            raise _refusal(response)
        return self.read(response.json())


def _cancel(run_id: str) -> _Call[bool]:
    return _Call(
        "POST", f"/api/chat/runs/{run_id}/cancel", lambda body: bool(body.get("cancelled"))
    )


def _session(session_id: str) -> _Call[dict[str, Any]]:
    return _Call("GET", f"/api/chat/sessions/{session_id}", lambda body: body)


def _delete_session(session_id: str) -> _Call[None]:
    return _Call("DELETE", f"/api/chat/sessions/{session_id}", lambda body: None)


def _health() -> _Call[dict[str, Any]]:
    return _Call("GET", "/api/health", lambda body: body)


def _approve(run_id: str, call_id: str, approved: bool, reason: str | None) -> _Call[Approval]:
    def read(body: Any) -> Approval:
        return Approval(
            body["runId"],
            body["callId"],
            body["approved"],
            body["state"],
            body.get("continuedRunId"),
        )

    answer: dict[str, Any] = {"approved": approved}
    if reason is not None:
        answer["reason"] = reason
    return _Call("POST", f"/api/chat/runs/{run_id}/approvals/{call_id}", read, answer)


def _decide(approver: Approver, request: ApprovalRequired) -> tuple[bool, str | None]:
    decision = approver(request)
    return decision if isinstance(decision, tuple) else (decision, None)


class _Position:
    """What a stream knows of where it stands, shared by the blocking and asyncio streams."""

    def __init__(self, body: dict[str, Any], *, max_retries: int) -> None:
        self._turn = _Turn(body, max_retries=max_retries)

    @property
    def run_id(self) -> str | None:
        """The run, once the server has answered."""
        return self._turn.run_id

    @property
    def session_id(self) -> str | None:
        """The session: the one asked for, or the one the server made."""
        return self._turn.session_id

    @property
    def last_event_id(self) -> str | None:
        """``<runId>:<seq>`` of the last event yielded: where a resume starts."""
        return self._turn.last_event_id

    @property
    def resumes(self) -> int:
        """How many times the stream reconnected after a drop."""
        return self._turn.resumes


# -- blocking -------------------------------------------------------------------


class ChatStream(_Position):
    """The events of one turn, resumed across dropped connections; iterate it once.

    The request is sent when iteration starts. ``run_id``, ``session_id`` and
    ``last_event_id`` are known once the server has answered.
    """

    def __init__(self, client: Client, body: dict[str, Any]) -> None:
        super().__init__(body, max_retries=client.max_retries)
        self._http = client._http
        self._events = self._generate()

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        return next(self._events)

    def close(self) -> None:
        """Drop the connection (the run goes on on the server; see ``Client.cancel``)."""
        self._events.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _generate(self) -> Generator[Event, None, None]:
        http, turn = self._http, self._turn
        while True:
            cause: Exception | None = None
            request = turn.request(http)
            try:
                response = http.send(request, stream=True)
            except httpx.TransportError as exc:
                cause = turn.unreachable(exc, http.base_url)
            else:
                try:
                    if turn.opened(response):
                        for chunk in response.iter_bytes():
                            yield from turn.events(chunk)
                            if turn.finished:
                                return
                    else:
                        response.read()
                        cause = turn.refused(response)
                except httpx.TransportError as exc:
                    cause = exc
                finally:
                    response.close()
            time.sleep(turn.dropped(cause))


class Client:
    """A blocking chatstream client; close it, or use it as a context manager."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        max_retries: int = 5,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.max_retries = max_retries
        self._http = httpx.Client(
            base_url=base_url, headers=_headers(api_key), timeout=timeout, transport=transport
        )

    def stream(
        self, message: str, *, session_id: str | None = None, enable_tools: bool = True
    ) -> ChatStream:
        """Start a turn and stream its events; see ``ChatStream``."""
        return ChatStream(self, _turn_body(message, session_id, enable_tools))

    def chat(
        self,
        message: str,
        *,
        session_id: str | None = None,
        enable_tools: bool = True,
        approver: Approver | None = None,
    ) -> ChatResult:
        """Run a turn over the stream and return its outcome; raise ``RunFailed`` on error.

        A tool call that waits for approval is put to ``approver``; without one it waits
        until another client answers it, or it expires.
        """
        collector = _Collector()
        with self.stream(message, session_id=session_id, enable_tools=enable_tools) as events:
            for event in events:
                if isinstance(event, ApprovalRequired) and approver and events.run_id:
                    approved, reason = _decide(approver, event)
                    self.approve(events.run_id, event.id, approved=approved, reason=reason)
                if (result := collector.add(event, events.run_id)) is not None:
                    return result
        raise collector.unfinished()

    def cancel(self, run_id: str) -> bool:
        """Stop a run now; False when it had already finished."""
        return self._call(_cancel(run_id))

    def session(self, session_id: str) -> dict[str, Any]:
        """A session's messages, as ``GET /api/chat/sessions/{id}`` returns them."""
        return self._call(_session(session_id))

    def delete_session(self, session_id: str) -> None:
        """Clear a session."""
        self._call(_delete_session(session_id))

    def health(self) -> dict[str, Any]:
        """The server's status, version and model."""
        return self._call(_health())

    def approve(
        self, run_id: str, call_id: str, *, approved: bool = True, reason: str | None = None
    ) -> Approval:
        """Answer a tool call that waits for approval (``approved=False`` declines it)."""
        return self._call(_approve(run_id, call_id, approved, reason))

    def _call(self, call: _Call[_T]) -> _T:
        try:
            response = self._http.request(call.method, call.path, json=call.body)
        except httpx.TransportError as exc:
            raise call.failed(exc) from exc
        return call.answer(response)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# -- asyncio --------------------------------------------------------------------


class AsyncChatStream(_Position):
    """The events of one turn, resumed across dropped connections; iterate it once.

    The request is sent when iteration starts; use ``async with`` so that the
    connection is released when you stop early.
    """

    def __init__(self, client: AsyncClient, body: dict[str, Any]) -> None:
        super().__init__(body, max_retries=client.max_retries)
        self._http = client._http
        self._events = self._generate()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        return await anext(self._events)

    async def aclose(self) -> None:
        """Drop the connection (the run goes on on the server; see ``AsyncClient.cancel``)."""
        await self._events.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _generate(self) -> AsyncGenerator[Event, None]:
        http, turn = self._http, self._turn
        while True:
            cause: Exception | None = None
            request = turn.request(http)
            try:
                response = await http.send(request, stream=True)
            except httpx.TransportError as exc:
                cause = turn.unreachable(exc, http.base_url)
            else:
                try:
                    if turn.opened(response):
                        async for chunk in response.aiter_bytes():
                            for event in turn.events(chunk):
                                yield event
                            if turn.finished:
                                return
                    else:
                        await response.aread()
                        cause = turn.refused(response)
                except httpx.TransportError as exc:
                    cause = exc
                finally:
                    await response.aclose()
            await asyncio.sleep(turn.dropped(cause))


class AsyncClient:
    """An asyncio chatstream client; close it, or use it as an async context manager."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        max_retries: int = 5,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.max_retries = max_retries
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=_headers(api_key), timeout=timeout, transport=transport
        )

    def stream(
        self, message: str, *, session_id: str | None = None, enable_tools: bool = True
    ) -> AsyncChatStream:
        """Start a turn and stream its events; see ``AsyncChatStream``."""
        return AsyncChatStream(self, _turn_body(message, session_id, enable_tools))

    async def chat(
        self,
        message: str,
        *,
        session_id: str | None = None,
        enable_tools: bool = True,
        approver: Approver | None = None,
    ) -> ChatResult:
        """Run a turn over the stream and return its outcome; raise ``RunFailed`` on error.

        A tool call that waits for approval is put to ``approver`` (see ``Client.chat``).
        """
        collector = _Collector()
        async with self.stream(message, session_id=session_id, enable_tools=enable_tools) as events:
            async for event in events:
                if isinstance(event, ApprovalRequired) and approver and events.run_id:
                    approved, reason = _decide(approver, event)
                    await self.approve(events.run_id, event.id, approved=approved, reason=reason)
                if (result := collector.add(event, events.run_id)) is not None:
                    return result
        raise collector.unfinished()

    async def cancel(self, run_id: str) -> bool:
        """Stop a run now; False when it had already finished."""
        return await self._call(_cancel(run_id))

    async def session(self, session_id: str) -> dict[str, Any]:
        """A session's messages, as ``GET /api/chat/sessions/{id}`` returns them."""
        return await self._call(_session(session_id))

    async def delete_session(self, session_id: str) -> None:
        """Clear a session."""
        await self._call(_delete_session(session_id))

    async def health(self) -> dict[str, Any]:
        """The server's status, version and model."""
        return await self._call(_health())

    async def approve(
        self, run_id: str, call_id: str, *, approved: bool = True, reason: str | None = None
    ) -> Approval:
        """Answer a tool call that waits for approval (``approved=False`` declines it)."""
        return await self._call(_approve(run_id, call_id, approved, reason))

    async def _call(self, call: _Call[_T]) -> _T:
        try:
            response = await self._http.request(call.method, call.path, json=call.body)
        except httpx.TransportError as exc:
            raise call.failed(exc) from exc
        return call.answer(response)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
