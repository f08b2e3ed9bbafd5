"""Which HTTP client reads a streamed model answer cheapest: httpx or aiohttp.

The models' per-token hot path is one read of the provider's streamed answer. This
bench reads ``bench/upstream.py`` (a child process, so ``time.process_time()`` counts
the client alone) through both clients with the same parser (chatstream's
``ChatCompletionsReader``), in three workloads:

- ``1 stream``: 20,000 tokens sent without delay (CPU per read of many tokens);
- ``C=1,000 short``: 1,000 concurrent requests of 2 tokens (CPU per request);
- ``C=1,000 paced``: 1,000 concurrent streams of 100 tokens 20 ms apart (one token per read).

httpx is set up as chatstream used it before the switch: 16 clients, the least busy
taking each request (one httpcore pool walks all its connections per request). aiohttp
is set up as ``chatstream.models.http.UpstreamClient`` sets it up, and read through it.

Run: ``.venv/bin/python bench/upstream_client.py [--concurrency 1000] [--tokens 20000]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import orjson
import uvloop

from chatstream.models.base import TextDelta
from chatstream.models.http import UpstreamClient
from chatstream.models.openai import ChatCompletionsReader

BENCH = Path(__file__).resolve().parent
HEADERS = {"content-type": "application/json", "accept": "text/event-stream"}
SHARDS = 16


def body(tokens: int, delay_ms: float) -> bytes:
    message = {"role": "user", "content": f"bench {tokens} {delay_ms}"}
    return orjson.dumps({"model": "bench", "stream": True, "messages": [message]})


def count(reader: ChatCompletionsReader, chunk: bytes) -> int:
    return sum(1 for event in reader.feed(chunk) if type(event) is TextDelta)


class HttpxShards:
    """httpx clients with the settings chatstream used; a request takes the least busy."""

    def __init__(self) -> None:
        limits = httpx.Limits(max_connections=128, max_keepalive_connections=32)
        timeout = httpx.Timeout(120.0, connect=10.0)
        self.clients = [
            httpx.AsyncClient(headers=HEADERS, timeout=timeout, limits=limits)
            for _ in range(SHARDS)
        ]
        self.busy = [0] * SHARDS

    async def read(self, url: str, payload: bytes) -> int:
        index = self.busy.index(min(self.busy))
        self.busy[index] += 1
        try:
            reader = ChatCompletionsReader("bench")
            tokens = 0
            async with self.clients[index].stream("POST", url, content=payload) as response:
                async for chunk in response.aiter_bytes():
                    tokens += count(reader, chunk)
            return tokens
        finally:
            self.busy[index] -= 1

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()


class Aiohttp:
    """chatstream's ``UpstreamClient`` (one aiohttp session)."""

    def __init__(self, url: str) -> None:
        self.client = UpstreamClient(url, headers=HEADERS, timeout=120.0)

    async def read(self, url: str, payload: bytes) -> int:
        reader = ChatCompletionsReader("bench")
        tokens = 0
        async with self.client.session().post(url, data=payload) as response:
            async for chunk in response.content.iter_any():
                tokens += count(reader, chunk)
        return tokens

    async def aclose(self) -> None:
        await self.client.aclose()


@contextlib.asynccontextmanager
async def upstream() -> AsyncIterator[str]:
    child = await asyncio.create_subprocess_exec(
        sys.executable, str(BENCH / "upstream.py"), "--port", "0", stdout=asyncio.subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        line = await child.stdout.readline()
        yield f"http://127.0.0.1:{int(line.split()[1])}/v1/chat/completions"
    finally:
        child.terminate()
        await child.wait()


async def measure(
    read: Callable[[str, bytes], Awaitable[int]], url: str, streams: int, payload: bytes
) -> tuple[float, int]:
    """Client CPU seconds and tokens read for ``streams`` concurrent requests."""
    for _ in range(8):  # warm up: connections, caches
        await read(url, body(2, 0))
    started = time.process_time()
    tokens = await asyncio.gather(*(read(url, payload) for _ in range(streams)))
    return time.process_time() - started, sum(tokens)


async def main(concurrency: int, tokens: int) -> None:
    workloads = [
        ("1 stream", 1, tokens, 0),
        (f"C={concurrency:,} short", concurrency, 2, 0),
        (f"C={concurrency:,} paced", concurrency, 100, 20),
    ]
    print("| workload | client | client CPU µs/token | client CPU ms/request |")
    print("|---|---|---|---|")
    async with upstream() as url:
        for label, streams, each, delay_ms in workloads:
            for name, make in (("httpx", lambda: HttpxShards()), ("aiohttp", lambda: Aiohttp(url))):
                client = make()
                try:
                    cpu, read = await measure(client.read, url, streams, body(each, delay_ms))
                finally:
                    await client.aclose()
                if read != streams * each:
                    raise SystemExit(f"{label}, {name}: read {read} of {streams * each} tokens")
                per_token, per_request = cpu / read * 1e6, cpu / streams * 1e3
                print(f"| {label} | {name} | {per_token:,.1f} | {per_request:,.2f} |", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=1000, help="concurrent requests")
    parser.add_argument("--tokens", type=int, default=20_000, help="tokens of the single stream")
    args = parser.parse_args()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(main(args.concurrency, args.tokens))
