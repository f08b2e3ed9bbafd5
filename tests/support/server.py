"""A real chatstream server on loopback, in a thread of the test process."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn

from chatstream.config import Settings
from chatstream.server.app import create_app
from chatstream.server.listener import Server
from chatstream.server.protocol import uvicorn_config
from chatstream.server.runtime import Runtime, runtime_in


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LiveServer:
    url: str
    app: Any
    server: uvicorn.Server
    loop: asyncio.AbstractEventLoop | None = None

    @property
    def runtime(self) -> Runtime:
        """What the app's lifespan handed the server (the state requests read)."""
        runtime = runtime_in(self.server.lifespan.state)
        assert runtime is not None, "the server has not started"
        return runtime

    def call(self, coro: object) -> object:
        """Run a coroutine on the server's own loop and wait for its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)  # type: ignore[arg-type]


@contextmanager
def live_server(
    settings: Settings, make_app: Callable[[Settings], Any] = create_app
) -> Iterator[LiveServer]:
    """Serve ``make_app(settings)`` (``create_app`` by default) on a free loopback port."""
    port = free_port()
    settings = settings.with_(host="127.0.0.1", port=port)
    app = make_app(settings)
    config = uvicorn_config(app, settings, log_level="warning", loop="asyncio")
    server = Server(config)
    live = LiveServer(url=f"http://127.0.0.1:{port}", app=app, server=server)

    def serve() -> None:
        loop = asyncio.new_event_loop()
        live.loop = loop
        try:
            loop.run_until_complete(server.serve())
        finally:
            loop.close()

    thread = threading.Thread(target=serve, name=f"chatstream-test-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield live
    finally:
        server.should_exit = True
        thread.join(20)
