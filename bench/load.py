"""A lean load client: C concurrent event streams over raw asyncio sockets, timed per token.

Each stream is one HTTP/1.1 request on its own connection. The client does not parse
the events: it counts a marker per token (``event: token`` from a relay, the
``"delta":{"content":`` of a Chat Completions chunk from the upstream), notes when each
read arrived, and checks that the stream ended with its terminal marker and carried
every token. A token that arrives in the same read as the one before it has a gap of 0.

While the streams run, the server's resident memory is sampled from
``/proc/<pid>/status``; its CPU time (all threads) is read from ``/proc/<pid>/stat``
before and after.
"""

from __future__ import annotations

import asyncio
import math
import os
import resource
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast
from urllib.parse import urlencode

import orjson

T = TypeVar("T")
_TICKS = os.sysconf("SC_CLK_TCK")
_END_OF_BODY = b"0\r\n\r\n"


@dataclass(frozen=True, slots=True)
class Protocol:
    """How to ask for one stream and how to read it back."""

    token: bytes
    end: bytes
    error: bytes | None
    request: Callable[[int, str], bytes]


def relay_request(path: str, tokens: int, delay_ms: float) -> Callable[[int, str], bytes]:
    """``GET path?message=bench N D&sessionId=...`` (chatstream and the naive relay)."""

    def build(index: int, host: str) -> bytes:
        query = urlencode(
            {
                "message": f"bench {tokens} {delay_ms:g}",
                "sessionId": f"bench-{os.getpid()}-{time.monotonic_ns()}-{index}",
                "enableTools": "false",
            }
        )
        return (
            f"GET {path}?{query} HTTP/1.1\r\nhost: {host}\r\naccept: text/event-stream\r\n\r\n"
        ).encode()

    return build


def completions_request(tokens: int, delay_ms: float) -> Callable[[int, str], bytes]:
    """``POST /v1/chat/completions`` straight to the upstream (the floor)."""
    body = orjson.dumps(
        {
            "model": "bench",
            "messages": [{"role": "user", "content": f"bench {tokens} {delay_ms:g}"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )

    def build(index: int, host: str) -> bytes:
        return (
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json"
            b"\r\naccept: text/event-stream\r\ncontent-length: %d\r\n\r\n%s"
            % (host.encode(), len(body), body)
        )

    return build


def relay(path: str, tokens: int, delay_ms: float) -> Protocol:
    return Protocol(
        b"event: token", b"event: done", b"event: error", relay_request(path, tokens, delay_ms)
    )


def upstream(tokens: int, delay_ms: float) -> Protocol:
    return Protocol(
        b'"delta":{"content":', b"data: [DONE]", None, completions_request(tokens, delay_ms)
    )


@dataclass(slots=True)
class StreamResult:
    """What one stream delivered, and when."""

    started: float
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    gaps: list[float] = field(default_factory=list)
    error: str | None = None
    ended: bool = False


class _Reader(asyncio.Protocol):
    def __init__(self, protocol: Protocol, request: bytes, result: StreamResult) -> None:
        self._protocol = protocol
        self._request = request
        self._result = result
        self._head: bytes | None = b""
        self._tail = b""
        self._keep = max(len(protocol.token), len(protocol.end), len(protocol.error or b"")) - 1
        self._transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        result = self._result
        if self._head is not None:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            status = self._head[: self._head.find(b"\r\n")]
            data = self._head[end + 4 :]
            self._head = None
            if b" 200 " not in status:
                self._fail(status.decode("latin-1", "replace"))
                return
        buffer = self._tail + data
        protocol = self._protocol
        count = buffer.count(protocol.token)
        if count:
            if result.first is None:
                result.first = now
            else:
                result.gaps.append(now - (result.last or now))
            if count > 1:
                result.gaps.extend([0.0] * (count - 1))
            result.last = now
            result.tokens += count
        if protocol.error is not None and (at := buffer.find(protocol.error)) >= 0:
            data = buffer[at:].partition(b"data: ")[2].partition(b"\n")[0]
            self._fail(f"error event {data[:160].decode(errors='replace')}")
            return
        if not result.ended and protocol.end in buffer:
            result.ended = True
        if result.ended and buffer.endswith(_END_OF_BODY):
            self._close()
        self._tail = buffer[-self._keep :]

    def _fail(self, why: str) -> None:
        if self._result.error is None:
            self._result.error = why
        self._close()

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._result.ended and self._result.error is None:
            self._result.error = f"connection lost: {exc or 'closed by server'}"
        if not self.closed.done():
            self.closed.set_result(None)


async def one_stream(
    host: str, port: int, protocol: Protocol, index: int, deadline: float
) -> StreamResult:
    """Open one stream, read it to its end (or the deadline), close it."""
    loop = asyncio.get_running_loop()
    result = StreamResult(started=time.perf_counter())
    request = protocol.request(index, f"{host}:{port}")
    reader: _Reader | None = None
    try:
        async with asyncio.timeout(max(deadline - loop.time(), 0.001)):
            _, reader = await loop.create_connection(
                lambda: _Reader(protocol, request, result), host, port
            )
            await reader.closed
    except TimeoutError:
        result.error = result.error or "timed out"
        if reader is not None:
            reader._close()
    except OSError as exc:
        result.error = result.error or f"connect: {exc}"
    return result


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads, from ``/proc/<pid>/stat``."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rpartition(b")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def rss_bytes(pid: int) -> int:
    """Resident memory of a process, from ``/proc/<pid>/status``."""
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass(slots=True)
class LoadResult:
    """One scenario against one target: per-stream results and the processes' costs."""

    streams: list[StreamResult]
    wall_s: float
    server_cpu_s: float
    upstream_cpu_s: float | None
    client_cpu_s: float
    rss_before: int
    rss_peak: int
    open_peak: int

    @property
    def failures(self) -> int:
        return sum(1 for s in self.streams if s.error is not None or not s.ended)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.streams)

    def first_errors(self, n: int = 3) -> list[str]:
        return sorted({s.error or "no end" for s in self.streams if s.error or not s.ended})[:n]


async def run_load(
    host: str,
    port: int,
    protocol: Protocol,
    *,
    concurrency: int,
    expected_tokens: int,
    timeout_s: float,
    server_pid: int,
    upstream_pid: int | None = None,
    ramp_s: float = 0.0,
) -> LoadResult:
    """Run ``concurrency`` streams (all at once, or started evenly over ``ramp_s``).

    The server's memory is sampled while they run; its CPU time (and the upstream's,
    when it is another process) is read before and after.
    """
    loop = asyncio.get_running_loop()
    server_before = cpu_seconds(server_pid)
    upstream_before = cpu_seconds(upstream_pid) if upstream_pid is not None else 0.0
    client_before = time.process_time()
    rss_before = rss_bytes(server_pid)
    rss_peak = rss_before
    open_now = open_peak = 0
    deadline = loop.time() + timeout_s

    async def tracked(index: int) -> StreamResult:
        nonlocal open_now, open_peak
        if ramp_s > 0:
            await asyncio.sleep(ramp_s * index / concurrency)
        open_now += 1
        open_peak = max(open_peak, open_now)
        try:
            return await one_stream(host, port, protocol, index, deadline)
        finally:
            open_now -= 1

    started = time.perf_counter()
    tasks = [asyncio.ensure_future(tracked(i)) for i in range(concurrency)]
    all_done = asyncio.gather(*tasks)
    while not all_done.done():
        rss_peak = max(rss_peak, rss_bytes(server_pid))
        await asyncio.wait([all_done], timeout=0.05)
    streams = all_done.result()
    wall = time.perf_counter() - started
    server_cpu = cpu_seconds(server_pid) - server_before
    upstream_cpu = cpu_seconds(upstream_pid) - upstream_before if upstream_pid is not None else None
    for s in streams:
        if s.error is None and s.ended and s.tokens != expected_tokens:
            s.error = f"{s.tokens} of {expected_tokens} tokens"
    return LoadResult(
        streams=streams,
        wall_s=wall,
        server_cpu_s=server_cpu,
        upstream_cpu_s=upstream_cpu,
        client_cpu_s=time.process_time() - client_before,
        rss_before=rss_before,
        rss_peak=rss_peak,
        open_peak=open_peak,
    )


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` percentile (0-100) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, math.ceil(len(ordered) * q / 100))
    return ordered[rank - 1]


def raise_nofile_limit() -> int:
    """Raise this process's open-file limit to its hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return max(target, soft)


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
