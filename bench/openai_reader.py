"""How much CPU one streamed token costs: chatstream's lean reader against the openai SDK.

Both read the same Chat Completions stream from the same fake upstream over loopback.
The fake runs in a child process, so ``time.process_time()`` here counts the client
alone. Two deliveries:

- ``bulk``: N recorded chunks sent as fast as the socket takes them (pure parsing cost);
- ``paced``: one chunk per write with a pause between, so every token arrives in a read
  of its own, as from a real provider (parsing plus per-read and wake-up cost).

Run: ``.venv/bin/python bench/openai_reader.py [--tokens 20000] [--paced 2000] [--runs 5]``
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.fakes

from tests.fakes.openai_upstream import Completion, FakeOpenAI, Raw, sse

from chatstream.messages import user
from chatstream.models.base import TextDelta
from chatstream.models.openai import OpenAIModel

WORDS = "the quick brown fox jumps over a lazy dog while streaming tokens over SSE".split()


def recorded_stream(tokens: int) -> bytes:
    """A Chat Completions stream as OpenAI sends it: role, content chunks, finish, usage."""
    base = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "gpt-4o-mini-2024-07-18",
        "system_fingerprint": "fp_0ba0d124f1",
        "usage": None,
    }

    def chunk(delta: dict[str, object], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return sse({**base, "choices": [choice]})

    parts = [chunk({"role": "assistant", "content": "", "refusal": None})]
    parts += [chunk({"content": " " + WORDS[i % len(WORDS)]}) for i in range(tokens)]
    parts.append(chunk({}, "stop"))
    usage = {"prompt_tokens": 9, "completion_tokens": tokens, "total_tokens": tokens + 9}
    parts.append(sse({**base, "choices": [], "usage": usage}))
    parts.append(sse("[DONE]"))
    return b"".join(parts)


def serve(tokens: int, paced: int, pipe: Connection) -> None:
    """Child process: a bulk fake and a paced fake, until the parent says stop."""
    bulk = FakeOpenAI(default=Raw([recorded_stream(tokens)])).start()
    words = [" " + WORDS[i % len(WORDS)] for i in range(paced)]
    slow = FakeOpenAI(default=Completion(text=words, delay=0.0005, usage=(9, paced))).start()
    pipe.send((bulk.url, slow.url))
    pipe.recv()
    bulk.stop()
    slow.stop()


async def lean(url: str) -> int:
    """Tokens read by chatstream's OpenAIModel."""
    model = OpenAIModel("gpt-4o-mini", base_url=url, api_key="sk-bench")
    count = 0
    try:
        async for event in model.stream([user("go")], []):
            if isinstance(event, TextDelta):
                count += 1
    finally:
        await model.aclose()
    return count


async def sdk(url: str) -> int:
    """Tokens read by the official openai SDK's streaming."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key="sk-bench", max_retries=0)
    count = 0
    try:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "go"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            for choice in chunk.choices:
                if choice.delta.content:
                    count += 1
    finally:
        await client.close()
    return count


async def socket_floor(url: str) -> int:
    """Reads of the raw socket, no HTTP and no parsing: the floor under any reader."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = (
        b'{"model": "x", "messages": [], "stream": true, "stream_options": {"include_usage": true}}'
    )
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: %s\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n%s" % (host.encode(), len(body), body)
    )
    data = b""
    while chunk := await reader.read(65536):
        data = (data + chunk)[-1024:]  # the tail holds the usage chunk: the token count
    writer.close()
    await writer.wait_closed()
    return int(data.rsplit(b'"completion_tokens":', 1)[1].split(b",", 1)[0])


async def measure(
    read: Callable[[str], Awaitable[int]], url: str, runs: int
) -> tuple[float, float, int]:
    """Median CPU and wall microseconds per token over ``runs`` (after one warm-up)."""
    await read(url)
    cpu: list[float] = []
    wall: list[float] = []
    count = 0
    for _ in range(runs):
        c0, w0 = time.process_time(), time.perf_counter()
        count = await read(url)
        cpu.append((time.process_time() - c0) / count * 1e6)
        wall.append((time.perf_counter() - w0) / count * 1e6)
    return statistics.median(cpu), statistics.median(wall), count


async def main_async(urls: tuple[str, str], runs: int) -> None:
    loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
    print(f"python {sys.version.split()[0]}, orjson {orjson.__version__}, event loop: {loop}")
    print(f"{'delivery':<8} {'reader':<12} {'tokens':>7} {'CPU us/tok':>11} {'wall us/tok':>12}")
    # The socket floor reads the bytes only: no HTTP, no parsing, the cost of the wake-ups.
    for delivery, url in zip(("bulk", "paced"), urls, strict=True):
        results = {}
        readers = (("socket floor", socket_floor), ("lean", lean), ("openai SDK", sdk))
        for label, read in readers:
            cpu, wall, count = await measure(read, url, runs)
            results[label] = cpu
            print(f"{delivery:<8} {label:<12} {count:>7} {cpu:>11.2f} {wall:>12.2f}")
        ratio = results["openai SDK"] / results["lean"]
        print(f"{delivery:<8} {'SDK / lean':<12} {'':>7} {ratio:>10.1f}x")


def main() -> None:
    """Start the fakes in a child process, measure both readers, print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tokens", type=int, default=20_000, help="chunks in the bulk stream")
    parser.add_argument("--paced", type=int, default=2_000, help="chunks in the paced stream")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--uvloop", action="store_true", help="run the client on uvloop")
    args = parser.parse_args()
    parent, child = multiprocessing.get_context("spawn").Pipe()
    process = multiprocessing.get_context("spawn").Process(
        target=serve, args=(args.tokens, args.paced, child), daemon=True
    )
    process.start()
    try:
        urls = parent.recv()
        if args.uvloop:
            import uvloop

            uvloop.run(main_async(urls, args.runs))
        else:
            asyncio.run(main_async(urls, args.runs))
    finally:
        parent.send("stop")
        process.join(10)


if __name__ == "__main__":
    main()
