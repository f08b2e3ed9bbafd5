"""A fake OpenAI-compatible server that speaks the real Chat Completions wire format.

It is a real HTTP/1.1 server on 127.0.0.1 (a raw asyncio server on a thread of its own),
so it serves async tests, sync tests, the openai SDK and a separately started chatstream
process alike::

    with FakeOpenAI() as fake:                     # or: fake = FakeOpenAI().start(); fake.stop()
        fake.enqueue(Completion(text=["Hel", "lo"], usage=(12, 2)))
        model = OpenAIModel("gpt-test", base_url=fake.url)
        ...
        fake.requests[-1].body["messages"]         # what the client sent
        await fake.wait_for_disconnect()           # the client left before the reply ended

Replies are taken from the queue in order; with none queued the server answers with
``default`` (by default an echo of the last message, in several tokens). A reply is a
``Completion`` (tokens, fragmented tool calls, usage, delays, a hold, a drop), an
``HTTPError`` (status + OpenAI error body) or ``Raw`` (bytes as given, for malformed
streams); ``Completion(inject=...)`` slips malformed chunks into a well-formed stream.
Run ``python -m tests.fakes.openai_upstream --port 8001 --delay 0.05`` for a standalone
echo server (``OPENAI_BASE_URL=http://127.0.0.1:8001/v1``).

``LoopbackServer`` is the transport shared with the Anthropic fake.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import orjson

__all__ = [
    "Call",
    "Completion",
    "FakeOpenAI",
    "HTTPError",
    "LoopbackServer",
    "Raw",
    "RecordedRequest",
    "sse",
]


def sse(data: Any, event: str | None = None) -> bytes:
    """One Server-Sent Event: ``data`` is JSON-encoded unless it is already bytes or str."""
    if isinstance(data, str):
        payload = data.encode()
    elif isinstance(data, bytes):
        payload = data
    else:
        payload = orjson.dumps(data)
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + payload + b"\n\n"


@dataclass
class RecordedRequest:
    """A request the fake received, and what became of its response."""

    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: Any  # parsed JSON, or None
    disconnected: bool = False  # the client left before the response was complete
    completed: bool = False  # the whole response was written


@dataclass(frozen=True)
class HTTPError:
    """Answer with an error status and the provider's JSON error body."""

    status: int
    message: str
    type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Raw:
    """Answer with these body parts as they are (each one a chunk on the wire).

    ``drop`` closes the connection after the parts without ending the chunked body.
    """

    parts: Sequence[bytes]
    status: int = 200
    content_type: str = "text/event-stream"
    drop: bool = False


class _Gone(Exception):
    """The client closed the connection."""


class _Exchange:
    """One response being written; knows whether the client is still there."""

    def __init__(self, server: LoopbackServer, conn: _Connection, record: RecordedRequest):
        self.server = server
        self.conn = conn
        self.record = record
        self.head_sent = False

    @property
    def gone(self) -> bool:
        return self.conn.gone.is_set()

    async def _write(self, data: bytes) -> None:
        if self.gone:
            raise _Gone
        try:
            self.conn.writer.write(data)
            await self.conn.writer.drain()
        except (ConnectionError, OSError):
            raise _Gone from None

    async def start(self, status: int, content_type: str, headers: dict[str, str]) -> None:
        """Send the status line and headers of a chunked response."""
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
        lines += [f"content-type: {content_type}", "transfer-encoding: chunked"]
        if content_type == "text/event-stream":
            lines.append("cache-control: no-cache")
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self.head_sent = True
        await self._write(("\r\n".join(lines) + "\r\n\r\n").encode())

    async def chunk(self, data: bytes) -> None:
        """Send one chunk of the body."""
        if data:
            await self._write(b"%x\r\n%s\r\n" % (len(data), data))

    async def end(self) -> None:
        """End the chunked body."""
        await self._write(b"0\r\n\r\n")

    async def json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        """Send a whole JSON response."""
        payload = orjson.dumps(body)
        lines = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}",
            "content-type: application/json",
            f"content-length: {len(payload)}",
        ]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.head_sent = True
        await self._write(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)

    async def sleep(self, seconds: float) -> None:
        """Pause, but stop at once if the client leaves."""
        if seconds > 0:
            try:
                await asyncio.wait_for(self.conn.gone.wait(), seconds)
            except TimeoutError:
                return
            raise _Gone

    async def hold(self) -> None:
        """Wait until the test calls ``release()`` or the client leaves."""
        self.server._held += 1
        release = asyncio.ensure_future(self.server._release.acquire())
        gone = asyncio.ensure_future(self.conn.gone.wait())
        try:
            await asyncio.wait({release, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.server._held -= 1
            gone.cancel()
            release.cancel()
        if self.gone:
            raise _Gone

    def drop(self) -> None:
        """Close the connection now, mid-response (a FIN, so the bytes sent still arrive)."""
        self.conn.writer.close()
        self.conn.dropped = True


class _Connection:
    """Bytes read from one client connection, and a flag set when the client closes it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.buffer = bytearray()
        self.gone = asyncio.Event()
        self.dropped = False

    async def fill(self) -> bool:
        try:
            data = await self.reader.read(65536)
        except (ConnectionError, OSError):
            data = b""
        if not data:
            self.gone.set()
            return False
        self.buffer += data
        return True

    async def watch(self) -> None:
        # The client sends nothing while it reads a response (httpx does not pipeline),
        # so reading here only notices the close; any bytes read stay in the buffer.
        while await self.fill():
            pass

    async def request(self) -> tuple[str, str, dict[str, str], bytes] | None:
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            if not await self.fill():
                return None
        head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        del self.buffer[: end + 4]
        method, path, _ = head[0].split(" ", 2)
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            if not await self.fill():
                return None
        body = bytes(self.buffer[:length])
        del self.buffer[:length]
        return method, path, headers, body


_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    529: "Overloaded",
}


class LoopbackServer:
    """An HTTP/1.1 server on 127.0.0.1 in a background thread; subclasses answer requests."""

    def __init__(self, *, port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        self.port = port
        self.tls = tls  # serve HTTPS with this context
        self.requests: list[RecordedRequest] = []
        self.errors: list[BaseException] = []  # bugs in the fake itself
        self._queue: deque[Any] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None
        self._release = asyncio.Semaphore(0)
        self._held = 0
        self._disconnects = 0
        self.connections = 0  # TCP connections accepted (keep-alive reuse shows here)

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> Self:
        """Start serving; returns once the port is bound."""
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name=type(self).__name__, daemon=True
        )
        self._thread.start()
        if not ready.wait(10) or self._loop is None:
            raise RuntimeError(f"{type(self).__name__} did not start: {self.errors}")
        return self

    def stop(self) -> None:
        """Close every connection and stop the thread."""
        if self._loop is not None and self._stopped is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(10)
        self._loop = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def base(self) -> str:
        """``http://127.0.0.1:<port>`` (``https`` when serving TLS)."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    # -- scripting and inspection ------------------------------------------------------

    def enqueue(self, *replies: Any) -> None:
        """Queue replies; each request takes the next one."""
        self._queue.extend(replies)

    @property
    def pending(self) -> int:
        """Replies queued and not yet used."""
        return len(self._queue)

    def release(self) -> None:
        """Let one held reply go on."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._release.release)

    @property
    def held(self) -> int:
        """Replies now waiting for ``release()``."""
        return self._held

    @property
    def disconnects(self) -> int:
        """How many responses the client abandoned before their end."""
        return self._disconnects

    async def wait_for(self, predicate: Callable[[], bool], within: float = 2.0) -> bool:
        """Poll ``predicate`` from the test's loop until it holds or ``within`` seconds pass."""
        deadline = time.monotonic() + within
        while not predicate():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    async def wait_for_disconnect(self, count: int = 1, within: float = 2.0) -> bool:
        """Wait until ``count`` responses were abandoned by their client."""
        return await self.wait_for(lambda: self._disconnects >= count, within)

    async def wait_for_held(self, count: int = 1, within: float = 2.0) -> bool:
        """Wait until ``count`` replies are held."""
        return await self.wait_for(lambda: self._held >= count, within)

    # -- serving ------------------------------------------------------------------------

    def _run(self, ready: threading.Event) -> None:
        try:
            asyncio.run(self._serve(ready))
        except BaseException as exc:
            self.errors.append(exc)
            ready.set()

    async def _serve(self, ready: threading.Event) -> None:
        self._stopped = asyncio.Event()
        self._release = asyncio.Semaphore(0)
        server = await asyncio.start_server(
            self._on_connection, "127.0.0.1", self.port, ssl=self.tls
        )
        self.port = server.sockets[0].getsockname()[1]
        self._loop = asyncio.get_running_loop()
        ready.set()
        async with server:
            await self._stopped.wait()
            server.close()
        # asyncio.run cancels the connection handlers left, and they close their sockets.

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        conn = _Connection(reader, writer)
        self.connections += 1
        try:
            while not conn.dropped and (request := await conn.request()) is not None:
                method, path, headers, raw = request
                body = orjson.loads(raw) if raw else None
                record = RecordedRequest(method, path, headers, body)
                self.requests.append(record)
                exchange = _Exchange(self, conn, record)
                watcher = asyncio.ensure_future(conn.watch())
                try:
                    await self.handle(exchange)
                    record.completed = not conn.dropped
                except _Gone:
                    record.disconnected = True
                    self._disconnects += 1
                finally:
                    watcher.cancel()
                    await asyncio.gather(watcher, return_exceptions=True)
                if conn.gone.is_set() or headers.get("connection") == "close":
                    break
        except Exception as exc:
            self.errors.append(exc)
        finally:
            writer.close()

    def next_reply(self, request: RecordedRequest) -> Any:
        """The queued reply, or the server's default for this request."""
        return self._queue.popleft() if self._queue else self.default_reply(request)

    def default_reply(self, request: RecordedRequest) -> Any:
        """What to answer when nothing is queued."""
        raise NotImplementedError

    async def handle(self, exchange: _Exchange) -> None:
        """Answer one request."""
        raise NotImplementedError

    async def send_raw(self, exchange: _Exchange, reply: Raw) -> None:
        """Write a ``Raw`` reply."""
        await exchange.start(reply.status, reply.content_type, {})
        for part in reply.parts:
            await exchange.chunk(part)
        if reply.drop:
            exchange.drop()
        else:
            await exchange.end()


# -- the OpenAI side --------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """A tool call to stream; ``arguments`` as a dict (JSON-encoded) or a raw string."""

    name: str
    arguments: dict[str, Any] | str = field(default_factory=dict)
    id: str | None = None  # generated when None
    fragments: int = 3  # how many pieces the arguments string is cut into


@dataclass(frozen=True)
class Completion:
    """A scripted streamed answer.

    Events after the role chunk are counted from 1 (each text token, each tool-call
    fragment): ``hold_after=n`` waits after event n until ``release()`` or a disconnect;
    ``drop_after=n`` cuts the connection after event n; ``delay`` pauses before each event.
    ``interleave`` alternates the fragments of parallel tool calls (calls stay keyed by
    ``index``); ``usage`` is sent when the client asked for it (``stream_options``).
    ``error`` sends ``{"error": ...}`` in the stream after the events instead of finishing.
    ``inject`` sends these payloads as ``data:`` events, as they are (JSON-encoded unless
    bytes or str), after the events and before the finish: a malformed chunk, say
    ``{"choices": [{"index": 0, "delta": {"content": 5}}]}`` or ``[1, 2]``.
    """

    text: Sequence[str] = ()
    tool_calls: Sequence[Call] = ()
    usage: tuple[int, int] | None = None  # (prompt, completion); counted when None
    delay: float = 0.0
    hold_after: int | None = None
    drop_after: int | None = None
    interleave: bool = False
    done: bool = True  # send ``data: [DONE]``
    error: str | None = None
    model: str | None = None
    inject: Sequence[Any] = ()


def _pieces(text: str, count: int) -> list[str]:
    """``text`` cut into ``count`` pieces, as the provider streams argument strings."""
    count = max(1, min(count, len(text)))
    size = -(-len(text) // count) if text else 1
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


class FakeOpenAI(LoopbackServer):
    """A scriptable OpenAI-compatible Chat Completions server on loopback."""

    def __init__(
        self,
        *,
        port: int = 0,
        default: Completion | Raw | HTTPError | None = None,
        delay: float = 0.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(port=port, tls=tls)
        self.default = default
        self.delay = delay  # per token, in the default echo reply
        self._ids = itertools.count(1)

    @property
    def url(self) -> str:
        """The base URL a client is given (``.../v1``)."""
        return f"{self.base}/v1"

    def default_reply(self, request: RecordedRequest) -> Any:
        if self.default is not None:
            return self.default
        messages = (request.body or {}).get("messages") or [{}]
        last = messages[-1].get("content") or ""
        words = f"Echo: {last}".split(" ")
        return Completion(
            text=[w if i == 0 else " " + w for i, w in enumerate(words)], delay=self.delay
        )

    async def handle(self, exchange: _Exchange) -> None:
        request = exchange.record
        if request.method == "GET" and request.path.rstrip("/").endswith("/models"):
            await exchange.json(
                200, {"object": "list", "data": [{"id": "fake", "object": "model"}]}
            )
            return
        if request.method != "POST" or not request.path.endswith("/chat/completions"):
            await exchange.json(
                404, _error_body(f"no route {request.path}", "invalid_request_error")
            )
            return
        reply = self.next_reply(request)
        if isinstance(reply, HTTPError):
            await exchange.json(reply.status, _error_body(reply.message, reply.type), reply.headers)
        elif isinstance(reply, Raw):
            await self.send_raw(exchange, reply)
        elif not (request.body or {}).get("stream"):
            await exchange.json(200, self._whole(reply, request))
        else:
            await self._stream(exchange, reply, request)

    def _chunk(self, reply: Completion, request: RecordedRequest, cid: str) -> dict[str, Any]:
        body = request.body or {}
        chunk: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": reply.model or body.get("model", "fake"),
            "system_fingerprint": "fp_fake",
            "choices": [],
        }
        if (body.get("stream_options") or {}).get("include_usage"):
            chunk["usage"] = None  # as OpenAI does: null on every chunk but the last
        return chunk

    def _events(self, reply: Completion, base: dict[str, Any]) -> list[dict[str, Any]]:
        def with_delta(delta: dict[str, Any]) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
            return {**base, "choices": [choice]}

        events = [with_delta({"content": token}) for token in reply.text]
        per_call: list[list[dict[str, Any]]] = []
        for index, call in enumerate(reply.tool_calls):
            arguments = (
                call.arguments
                if isinstance(call.arguments, str)
                else orjson.dumps(call.arguments).decode()
            )
            first = {
                "index": index,
                "id": call.id or f"call_fake{next(self._ids)}",
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
            fragments = [first] + [
                {"index": index, "function": {"arguments": piece}}
                for piece in _pieces(arguments, call.fragments)
            ]
            per_call.append([with_delta({"tool_calls": [f]}) for f in fragments])
        if reply.interleave:
            for row in itertools.zip_longest(*per_call):
                events += [e for e in row if e is not None]
        else:
            for fragments_of_call in per_call:
                events += fragments_of_call
        return events

    async def _stream(
        self, exchange: _Exchange, reply: Completion, request: RecordedRequest
    ) -> None:
        base = self._chunk(reply, request, f"chatcmpl-fake{next(self._ids)}")
        role = {"role": "assistant", "content": "", "refusal": None}
        preamble = {
            **base,
            "choices": [{"index": 0, "delta": role, "logprobs": None, "finish_reason": None}],
        }
        await exchange.start(200, "text/event-stream", {"x-request-id": "req_fake"})
        await exchange.chunk(sse(preamble))
        events = self._events(reply, base)
        for number, event in enumerate(events, 1):
            await exchange.sleep(reply.delay)
            await exchange.chunk(sse(event))
            if number == reply.drop_after:
                exchange.drop()
                return
            if number == reply.hold_after:
                await exchange.hold()
        for payload in reply.inject:
            await exchange.chunk(sse(payload))
        if reply.error is not None:
            await exchange.chunk(sse({"error": {"message": reply.error, "type": "server_error"}}))
            await exchange.end()
            return
        finish = "tool_calls" if reply.tool_calls else "stop"
        await exchange.chunk(
            sse(
                {
                    **base,
                    "choices": [
                        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}
                    ],
                }
            )
        )
        if "usage" in base:
            prompt, completion = reply.usage or (_count_prompt(request), len(events))
            usage = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
            }
            await exchange.chunk(sse({**base, "usage": usage}))
        if reply.done:
            await exchange.chunk(sse("[DONE]"))
        await exchange.end()

    def _whole(self, reply: Completion, request: RecordedRequest) -> dict[str, Any]:
        """The non-streaming ``chat.completion`` form of a reply."""
        message: dict[str, Any] = {"role": "assistant", "content": "".join(reply.text) or None}
        if reply.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id or f"call_fake{next(self._ids)}",
                    "type": "function",
                    "function": {
                        "name": call.name,
                        "arguments": call.arguments
                        if isinstance(call.arguments, str)
                        else orjson.dumps(call.arguments).decode(),
                    },
                }
                for call in reply.tool_calls
            ]
        prompt, completion = reply.usage or (_count_prompt(request), len(reply.text))
        return {
            "id": f"chatcmpl-fake{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": reply.model or (request.body or {}).get("model", "fake"),
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": "tool_calls" if reply.tool_calls else "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }


def _error_body(message: str, kind: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind or "api_error", "param": None, "code": None}}


def _count_prompt(request: RecordedRequest) -> int:
    """A rough prompt size, so that usage is not a constant."""
    return len(orjson.dumps((request.body or {}).get("messages", []))) // 4 + 1


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the echo fake until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.05, help="seconds between tokens")
    args = parser.parse_args(argv)
    with FakeOpenAI(port=args.port, delay=args.delay) as fake:
        print(f"OPENAI_BASE_URL={fake.url}", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
