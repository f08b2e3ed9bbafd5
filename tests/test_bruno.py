"""The bruno/ collection passes when Bruno's own CLI runs it against a live server.

The CLI is pinned in ``bruno/cli/package.json`` (with its lock file) and installed
on first use with ``npm ci --prefix bruno/cli``; it needs Node.js 18+ and npm.
When it cannot be installed or run, this test fails and says why: it is never
skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from chatstream.config import Settings
from tests.support.server import live_server

COLLECTION = Path(__file__).resolve().parent.parent / "bruno"
CLI_DIR = COLLECTION / "cli"
BRU = CLI_DIR / "node_modules" / ".bin" / "bru"
STREAMS = {"chat-stream-get", "chat-stream-post", "chat-stream"}


def bruno_cli() -> Path:
    """The pinned ``bru`` executable, installed with ``npm ci`` when missing."""
    if BRU.exists():
        return BRU
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail(
            "Bruno's CLI needs Node.js 18+ and npm, and "
            f"{'node' if node is None else 'npm'} is not on PATH "
            "(Debian: apt-get install nodejs npm)."
        )
    command = [npm, "ci", "--prefix", str(CLI_DIR), "--no-audit", "--no-fund"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=420)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`{' '.join(command)}` did not finish in 7 minutes (is npm's registry up?)")
    if done.returncode != 0 or not BRU.exists():
        pytest.fail(
            f"`{' '.join(command)}` failed ({done.returncode}), so Bruno's CLI cannot run:\n"
            f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return BRU


def request_files() -> set[str]:
    return {p.stem for p in COLLECTION.glob("*.bru")}


def test_the_collection_has_a_request_for_every_endpoint() -> None:
    assert request_files() == STREAMS | {
        "chat",
        "session-get",
        "session-delete",
        "sessions-list",
        "run-cancel",
        "run-approval",
        "ui-chat",
        "agui",
        "tools",
        "health",
    }
    for name in request_files():
        text = (COLLECTION / f"{name}.bru").read_text(encoding="utf-8")
        assert "seq:" in text and "res.status: eq" in text, name
        assert 'res.headers["content-type"]' in text, name
        if name in STREAMS:
            assert "res.body: contains event: done" in text, name


def test_bruno_cli_runs_the_collection_against_a_live_server(
    settings: Settings, tmp_path: Path
) -> None:
    bru = bruno_cli()
    report = tmp_path / "bruno.json"
    with live_server(settings) as server:
        command = [
            str(bru),
            "run",
            "--env",
            "local",
            "--env-var",
            f"baseUrl={server.url}",
            # The default "safe" sandbox evaluates assertions in QuickJS, whose WASM
            # module loads in the background when bru starts; a first request answered
            # before it has loaded gets its assertions evaluated against nothing
            # (usebruno/bruno#7373). The collection is ours, so Node's vm is safe enough.
            "--sandbox",
            "developer",
            "--reporter-json",
            str(report),
        ]
        env = {**os.environ, "NO_COLOR": "1"}
        done = subprocess.run(
            command, cwd=COLLECTION, capture_output=True, text=True, timeout=120, env=env
        )
    output = f"{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    assert report.exists(), f"bru wrote no report ({done.returncode}):\n{output}"
    summary = json.loads(report.read_text(encoding="utf-8"))[0]
    results = {Path(r["test"]["filename"]).stem: r for r in summary["results"]}
    assert set(results) == request_files(), output
    # Each assertion and test is checked on its own: a request's own status can say
    # "pass" while one of its assertions failed.
    failed = {
        name: [a for a in r["assertionResults"] if a["status"] != "pass"]
        + [t for t in r["testResults"] if t["status"] != "pass"]
        + ([r["error"]] if r.get("error") else [])
        for name, r in results.items()
    }
    assert {name: f for name, f in failed.items() if f} == {}, output
    assert done.returncode == 0, output
    # Run in the order of the meta blocks' seq: the session is read, then deleted.
    order = [Path(r["test"]["filename"]).stem for r in summary["results"]]
    assert order.index("chat-stream") < order.index("session-get") < order.index("session-delete")
    for name in STREAMS:
        checked = {(a["lhsExpr"], a["rhsExpr"]) for a in results[name]["assertionResults"]}
        assert ("res.body", "contains event: done") in checked, name
    assert summary["summary"]["failedAssertions"] == 0
    assert summary["summary"]["passedAssertions"] >= 40
