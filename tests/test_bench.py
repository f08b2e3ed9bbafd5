"""The side-by-side benchmark runs end to end on a tiny workload and prints its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = (
    "upstream direct (floor)",
    "naive relay",
    "naive relay, SQLite",
    "chatstream, SQLite :memory:",
    "chatstream, SQLite file",
)


def test_quick_bench_prints_every_target_with_every_stream_delivered() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| scenario | target |"))
    rows = [line.split(" | ") for line in lines[header + 2 :] if line.startswith("| ")]
    assert [(row[0].lstrip("| "), row[1]) for row in rows] == [
        (scenario, target) for scenario in ("1 stream", "C=20") for target in TARGETS
    ]
    for row in rows:
        delivered, opened = row[2].split("/")
        assert delivered == opened, row
        assert float(row[8].replace(",", "")) >= 0, row  # server CPU µs per token
    assert any(line.startswith("target <= 40 µs/token on one stream:") for line in lines)


def test_the_client_bench_reads_every_token_through_both_clients() -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "upstream_client.py"),
            *("--concurrency", "10", "--tokens", "500"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split(" | ") for line in done.stdout.splitlines()[2:]]
    assert [(row[0].lstrip("| "), row[1]) for row in rows] == [
        (workload, client)
        for workload in ("1 stream", "C=10 short", "C=10 paced")
        for client in ("httpx", "aiohttp")
    ]
    assert all(float(row[2].replace(",", "")) > 0 for row in rows)
