"""A flood of non-streaming turns from one key, beside another key's stream.

One key sends ``--calls`` concurrent ``POST /api/chat`` turns at once against a server
whose per-key stream limit is ``--per-key``. Meanwhile another key streams one answer, and
its pace is compared with the same stream run alone. Then ``--per-key`` long turns are sent
whose callers hang up after 0.3 s. Printed: how many of the flood's turns ran and how many
were refused, how long the hung-up turns kept their sessions busy, the server's RSS, and the
other stream's inter-token gaps alone and during the flood.

Run: ``.venv/bin/python bench/turn_flood.py`` (about 20 s). Loopback only, bounded in
count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.load import percentile  # noqa: E402
from tests.support.server import free_port  # noqa: E402

FLOOD_KEY = "sk-flood-0123456789"
OTHER_KEY = "sk-other-0123456789"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def paced_stream(http: httpx.AsyncClient, tokens: int) -> list[float]:
    """Gaps between the tokens of one streamed answer, in ms."""
    gaps: list[float] = []
    last: float | None = None
    headers = {"Authorization": f"Bearer {OTHER_KEY}"}
    params = {"message": f"count to {tokens}"}
    async with http.stream("GET", "/api/chat/stream", params=params, headers=headers) as response:
        assert response.status_code == 200, response.status_code
        async for line in response.aiter_lines():
            if line == "event: token":
                now = time.perf_counter()
                if last is not None:
                    gaps.append((now - last) * 1000)
                last = now
    return gaps


async def one_call(http: httpx.AsyncClient, index: int, tokens: int, hang_up_s: float) -> int:
    """A non-streaming turn: its status, or 0 when the caller hung up before the answer."""
    body = {"message": f"count to {tokens}", "sessionId": f"flood-{index}"}
    call = http.post("/api/chat", json=body, headers={"Authorization": f"Bearer {FLOOD_KEY}"})
    if hang_up_s <= 0:
        return (await call).status_code
    try:
        return (await asyncio.wait_for(call, hang_up_s)).status_code
    except TimeoutError:
        return 0


async def busy_for(http: httpx.AsyncClient, session_ids: list[str], limit_s: float) -> float:
    """Seconds until none of the sessions has a running turn."""
    started = time.monotonic()
    headers = {"Authorization": f"Bearer {FLOOD_KEY}"}
    pending = set(session_ids)
    while pending and time.monotonic() - started < limit_s:
        for session_id in list(pending):
            response = await http.get(f"/api/chat/sessions/{session_id}", headers=headers)
            if response.status_code == 404 or "activeRunId" not in response.json():
                pending.discard(session_id)
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def measure(url: str, pid: int, args: argparse.Namespace) -> None:
    limits = httpx.Limits(max_connections=args.calls + 10)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        alone = await paced_stream(http, args.tokens)
        rss_before = rss_mb(pid)
        stream = asyncio.create_task(paced_stream(http, args.tokens))
        calls = [one_call(http, i, args.tokens, 0) for i in range(args.calls)]
        statuses = await asyncio.gather(*calls)
        during = await stream
        rss_during = rss_mb(pid)
        # Then turns that run, whose callers hang up: how long do they hold their sessions?
        hung_up = [args.calls + i for i in range(args.per_key)]
        await asyncio.gather(*(one_call(http, i, 10 * args.tokens, 0.3) for i in hung_up))
        busy_s = await busy_for(http, [f"flood-{i}" for i in hung_up], args.grace_s + 30)
    ran = statuses.count(200)
    refused = statuses.count(429)
    answer_s = 10 * args.tokens * args.delay_ms / 1000
    print(f"flood: {args.calls} concurrent POST /api/chat, per-key limit {args.per_key}")
    print(f"  answered 200: {ran}, refused 429: {refused}, other: {args.calls - ran - refused}")
    print(
        f"  {len(hung_up)} callers that hung up after 0.3 s: their sessions were busy "
        f"{busy_s:.1f} s more (resume grace {args.grace_s:g} s; the answer takes {answer_s:g} s)"
    )
    print(f"  server RSS {rss_before:.0f} MB before the flood, {rss_during:.0f} MB after")
    print("| other key's stream | gap p50 ms | gap p99 ms | max ms |")
    print("|---|---|---|---|")
    for label, gaps in (("alone", alone), ("during the flood", during)):
        row = (percentile(gaps, 50), percentile(gaps, 99), max(gaps))
        print(f"| {label} | {row[0]:.1f} | {row[1]:.1f} | {row[2]:.1f} |")
    ratio = percentile(during, 99) / percentile(alone, 99)
    print(f"gap p99 during / alone: {ratio:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--per-key", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--delay-ms", type=int, default=20)
    parser.add_argument("--hang-up-s", type=float, default=0.3)
    parser.add_argument("--grace-s", type=float, default=1.0)
    args = parser.parse_args()
    port = free_port()
    env = {
        **os.environ,
        "CHATSTREAM_API_KEYS": f"{FLOOD_KEY},{OTHER_KEY}",
        "CHATSTREAM_MAX_STREAMS_PER_KEY": str(args.per_key),
        "CHATSTREAM_TURNS_PER_MINUTE": "0",
        "CHATSTREAM_RESUME_GRACE_S": str(args.grace_s),
        "CHATSTREAM_STORE": "sqlite:///:memory:",
    }
    command = [sys.executable, "-m", "chatstream", "serve", "--port", str(port)]
    command += ["--model", f"scripted:{args.delay_ms}", "--log-level", "warning"]
    server = subprocess.Popen(command, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/api/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.05)
        asyncio.run(measure(url, server.pid, args))
    finally:
        server.terminate()
        server.wait(15)


if __name__ == "__main__":
    main()
