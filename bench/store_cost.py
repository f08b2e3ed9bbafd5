"""What a session store costs chatstream per turn: SQLite beside the stores you name.

A turn costs its store one ``load`` (the history the model reads) and one ``append``
(the user's message and the answer, in one transaction, with a fencing token). This
runs that pair directly against each store, with no server around it:

- serial: one turn after another, for the latency of a turn's store work and the CPU
  this process (chatstream's side) spends on it;
- concurrent: C turns at once over as many sessions, for throughput;
- long sessions: a turn in a session of 10, 1,000 and 5,000 turns, as a multiple of the
  first: a turn reads the last ``CHATSTREAM_MAX_HISTORY_MESSAGES`` (200) messages and
  the stored count, so it should cost about the same however long the session is.

Run: ``.venv/bin/python bench/store_cost.py postgresql://user:pass@127.0.0.1:5432/db``
(any store URLs; a SQLite file in a temporary folder is always measured first, as the
baseline). ``--turns`` and ``--concurrency`` size the workload. The sessions it writes
are named ``bench-cost-…``; point it at a database you may write to.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from chatstream import messages as m
from chatstream.config import TurnSettings
from chatstream.store import SessionStore, StoreURL, open_store
from chatstream.store.base import SessionRef

ANSWER = "The weather in Seoul is 21 °C and clear. " * 8  # about 340 characters
# What a turn shows the model, and so reads of its session.
WINDOW = TurnSettings().max_history_messages
LENGTHS = (10, 1_000, 5_000)


@dataclass(frozen=True, slots=True)
class Cost:
    store: str
    serial_ms: float
    cpu_us: float
    turns_per_s: float
    long_ms: tuple[float, ...]  # a turn's ms in a session of each of LENGTHS turns


async def turn(store: SessionStore, ref: SessionRef, fence: int | None) -> None:
    await store.load(ref, last=WINDOW)
    await store.append(
        ref, [m.user("what is the weather in Seoul?"), m.assistant(ANSWER)], fence=fence
    )


async def measure(url: str, turns: int, concurrency: int, sessions: int) -> Cost:
    store = await open_store(url)
    run = secrets.token_hex(4)
    refs = [SessionRef("", f"bench-cost-{run}-{i}") for i in range(sessions)]
    fence = time.time_ns() // 1000
    try:
        for _ in range(min(50, turns)):  # warm-up: connections, statements, caches
            fence += 1
            await turn(store, SessionRef("", f"bench-cost-{run}-warm"), fence)
        started, cpu = time.perf_counter(), time.process_time()
        for i in range(turns):
            fence += 1
            await turn(store, refs[i % sessions], fence)
        wall, spent = time.perf_counter() - started, time.process_time() - cpu

        async def worker(index: int, count: int) -> None:
            ref = SessionRef("", f"bench-cost-{run}-c{index}")
            for k in range(count):
                await turn(store, ref, fence + 1 + k)

        started = time.perf_counter()
        each = max(1, turns // concurrency)
        await asyncio.gather(*(worker(i, each) for i in range(concurrency)))
        concurrent = time.perf_counter() - started
        long_ms = await long_session(store, SessionRef("", f"bench-cost-{run}-long"))
    finally:
        await store.close()
    return Cost(
        store=url,
        serial_ms=wall / turns * 1000,
        cpu_us=spent / turns * 1e6,
        turns_per_s=each * concurrency / concurrent,
        long_ms=long_ms,
    )


async def long_session(
    store: SessionStore, ref: SessionRef, samples: int = 20
) -> tuple[float, ...]:
    """A turn's ms (the median of ``samples``) once the session has each of LENGTHS turns."""
    pair = [m.user("what is the weather in Seoul?"), m.assistant(ANSWER)]
    stored, result = 0, []
    for length in LENGTHS:
        while stored < length:  # grown without timing it
            await store.append(ref, pair)
            stored += 1
        times = []
        for _ in range(samples):
            started = time.perf_counter()
            await turn(store, ref, None)
            times.append(time.perf_counter() - started)
        stored += samples
        result.append(sorted(times)[samples // 2] * 1000)
    return tuple(result)


def label(url: str) -> str:
    where = StoreURL.parse(url)
    if where.backend == "sqlite":
        return "SQLite file"
    return {"redis": "Redis", "postgresql": "PostgreSQL"}[where.backend]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("urls", nargs="*", help="store URLs to measure beside SQLite")
    parser.add_argument("--turns", type=int, default=2000, help="turns per measurement")
    parser.add_argument("--concurrency", type=int, default=50, help="turns at once")
    parser.add_argument("--sessions", type=int, default=100, help="sessions the serial turns use")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="chatstream-store-cost-") as tmp:
        urls = [f"sqlite:///{Path(tmp) / 'cost.db'}", *args.urls]
        costs = [await measure(u, args.turns, args.concurrency, args.sessions) for u in urls]
    base = costs[0]
    print(
        f"{args.turns} turns (load + append of 2 messages); concurrent: {args.concurrency} at once"
    )
    print()
    print(
        "| store | ms per turn (serial) | chatstream CPU µs per turn | x SQLite's CPU"
        " | turns/s at C |"
    )
    print("|---|---|---|---|---|")
    for cost in costs:
        print(
            f"| {label(cost.store)} | {cost.serial_ms:.3f} | {cost.cpu_us:,.0f}"
            f" | {cost.cpu_us / base.cpu_us:.1f}x | {cost.turns_per_s:,.0f} |"
        )
    print()
    print("CPU is this process's (chatstream's side); a database server's own is not counted.")
    print()
    head = " | ".join(f"{n:,} turns" for n in LENGTHS)
    print(f"A turn (median ms) in a long session, no fence ({WINDOW} messages read):")
    print()
    print(f"| store | {head} | last x first |")
    print("|---|" + "---|" * (len(LENGTHS) + 1))
    for cost in costs:
        cells = " | ".join(f"{ms:.2f}" for ms in cost.long_ms)
        print(f"| {label(cost.store)} | {cells} | {cost.long_ms[-1] / cost.long_ms[0]:.1f}x |")


if __name__ == "__main__":
    asyncio.run(main())
