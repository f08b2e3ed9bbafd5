"""Listening sockets that take every waiting connection, not one per turn of the loop.

uvloop's servers accept through libuv, which accepts one connection each time the
listening socket polls readable (libuv/libuv#3696): one per turn of the event loop. A
loop relaying a thousand streams turns every 40 to 60 ms, so new connections left the
kernel's queue about 20 a second (strace: one ``accept4`` per wake-up, never drained to
``EAGAIN``). In four of six of ``bench/run.py``'s C=1,000 runs, 100 to 400 of the
streams waited about 3 s for their first token while the others ran.

``Listener`` accepts like asyncio's own loop does: when the socket is readable, it takes
up to ``batch`` waiting connections and hands each to the running loop with
``loop.connect_accepted_socket``, so they get the loop's usual transports and the
server's protocol. Out of descriptors or memory, it waits a second and tries again, the
connections still queued. ``Server`` is uvicorn's server listening through it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import sys
from collections.abc import Callable

import uvicorn
from uvicorn.config import STARTUP_FAILURE

log = logging.getLogger("chatstream.server")

# Out of descriptors or memory: accepting pauses, and the connections stay queued.
_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
RETRY_AFTER_S = 1.0
# Connections taken per wake-up: enough to drain a burst of a thousand in a few turns of
# the loop, few enough that one turn does not take on all of their requests at once.
ACCEPT_BATCH = 128


def bind(host: str | None, port: int, backlog: int) -> list[socket.socket]:
    """Non-blocking listening sockets for every address ``host`` resolves to.

    As ``loop.create_server`` does: one socket per address family and address (an empty
    host means every interface), IPv6 sockets IPv6-only, ``SO_REUSEADDR`` set, and an
    address whose family the kernel lacks (IPv6 turned off) skipped.
    """
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, address in dict.fromkeys((i[0], i[4]) for i in infos):
            try:
                sock = socket.socket(family, socket.SOCK_STREAM)
            except OSError:
                continue
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
        if not sockets:
            raise OSError(f"no address of {host!r} can be listened on here")
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Listener:
    """Accept connections on ``sock`` in batches and serve each with ``protocol()``."""

    def __init__(
        self,
        sock: socket.socket,
        protocol: Callable[[], asyncio.Protocol],
        *,
        batch: int = ACCEPT_BATCH,
    ) -> None:
        self.sock = sock
        self._protocol = protocol
        self._batch = batch
        self._loop = asyncio.get_running_loop()
        self._handshakes: set[asyncio.Task[object]] = set()
        self._retry: asyncio.TimerHandle | None = None
        self._loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(self._batch):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return  # nothing more is waiting
            except ConnectionAbortedError:
                continue  # the client gave up while it was queued
            except OSError as exc:
                if exc.errno not in _EXHAUSTED:
                    # An error of that one connection (accept(2) passes on network
                    # errors, a firewall's EPERM): it is gone, the next may be fine.
                    log.debug("a queued connection could not be accepted: %s", exc)
                    continue
                log.warning(
                    "cannot accept connections (%s); trying again in %g s", exc, RETRY_AFTER_S
                )
                self._loop.remove_reader(self.sock.fileno())
                self._retry = self._loop.call_later(RETRY_AFTER_S, self._resume)
                return
            conn.setblocking(False)
            task = self._loop.create_task(self._set_up(conn))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _set_up(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._protocol, conn)
        except OSError as exc:
            conn.close()  # the peer went away before its transport was set up
            log.debug("an accepted connection could not be set up: %s", exc)
        except Exception:
            conn.close()
            log.exception("an accepted connection could not be set up")

    async def wait_handshakes(self) -> None:
        """Until every connection accepted so far has its protocol."""
        await asyncio.gather(*self._handshakes, return_exceptions=True)

    def _resume(self) -> None:
        self._retry = None
        if self.sock.fileno() >= 0:
            self._loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        """Stop accepting; connections already accepted carry on."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self.sock.fileno() >= 0:
            self._loop.remove_reader(self.sock.fileno())
            self.sock.close()


class Server(uvicorn.Server):
    """uvicorn's server, accepting through ``Listener`` when it serves a host and port.

    A Unix socket, a file descriptor, sockets handed in by a process manager and TLS
    go through uvicorn as they are.
    """

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listeners: list[Listener] = []

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        config = self.config
        if sockets is not None or config.uds or config.fd is not None or config.ssl:
            await super().startup(sockets)
            return
        # The application's start-up, with no listener of uvicorn's own.
        await super().startup(sockets=[])
        self.started = False  # not until the sockets listen
        try:
            bound = bind(config.host, config.port, config.backlog)
        except OSError as exc:
            log.error("cannot listen on %s port %d: %s", config.host, config.port, exc)
            await self.lifespan.shutdown()
            sys.exit(STARTUP_FAILURE)

        def protocol() -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state
            )

        self.listeners = [Listener(sock, protocol) for sock in bound]
        self._log_started_message(bound)
        self.started = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for listener in self.listeners:
            listener.close()
        # Connections accepted last get their protocol first, so that uvicorn's
        # shutdown reaches them too.
        for listener in self.listeners:
            await listener.wait_handshakes()
        await super().shutdown(sockets)
