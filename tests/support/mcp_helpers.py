"""Real MCP servers for the tests: the suite's own over stdio or HTTP, and one from npm.

``tests/support/mcp_server.py`` is written with the ``mcp`` SDK; it records what it saw
(starts, calls cancelled) in the file named by ``MCP_TEST_LOG``, read back with
``events``. ``@modelcontextprotocol/server-everything`` is pinned in
``tests/support/npm_mcp`` and installed on first use with ``npm ci``.

Not named ``mcp.py``: the test server runs as a script from this folder, where a module
of that name would stand in for the SDK's ``mcp`` package.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support.process import serving
from tests.support.server import free_port

TEST_SERVER = Path(__file__).resolve().parent / "mcp_server.py"
NPM_DIR = Path(__file__).resolve().parent / "npm_mcp"
EVERYTHING = NPM_DIR / "node_modules" / "@modelcontextprotocol" / "server-everything"


def stdio(log: Path, **options: Any) -> dict[str, Any]:
    """The config of the test server over stdio, recording to ``log``."""
    env = {"MCP_TEST_LOG": str(log), **options.pop("env", {})}
    return {"command": sys.executable, "args": [str(TEST_SERVER)], "env": env, **options}


def events(log: Path, kind: str) -> list[dict[str, Any]]:
    """What the test server recorded in ``log`` of one ``kind`` (``start``, ``cancelled``...)."""
    if not log.exists():
        return []
    lines = log.read_text(encoding="utf-8").splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


@contextmanager
def http_server(log: Path, token: str | None = None, port: int | None = None) -> Iterator[str]:
    """The test server over Streamable HTTP on a loopback port; yields its URL."""
    port = port or free_port()
    command = [sys.executable, str(TEST_SERVER), "--http", str(port)]
    if token:
        command += ["--token", token]
    process = subprocess.Popen(command, env={**os.environ, "MCP_TEST_LOG": str(log)})
    with serving(process, port):
        yield f"http://127.0.0.1:{port}/mcp"


def everything_server() -> list[str]:
    """The command of the pinned server-everything, installed with ``npm ci`` when missing."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        # As for Bruno's CLI: never skipped, since the suite's own setup can install it.
        pytest.fail(
            "@modelcontextprotocol/server-everything needs Node.js and npm, and "
            f"{'node' if node is None else 'npm'} is not on PATH "
            "(Debian: apt-get install nodejs npm)."
        )
    entry = EVERYTHING / "dist" / "index.js"
    if not entry.exists():
        command = [npm, "ci", "--prefix", str(NPM_DIR), "--no-audit", "--no-fund"]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`{' '.join(command)}` did not finish in 5 minutes")
        if done.returncode != 0 or not entry.exists():
            pytest.fail(f"`{' '.join(command)}` failed:\n{done.stdout[-3000:]}\n{done.stderr}")
    return [node, str(entry), "stdio"]


def alive(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _parents() -> dict[int, int]:
    """Each live process and its parent, read from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                parents[int(entry.name)] = int(fields[1])
    return parents


def children(pid: int | None = None) -> set[int]:
    """The live processes whose parent is ``pid`` (this test process by default)."""
    pid = os.getpid() if pid is None else pid
    return {child for child, parent in _parents().items() if parent == pid}


def descendants(pid: int) -> set[int]:
    """The live processes below ``pid``: its children, theirs, and so on."""
    parents = _parents()
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {c for c, p in parents.items() if p in frontier} - found
        found |= frontier
    return found
