"""A scripted OpenAI-compatible upstream, lean enough never to be what a benchmark measures.

``POST /v1/chat/completions`` answers every request with a streamed Chat Completions
answer as OpenAI sends it: a role chunk, one chunk per token, a finish chunk, a usage
chunk, ``data: [DONE]``, over chunked HTTP/1.1 with keep-alive. The workload rides in
the last user message, ``bench <tokens> <delay_ms>``, so one upstream serves every
scenario and the relays in front of it need no side channel.

Why it stays cheap: raw asyncio protocols (no HTTP framework), uvloop, every chunk
encoded once at start-up, and one timer per millisecond for all streams rather than one
sleeping task per stream. A stream whose tokens fell due while the loop was busy gets
them in one write, the way a real provider's bytes pile up in the socket.

Run: ``.venv/bin/python bench/upstream.py [--port 0]``; it prints ``port <n>`` once
listening and serves until SIGTERM/SIGINT. It keeps the open-file limit it is given
(``bench/run.py`` raises its own before starting it, and children inherit it).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import re
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar, cast

import orjson

WORDS = "the quick brown fox jumps over a lazy dog while streaming tokens over SSE".split()
WORKLOAD = re.compile(r"bench (\d+) (\d+(?:\.\d+)?)")
TICK_S = 0.001
T = TypeVar("T")
MAX_REQUEST = 1 << 20

_BASE: dict[str, Any] = {
    "id": "chatcmpl-bench",
    "object": "chat.completion.chunk",
    "created": 1_700_000_000,
    "model": "bench",
    "system_fingerprint": "fp_bench",
}
_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
)


def _chunked(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _event(value: object) -> bytes:
    data = value if isinstance(value, bytes) else orjson.dumps(value)
    return b"data: " + data + b"\n\n"


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return _event({**_BASE, "choices": [choice]})


TOKEN_CHUNKS = [_chunked(_chunk({"content": " " + word})) for word in WORDS]
ROLE_CHUNK = _chunked(_chunk({"role": "assistant", "content": ""}))
FINISH_CHUNK = _chunked(_chunk({}, "stop"))


def tail(tokens: int) -> bytes:
    """Finish, usage, ``[DONE]`` and the end of the chunked body."""
    usage = {"prompt_tokens": 9, "completion_tokens": tokens, "total_tokens": tokens + 9}
    return (
        FINISH_CHUNK
        + _chunked(_event({**_BASE, "choices": [], "usage": usage}))
        + _chunked(_event(b"[DONE]"))
        + b"0\r\n\r\n"
    )


def workload(body: bytes, default: tuple[int, float]) -> tuple[int, float]:
    """(tokens, delay_s) from the last user message ``bench N D``, else ``default``."""
    try:
        messages = orjson.loads(body).get("messages") or []
    except (orjson.JSONDecodeError, AttributeError):
        return default
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            match = WORKLOAD.search(content) if isinstance(content, str) else None
            if match:
                return int(match.group(1)), float(match.group(2)) / 1000
            break
    return default


class Pacer:
    """Runs callbacks at times rounded up to the tick, with one loop timer per busy tick."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._due: dict[int, list[Stream]] = {}

    def at(self, when: float, stream: Stream) -> None:
        key = math.ceil(when / TICK_S)
        waiting = self._due.get(key)
        if waiting is None:
            self._due[key] = [stream]
            self._loop.call_at(key * TICK_S, self._fire, key)
        else:
            waiting.append(stream)

    def _fire(self, key: int) -> None:
        for stream in self._due.pop(key, ()):
            stream.step()


class Stream:
    """One answer being written: its next token and when the token after it falls due."""

    __slots__ = ("_conn", "_delay", "_next", "_start", "_tokens")

    def __init__(self, conn: Connection, tokens: int, delay: float) -> None:
        self._conn = conn
        self._tokens = tokens
        self._delay = delay
        self._next = 0
        self._start = conn.loop.time()

    def begin(self) -> None:
        self._conn.write(_HEAD + ROLE_CHUNK)
        if self._delay <= 0:
            self._conn.loop.create_task(self._burst())
        else:
            self._conn.pacer.at(self._start + self._delay, self)

    async def _burst(self) -> None:
        # As fast as the socket takes it, in writes of a few dozen chunks.
        conn, n, batch = self._conn, len(TOKEN_CHUNKS), 64
        for first in range(0, self._tokens, batch):
            if conn.closed:
                return
            last = min(first + batch, self._tokens)
            conn.write(b"".join(TOKEN_CHUNKS[i % n] for i in range(first, last)))
            await conn.drain()
        self._end()

    def step(self) -> None:
        conn = self._conn
        if conn.closed:
            return
        # Every token due by now goes out in one write (absolute schedule, no drift).
        due = min(int((conn.loop.time() - self._start) / self._delay + 1e-9), self._tokens)
        n = len(TOKEN_CHUNKS)
        if due > self._next:
            if due - self._next == 1:
                conn.write(TOKEN_CHUNKS[self._next % n])
            else:
                conn.write(b"".join(TOKEN_CHUNKS[i % n] for i in range(self._next, due)))
            self._next = due
        if self._next >= self._tokens:
            self._end()
        else:
            conn.pacer.at(self._start + (self._next + 1) * self._delay, self)

    def _end(self) -> None:
        self._conn.write(tail(self._tokens))
        self._conn.idle()


class Connection(asyncio.Protocol):
    """One client connection: requests in, one streamed answer at a time out."""

    def __init__(self, pacer: Pacer, default: tuple[int, float]) -> None:
        self.loop = asyncio.get_running_loop()
        self.pacer = pacer
        self.closed = False
        self._default = default
        self._buffer = b""
        self._busy = False
        self._transport: asyncio.Transport | None = None
        self._writable: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.resume_writing()

    def pause_writing(self) -> None:
        self._writable = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    async def drain(self) -> None:
        if self._writable is not None:
            await self._writable

    def write(self, data: bytes) -> None:
        if not self.closed and self._transport is not None:
            self._transport.write(data)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > MAX_REQUEST:
            self._reply(b"413 Payload Too Large")
            return
        if not self._busy:
            self._next_request()

    def idle(self) -> None:
        self._busy = False
        if self._buffer:
            self._next_request()

    def _next_request(self) -> None:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self._buffer[:end].decode("latin-1")
        length = 0
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if len(self._buffer) < end + 4 + length:
            return
        body = self._buffer[end + 4 : end + 4 + length]
        self._buffer = self._buffer[end + 4 + length :]
        method, _, rest = head.partition(" ")
        path = rest.partition(" ")[0]
        if method != "POST" or not path.endswith("/chat/completions"):
            self._reply(b"404 Not Found")
            return
        self._busy = True
        tokens, delay = workload(body, self._default)
        Stream(self, tokens, delay).begin()

    def _reply(self, status: bytes) -> None:
        body = b'{"error":{"message":"not here"}}'
        self.write(
            b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (status, len(body), body)
        )
        self._buffer = b""


async def serve(host: str, port: int, default: tuple[int, float]) -> None:
    """Listen until SIGTERM or SIGINT; print ``port <n>`` once listening."""
    loop = asyncio.get_running_loop()
    pacer = Pacer(loop)
    server = await loop.create_server(
        lambda: Connection(pacer, default), host, port, backlog=8192, reuse_address=True
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bound = server.sockets[0].getsockname()[1]
    print(f"port {bound}", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=100, help="when the message names none")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="when the message names none")
    args = parser.parse_args()
    run(serve(args.host, args.port, (args.tokens, args.delay_ms / 1000)))


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


if __name__ == "__main__":
    main()
