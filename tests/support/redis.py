"""A real Redis for the tests: ``REDIS_URL`` when set, else a redis-server on a free port."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis

from tests.support.server import free_port


@dataclass
class RedisServer:
    url: str
    port: int
    process: subprocess.Popen[bytes] | None
    directory: Path | None = None

    def stop(self) -> None:
        """Stop the server (only one the tests started)."""
        assert self.process is not None, "cannot stop a Redis the tests did not start"
        self.process.terminate()
        self.process.wait(10)

    def start(self) -> None:
        """Start it again on the same port."""
        assert self.directory is not None
        self.process = _spawn(self.port, self.directory)

    def flush(self) -> None:
        client = redis.Redis.from_url(self.url)
        try:
            client.flushdb()
        finally:
            client.close()


def _spawn(port: int, directory: Path) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(
            "redis-server is not installed: scripts/test installs it with apt-get "
            "(package redis-server), or set REDIS_URL to a Redis the tests may flush"
        )
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.2)
    deadline = time.monotonic() + 10
    try:
        while True:
            try:
                client.ping()
                return process
            except redis.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)
    finally:
        client.close()


@contextmanager
def redis_server(directory: Path) -> Iterator[RedisServer]:
    url = os.environ.get("REDIS_URL")
    if url:
        yield RedisServer(url=url, port=0, process=None)
        return
    port = free_port()
    server = RedisServer(
        url=f"redis://127.0.0.1:{port}/0", port=port, process=_spawn(port, directory),
        directory=directory,
    )  # fmt: skip
    try:
        yield server
    finally:
        if server.process is not None and server.process.poll() is None:
            server.process.terminate()
            server.process.wait(10)
