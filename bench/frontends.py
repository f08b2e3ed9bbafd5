"""Server CPU per token of the frontends' protocols beside the native stream, in one run.

The same chatstream server (``--model openai:bench`` against ``bench/upstream.py``, an
in-memory SQLite store, limits lifted), the same workload, three wire formats:

- ``native``: ``POST /api/chat/stream`` (the runs' own SSE frames);
- ``ui``: ``POST /api/ui/chat`` (the Vercel AI SDK's UI message stream);
- ``agui``: ``POST /api/agui`` (AG-UI events).

Scenarios: one stream of 20,000 tokens sent without delay (the median of ``--repeat``
runs), and C concurrent streams of 100 tokens 20 ms apart (C = 200 by default). Each
protocol runs in a fresh server process per scenario, warmed up by a few short streams,
the protocols interleaved; the load client counts one marker per token (``event:
token``, ``"type":"text-delta"``, ``"TEXT_MESSAGE_CONTENT"``) and checks each stream's
end. The table gives each protocol's server CPU per token and its ratio to the native
stream's, which the contract bounds at 1.5x.

Run: ``.venv/bin/python bench/frontends.py`` (a minute or two), ``--quick`` for seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # ``python bench/frontends.py`` as well as ``-m bench.frontends``

from bench.load import LoadResult, Protocol, raise_nofile_limit, run, run_load  # noqa: E402
from bench.run import HOST, Scenario, Server, machine, start_relay, start_upstream  # noqa: E402

PROTOCOLS = ("native", "ui", "agui")
LABELS = {
    "native": "native SSE",
    "ui": "AI SDK UI message stream",
    "agui": "AG-UI",
}
LIMIT = 1.5


def _post(
    path: str, body: Callable[[str, str], dict[str, object]]
) -> Callable[[int, float], Callable[[int, str], bytes]]:
    """``POST path`` with a JSON body made for each stream (a fresh session each)."""

    def make(tokens: int, delay_ms: float) -> Callable[[int, str], bytes]:
        def build(index: int, host: str) -> bytes:
            session = f"bench-{os.getpid()}-{time.monotonic_ns()}-{index}"
            data = orjson.dumps(body(f"bench {tokens} {delay_ms:g}", session))
            return (
                b"POST %s HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n"
                b"accept: text/event-stream\r\ncontent-length: %d\r\n\r\n%s"
                % (path.encode(), host.encode(), len(data), data)
            )

        return build

    return make


_NATIVE = _post("/api/chat/stream", lambda text, s: {"message": text, "sessionId": s})
_UI = _post(
    "/api/ui/chat",
    lambda text, s: {
        "id": s,
        "trigger": "submit-message",
        "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": text}]}],
    },
)
_AGUI = _post(
    "/api/agui",
    lambda text, s: {
        "threadId": s,
        "runId": "new",
        "messages": [{"id": "m1", "role": "user", "content": text}],
        "tools": [],
        "context": [],
    },
)


def protocol(name: str, scenario: Scenario) -> Protocol:
    """How to ask for one stream of ``name`` and how to count its tokens and its end."""
    tokens, delay = scenario.tokens, scenario.delay_ms
    if name == "native":
        return Protocol(b"event: token", b"event: done", b"event: error", _NATIVE(tokens, delay))
    if name == "ui":
        return Protocol(
            b'"type":"text-delta"', b"data: [DONE]", b'"type":"error"', _UI(tokens, delay)
        )
    return Protocol(
        b'"TEXT_MESSAGE_CONTENT"', b'"RUN_FINISHED"', b'"RUN_ERROR"', _AGUI(tokens, delay)
    )


async def load(server: Server, name: str, scenario: Scenario) -> LoadResult:
    return await run_load(
        HOST,
        server.port,
        protocol(name, scenario),
        concurrency=scenario.concurrency,
        expected_tokens=scenario.tokens,
        timeout_s=scenario.timeout_s,
        server_pid=server.pid,
        ramp_s=scenario.ramp_s,
    )


def per_token_us(result: LoadResult) -> float:
    return result.server_cpu_s / max(result.tokens, 1) * 1e6


async def bench(scenarios: list[Scenario], tmp: Path) -> list[tuple[str, str, LoadResult]]:
    rows: list[tuple[str, str, LoadResult]] = []
    with start_upstream(tmp) as up:
        for number, scenario in enumerate(scenarios):
            for name in PROTOCOLS:
                with start_relay("chatstream", up.port, tmp, number) as server:
                    warm = Scenario("warm-up", 4, 20, 0)
                    for _ in range(2):
                        await load(server, name, warm)
                    results = [await load(server, name, scenario) for _ in range(scenario.repeat)]
                result = sorted(results, key=per_token_us)[len(results) // 2]
                rows.append((scenario.name, name, result))
                print(
                    f"  {scenario.name:<10} {LABELS[name]:<26}"
                    f" ok {len(result.streams) - result.failures}/{len(result.streams)}"
                    f"  {per_token_us(result):7.1f} µs/token",
                    file=sys.stderr,
                    flush=True,
                )
    return rows


def table(rows: list[tuple[str, str, LoadResult]]) -> str:
    native = {s: per_token_us(r) for s, name, r in rows if name == "native"}
    lines = [
        "| scenario | protocol | ok | tokens/s | server CPU µs/token | vs native |",
        "|---|---|---|---|---|---|",
    ]
    for scenario, name, r in rows:
        us = per_token_us(r)
        ratio = us / native[scenario] if native.get(scenario) else float("nan")
        ok = len(r.streams) - r.failures
        lines.append(
            f"| {scenario} | {LABELS[name]} | {ok}/{len(r.streams)}"
            f" | {r.tokens / r.wall_s:,.0f} | {us:.1f} | {ratio:.2f}x |"
        )
    return "\n".join(lines)


def verdicts(rows: list[tuple[str, str, LoadResult]]) -> list[str]:
    native = {s: per_token_us(r) for s, name, r in rows if name == "native"}
    out = []
    for scenario, name, r in rows:
        if name == "native" or not native.get(scenario):
            continue
        ratio = per_token_us(r) / native[scenario]
        mark = "met" if ratio <= LIMIT and r.failures == 0 else "MISSED"
        out.append(f"{scenario}: {LABELS[name]} at {ratio:.2f}x native (<= {LIMIT}x: {mark})")
        if r.failures:
            out.append(f"{scenario}: {LABELS[name]}: {r.failures} failed, e.g. {r.first_errors()}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny workload")
    parser.add_argument("--tokens", type=int, default=20_000, help="tokens of the single stream")
    parser.add_argument("--repeat", type=int, default=3, help="runs of the single stream")
    parser.add_argument("--concurrency", type=int, default=200, help="concurrent paced streams")
    args = parser.parse_args()
    if args.quick:
        scenarios = [Scenario("1 stream", 1, 2000, 0), Scenario("C=20", 20, 20, 5)]
    else:
        scenarios = [
            Scenario("1 stream", 1, args.tokens, 0, repeat=args.repeat),
            Scenario(f"C={args.concurrency}", args.concurrency, 100, 20.0),
        ]
    raise_nofile_limit()
    started = time.perf_counter()
    print(f"machine: {machine()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="chatstream-bench-") as tmp:
        rows = run(bench(scenarios, Path(tmp)))
    print()
    print(table(rows))
    print()
    for line in verdicts(rows):
        print(line)
    print(f"\nbench took {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
