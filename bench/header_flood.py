"""One ordinary stream while connections flood endless request headers at the server.

A hostile tour found that 16 unauthenticated connections, each sending one endless
header line, took the server from 75 MB to 807 MB and froze every other stream for
seconds. This runs that attack against ``chatstream serve`` (its own process, uvloop,
the scripted model at ``--delay-ms`` a token, SQLite in memory) on 127.0.0.1:

1. one stream of ``--tokens`` tokens alone: the baseline inter-token gaps;
2. the same stream while ``--flooders`` connections (in a process of their own, so the
   stream's reader keeps its core) each send ``GET`` then ``X-Flood: aaaa…`` without
   end, reconnecting whenever the server cuts them off, until the stream ends;
3. a pause, then the server's memory once more.

It prints the server's RSS before, at its peak during and after the flood, the
stream's inter-token gap p50/p99/max alone and under the flood (and their ratio), and
what the flooders got: connections, the most one sent before it was cut off, 431s.
Each flood connection stops at ``--cap-mb`` so that a server without a bound is
measured too (set ``PYTHONPATH`` to another copy of chatstream to measure it).

Run: ``.venv/bin/python bench/header_flood.py`` (about 15 s).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # ``python bench/header_flood.py`` as well as ``-m``

from bench.load import percentile, rss_bytes  # noqa: E402
from bench.run import free_port, process, wait_ready  # noqa: E402

HOST = "127.0.0.1"
TOKEN = b"event: token"


@dataclass(slots=True)
class Flood:
    """What the flooders saw."""

    connections: int = 0
    bytes_sent: int = 0
    most_from_one: int = 0
    refusals_431: int = 0
    other_replies: int = 0


@dataclass(slots=True)
class Stream:
    """One stream's token arrival times (a read with several tokens: gaps of 0)."""

    arrivals: list[float] = field(default_factory=list)
    done: bool = False

    @property
    def gaps_ms(self) -> list[float]:
        return [(b - a) * 1000 for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)]


def read_stream(port: int, tokens: int) -> Stream:
    """``GET /api/chat/stream?message=count to N`` on a raw socket, timing each token."""
    result = Stream()
    request = (
        f"GET /api/chat/stream?message=count+to+{tokens} HTTP/1.1\r\n"
        f"Host: {HOST}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection((HOST, port)) as sock:
        sock.settimeout(60)
        sock.sendall(request)
        tail = b""
        while chunk := sock.recv(65536):
            now = time.perf_counter()
            seen = tail + chunk
            result.arrivals += [now] * seen.count(TOKEN)
            result.done = result.done or b"event: done" in seen
            tail = seen[-len(TOKEN) :]  # a marker split between reads counts once
    return result


def _flood_one(port: int, cap: int, stop: Event, totals: list[int], lock: threading.Lock) -> None:
    chunk = b"a" * 16384
    while not stop.is_set():
        sent = 0
        reply = b""
        try:
            with socket.create_connection((HOST, port)) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
                sock.settimeout(15)
                sock.sendall(f"GET /api/health HTTP/1.1\r\nHost: {HOST}\r\nX-Flood: ".encode())
                try:
                    while sent < cap and not stop.is_set():
                        sent += sock.send(chunk)
                except OSError:
                    pass  # cut off by the server
                try:
                    reply = sock.recv(64)
                except OSError:
                    pass
        except OSError:
            time.sleep(0.01)
            continue
        with lock:
            totals[0] += 1
            totals[1] += sent
            totals[2] = max(totals[2], sent)
            totals[3] += reply.startswith(b"HTTP/1.1 431 ")
            totals[4] += bool(reply) and not reply.startswith(b"HTTP/1.1 431 ")


def flood(
    port: int, flooders: int, cap: int, stop: Event, out: multiprocessing.Queue[list[int]]
) -> None:
    """``flooders`` threads flooding until ``stop``; the totals go to ``out``."""
    totals = [0, 0, 0, 0, 0]
    lock = threading.Lock()
    threads = [
        threading.Thread(target=_flood_one, args=(port, cap, stop, totals, lock), daemon=True)
        for _ in range(flooders)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out.put(totals)


@contextmanager
def sample_rss(pid: int) -> Iterator[list[int]]:
    """The server's RSS every 20 ms while the block runs (peak: ``max`` of the list)."""
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(rss_bytes(pid))
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield samples
    finally:
        done.set()
        sampler.join()


def mb(value: float) -> str:
    return f"{value / 1e6:,.0f} MB"


def gaps_line(label: str, stream: Stream) -> str:
    gaps = stream.gaps_ms
    return (
        f"{label:<14} {len(stream.arrivals):4d} tokens{'' if stream.done else ' (cut)'}"
        f"  gap p50 {percentile(gaps, 50):6.1f} ms  p99 {percentile(gaps, 99):7.1f} ms"
        f"  max {max(gaps, default=float('nan')):7.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flooders", type=int, default=16, help="flooding connections at once")
    parser.add_argument("--tokens", type=int, default=300, help="tokens of the stream")
    parser.add_argument("--delay-ms", type=int, default=20, help="the scripted model's pace")
    parser.add_argument("--cap-mb", type=int, default=256, help="bytes one flood connection sends")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        log = Path(tmp) / "server.log"
        command = [sys.executable, "-m", "chatstream", "serve", "--port", str(port)]
        command += ["--model", f"scripted:{args.delay_ms}", "--store", "sqlite::memory:"]
        command += ["--log-level", "error"]
        with process(command, env={}, log=log) as server:
            wait_ready(server, f"http://{HOST}:{port}/api/health", log)
            read_stream(port, 5)  # warm up
            rss_before = rss_bytes(server.pid)
            alone = read_stream(port, args.tokens)

            context = multiprocessing.get_context("spawn")
            stop, out = context.Event(), context.Queue()
            cap = args.cap_mb * 1024 * 1024
            flooders = context.Process(target=flood, args=(port, args.flooders, cap, stop, out))
            with sample_rss(server.pid) as during:
                flooders.start()
                time.sleep(0.5)  # the flood is on before the stream starts
                flooded = read_stream(port, args.tokens)
                stop.set()
                totals = out.get(timeout=60)
                flooders.join(30)
            time.sleep(1.0)
            rss_after = rss_bytes(server.pid)
            after = read_stream(port, args.tokens)

    result = Flood(*totals)
    ratio = percentile(flooded.gaps_ms, 99) / percentile(alone.gaps_ms, 99)
    print(f"chatstream serve (uvloop), scripted:{args.delay_ms}, {args.flooders} flooders")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, PYTHONPATH={_pythonpath()}")
    print(
        f"server RSS: before {mb(rss_before)}, during the flood {mb(max(during))} at most,"
        f" after {mb(rss_after)}"
    )
    print(gaps_line("alone", alone))
    print(gaps_line("under flood", flooded))
    print(gaps_line("after", after))
    print(f"gap p99 under the flood / alone: {ratio:.2f}x")
    print(
        f"flood: {result.connections} connections, {mb(result.bytes_sent)} sent,"
        f" at most {result.most_from_one:,} bytes on one before it was cut off,"
        f" {result.refusals_431} answered 431, {result.other_replies} answered otherwise"
    )


def _pythonpath() -> str:
    return os.environ.get("PYTHONPATH", "") or "(this checkout)"


if __name__ == "__main__":
    main()
