"""The listener takes every waiting connection at once, even from a busy event loop."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import uvloop

from chatstream.server.listener import Listener, bind
from tests.support.server import free_port

# Fewer than the smallest default accept queue (128 before Linux 5.4).
CLIENTS = 100


def _connect_all(port: int, count: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]


async def _accepted_within(seconds: float) -> tuple[int, float]:
    loop = asyncio.get_running_loop()
    [sock] = bind("127.0.0.1", 0, 2048)
    made: list[float] = []
    all_in = asyncio.Event()

    class Counted(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            made.append(time.monotonic())
            if len(made) == CLIENTS:
                all_in.set()

    listener = Listener(sock, Counted)
    # Every turn of the loop spends 20 ms in a callback, as a server relaying many
    # streams does. uvloop's own server accepts one connection per turn: 2 s for 100.
    busy = True

    def relay_some_streams() -> None:
        time.sleep(0.02)
        if busy:
            loop.call_soon(relay_some_streams)

    loop.call_soon(relay_some_streams)
    started = time.monotonic()
    # The clients connect while the loop is busy; the kernel completes their handshakes.
    clients = await asyncio.to_thread(_connect_all, sock.getsockname()[1], CLIENTS)
    try:
        await asyncio.wait_for(all_in.wait(), seconds)
    except TimeoutError:
        pass  # the assertions say how many came in
    finally:
        busy = False
        listener.close()
        for client in clients:
            client.close()
    return len(made), (max(made) - started if made else float("inf"))


def test_a_busy_uvloop_accepts_a_burst_of_connections_in_a_few_turns() -> None:
    accepted, took = uvloop.run(_accepted_within(3.0))
    assert accepted == CLIENTS
    assert took < 1.0, f"{CLIENTS} connections took {took:.2f} s to be accepted"


def test_the_listener_works_on_asyncio_s_loop_too() -> None:
    # The test servers run on asyncio's loop, which accepts in batches by itself.
    accepted, took = asyncio.run(_accepted_within(3.0))
    assert accepted == CLIENTS
    assert took < 1.0, f"{CLIENTS} connections took {took:.2f} s to be accepted"


# Out of file descriptors, the listener leaves connections queued, says so, and takes
# them once descriptors are free again. Run in its own process, with few descriptors.
_STARVED_SERVER = textwrap.dedent(
    """
    import asyncio, os, resource, sys
    import uvloop
    from chatstream.server import listener

    listener.RETRY_AFTER_S = 0.2

    class Hello(asyncio.Protocol):
        def connection_made(self, transport):
            transport.write(b"hello")
            transport.close()

    async def main():
        [sock] = listener.bind("127.0.0.1", int(sys.argv[1]), 128)
        listener.Listener(sock, Hello)
        # The limit caps descriptor numbers: with it just above the lowest free one,
        # exactly one is left, and the second connection waiting finds none.
        lowest_free = os.dup(0)
        os.close(lowest_free)
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free + 1, hard))
        print("ready", flush=True)
        await asyncio.sleep(30)

    uvloop.run(main())
    """
)


def test_out_of_descriptors_it_pauses_then_serves_every_waiting_client(tmp_path: Path) -> None:
    port = free_port()
    script = tmp_path / "starved.py"
    script.write_text(_STARVED_SERVER, encoding="utf-8")
    server = subprocess.Popen(
        [sys.executable, str(script), str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        clients = _connect_all(port, 4)
        replies = []
        for client in clients:
            client.settimeout(10)
            replies.append(client.recv(100))
            client.close()
    finally:
        server.kill()
        _, errors = server.communicate(timeout=10)
    assert replies == [b"hello"] * 4
    assert "cannot accept connections" in errors
    assert "Too many open files" in errors


def test_serve_on_a_port_in_use_exits_with_a_clear_error(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "chatstream", "serve", "--model", "scripted"]
        command += ["--port", str(port), "--store", f"sqlite:///{tmp_path / 'chat.db'}"]
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 3
    assert f"cannot listen on 127.0.0.1 port {port}" in done.stderr + done.stdout
    assert "Address already in use" in done.stderr + done.stdout


def test_an_address_family_the_kernel_lacks_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    # A kernel with IPv6 turned off refuses AF_INET6 sockets; "" still listens on IPv4.
    real = socket.socket

    def no_ipv6(family: int = socket.AF_INET, *args: Any, **kwargs: Any) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(97, "Address family not supported by protocol")
        return real(family, *args, **kwargs)

    monkeypatch.setattr(socket, "socket", no_ipv6)
    sockets = bind("", 0, 16)
    try:
        assert [s.family for s in sockets] == [socket.AF_INET]
    finally:
        for s in sockets:
            s.close()
    with pytest.raises(OSError, match="can be listened on"):
        bind("::1", 0, 16)
