"""A real PostgreSQL for the tests: ``POSTGRES_URL`` when set, else one started here.

``initdb`` makes a cluster in a temporary folder and ``postgres`` serves it on a free port
of 127.0.0.1 only (no Unix socket), with a password (scram-sha-256) so that URLs carry one
as they do in production. PostgreSQL refuses to run as root: as root, the cluster belongs
to the ``postgres`` user (Debian's package makes it) or ``nobody``. Durability is traded
for speed (``fsync=off``): a clean stop still keeps everything, which is what the tests
that restart it rely on. A test that stops or restarts PostgreSQL takes one of its own
(``own_postgres_server``), so the rest of the suite never sees the outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from tests.support.server import free_port

T = TypeVar("T")
USER = "chatstream"
PASSWORD = "chatstream-test"
DATABASE = "chatstream"
# chatstream's tables, dropped between tests (the database may be someone else's).
TABLES = ("messages", "sessions", "parked_runs", "chatstream_schema")


def binary(name: str) -> str:
    """A PostgreSQL program: on PATH, or where Debian's package puts it (newest first)."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(
        Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
        reverse=True,
    )
    if versions:
        return str(versions[0])
    raise RuntimeError(
        f"{name} is not installed: scripts/test installs it with apt-get (package "
        "postgresql), or set POSTGRES_URL to a database the tests may empty"
    )


def in_thread(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to its end on a loop of its own, from sync code or inside a test."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


@dataclass
class PostgresServer:
    url: str
    port: int
    process: subprocess.Popen[bytes] | None = None
    directory: Path | None = None

    @property
    def started_here(self) -> bool:
        return self.directory is not None

    def stop(self) -> None:
        """Stop the server (fast shutdown: its clients are disconnected at once)."""
        assert self.process is not None, "cannot stop a PostgreSQL the tests did not start"
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            self.process.wait(30)

    def start(self) -> None:
        """Start it again on the same port and data: every committed session is there."""
        assert self.directory is not None
        self.process = _serve(self.directory, self.port)
        in_thread(lambda: _wait_ready(self.url, self.process))

    def flush(self) -> None:
        """Drop chatstream's tables: the next store to open creates them anew."""
        in_thread(lambda: _drop_tables(self.url))

    def query(self, sql: str, *args: object) -> list[asyncpg.Record]:
        """Run one statement on a connection of its own; its rows."""
        return in_thread(lambda: _fetch(self.url, sql, *args))


async def _fetch(url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def _drop_tables(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {', '.join(TABLES)} CASCADE")
    finally:
        await conn.close()


def _owner() -> pwd.struct_passwd | None:
    """Whom the cluster runs as: None (this user) unless this user is root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("PostgreSQL cannot run as root, and there is no postgres user")


def _run_as() -> tuple[int | None, int | None, list[int] | None]:
    """``subprocess``'s user, group and extra groups for the cluster's owner."""
    owner = _owner()
    if owner is None:
        return None, None, None
    return owner.pw_uid, owner.pw_gid, []


def _initdb(directory: Path) -> None:
    owner = _owner()
    data = directory / "data"
    password_file = directory / "password"
    password_file.write_text(PASSWORD + "\n")
    if owner is not None:
        os.chown(directory, owner.pw_uid, owner.pw_gid)
        os.chown(password_file, owner.pw_uid, owner.pw_gid)
    user, group, extra_groups = _run_as()
    done = subprocess.run(
        [binary("initdb"), "-D", str(data), "-U", USER, f"--pwfile={password_file}",
         "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C", "--no-sync",
         "--no-instructions"],
        capture_output=True,
        cwd=directory,
        user=user,
        group=group,
        extra_groups=extra_groups,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"initdb failed:\n{done.stderr.decode(errors='replace')}")


def _serve(directory: Path, port: int) -> subprocess.Popen[bytes]:
    log = (directory / "postgres.log").open("ab")
    user, group, extra_groups = _run_as()
    try:
        return subprocess.Popen(
            [binary("postgres"), "-D", str(directory / "data"), "-p", str(port),
             "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=",
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "max_connections=200", "-c", "shared_buffers=32MB"],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=directory,
            user=user,
            group=group,
            extra_groups=extra_groups,
        )  # fmt: skip
    finally:
        log.close()


def _admin(url: str) -> str:
    """The same server's ``postgres`` database: there before ``chatstream`` is made."""
    return url.rpartition("/")[0] + "/postgres"


async def _wait_ready(url: str, process: subprocess.Popen[bytes] | None) -> None:
    """Until the server takes a connection (it refuses them while it starts up)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            conn = await asyncpg.connect(_admin(url), timeout=2)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            if (process is not None and process.poll() is not None) or time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not start: {sys.exc_info()[1]!r}") from None
            await asyncio.sleep(0.05)
            continue
        await conn.close()
        return


async def _create_database(url: str) -> None:
    conn = await asyncpg.connect(_admin(url))
    try:
        await conn.execute(f"CREATE DATABASE {DATABASE}")
    finally:
        await conn.close()


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """``POSTGRES_URL``'s database, or a server of the suite's own."""
    url = os.environ.get("POSTGRES_URL")
    if url:
        yield PostgresServer(url=url, port=0)
        return
    with own_postgres_server() as server:
        yield server


@contextmanager
def own_postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL of the caller's own on a free port, whatever ``POSTGRES_URL`` says.

    Its folder is made with ``tempfile`` rather than pytest's: pytest's is root's alone,
    and the server's user must reach its data.
    """
    directory = Path(tempfile.mkdtemp(prefix="chatstream-pg-"))
    port = free_port()
    server = PostgresServer(
        url=f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{port}/{DATABASE}",
        port=port,
        directory=directory,
    )
    try:
        _initdb(directory)
        server.process = _serve(directory, port)
        in_thread(lambda: _wait_ready(server.url, server.process))
        in_thread(lambda: _create_database(server.url))
        yield server
    finally:
        if server.process is not None and server.process.poll() is None:
            server.process.send_signal(signal.SIGCONT)
            server.process.send_signal(signal.SIGQUIT)  # immediate: nothing to keep
            try:
                server.process.wait(10)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait(10)
        shutil.rmtree(directory, ignore_errors=True)
