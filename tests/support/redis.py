"""A real Redis for the tests: ``REDIS_URL`` when set, else a redis-server on a free port.

A test that freezes, restarts or cuts off Redis takes a server of its own
(``own_redis_server``), so the rest of the suite never sees the outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis

from tests.support.proxy import CuttingProxy
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

    def restart(self) -> None:
        """Stop it and start it again on the same port: every key is gone (no persistence)."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): commands wait unanswered while its keys' TTLs run out."""
        assert self.process is not None, "cannot pause a Redis the tests did not start"
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused server go on (SIGCONT)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

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
    with own_redis_server(directory) as server:
        yield server


@contextmanager
def own_redis_server(directory: Path) -> Iterator[RedisServer]:
    """A redis-server of the caller's own on a free port, whatever ``REDIS_URL`` says."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = RedisServer(
        url=f"redis://127.0.0.1:{port}/0", port=port, process=_spawn(port, directory),
        directory=directory,
    )  # fmt: skip
    try:
        yield server
    finally:
        if server.process is not None and server.process.poll() is None:
            server.process.send_signal(signal.SIGCONT)  # a paused server cannot stop
            server.process.terminate()
            server.process.wait(10)


class RedisLink(CuttingProxy):
    """A loopback relay to Redis for one server instance, so that it alone can be cut off.

    ``sever()`` drops its connections and refuses new ones until ``restore()``, the way a
    network partition between one instance and Redis looks to that instance. Its relays
    are tracked, so that closing the link waits for each to see its connection drop.
    """

    def __init__(self, port: int) -> None:
        super().__init__("127.0.0.1", port)
        self.severed = False
        self._relays: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def sever(self) -> None:
        self.severed = True
        self.cut()

    def restore(self) -> None:
        self.severed = False

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.severed:
            writer.transport.abort()
            return
        relay = asyncio.current_task()
        assert relay is not None
        self._relays.add(relay)
        relay.add_done_callback(self._relays.discard)
        await super()._handle(reader, writer)


@contextlib.asynccontextmanager
async def redis_link(port: int) -> AsyncIterator[RedisLink]:
    """A ``RedisLink`` to the Redis on ``port``, served on the running loop."""
    link = RedisLink(port)
    server = await asyncio.start_server(link._handle, "127.0.0.1", 0)
    link.port = server.sockets[0].getsockname()[1]
    try:
        yield link
    finally:
        link.sever()
        server.close()
        await server.wait_closed()
        # Let the relays see their connections drop, so none is left for the loop to cancel.
        await asyncio.gather(*link._relays, return_exceptions=True)
