"""A chatstream server in its own process, started the way a user starts it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

from tests.support.server import free_port


@dataclass
class ServerProcess:
    url: str
    process: subprocess.Popen[bytes]

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def output(self) -> str:
        out, _ = self.process.communicate(timeout=30)
        return out.decode(errors="replace")


@contextmanager
def server_process(*args: str, env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    """Run ``python -m chatstream serve`` on a free port until the block ends."""
    port = free_port()
    command = [sys.executable, "-m", "chatstream", "serve", "--port", str(port), *args]
    process = subprocess.Popen(
        command,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/api/health", timeout=1).status_code in (200, 503):
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            out = process.communicate()[0].decode(errors="replace")
            raise RuntimeError(f"the server did not start:\n{out}")
        time.sleep(0.05)
    try:
        yield ServerProcess(url, process)
    finally:
        if process.poll() is None:
            process.kill()
        if process.stdout is not None and not process.stdout.closed:
            process.communicate()


@contextmanager
def serving(process: subprocess.Popen[bytes], port: int) -> Iterator[None]:
    """Wait until ``process`` listens on ``port``; kill it when the block ends."""
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{process.args!r} did not start") from None
                time.sleep(0.05)
        yield
    finally:
        process.kill()
        process.wait(10)
