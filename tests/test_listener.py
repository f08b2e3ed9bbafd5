"""The listener takes every waiting connection at once, even from a busy event loop."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import uvloop

from chatstream.server.listener import Listener, bind
from tests.support.server import free_port

CLIENTS = 300


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
    # streams does. uvloop's own server accepts one connection per turn: 6 s for 300.
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


def test_a_busy_asyncio_loop_accepts_them_too() -> None:
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
        # One descriptor to spare: the second connection waiting finds none.
        in_use = len(os.listdir("/proc/self/fd"))
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 1, hard))
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
