"""The production shape: server processes with sessions in PostgreSQL and runs in Redis.

``--store postgresql://… --runs redis://…``: every instance reads every session, resumes
and stops every run; nothing delivered is lost when an instance dies, and an instance
that lost its session's lock cannot write over a newer turn. The lock TTL is 1 s, so that
"past the lock TTL" takes a second or two.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from tests.support.postgres import PostgresServer, own_postgres_server
from tests.support.process import ServerProcess, server_process
from tests.support.redis import RedisServer, own_redis_server
from tests.support.sse import Streamed, stream

ENV = {
    "CHATSTREAM_LOCK_TTL_S": "1",
    "CHATSTREAM_WEATHER_GEOCODING_URL": "http://127.0.0.1:9/v1/search",
    "CHATSTREAM_WEATHER_FORECAST_URL": "http://127.0.0.1:9/v1/forecast",
}


def instance_args(store: str, runs: str) -> tuple[str, ...]:
    """One instance: tokens every 20 ms, sessions in ``store``, runs shared in ``runs``."""
    return ("--model", "scripted:20", "--store", store, "--runs", runs)


def counted(n: int) -> str:
    return " ".join(str(i) for i in range(1, n + 1))


def seqs(result: Streamed) -> list[int]:
    return [int(event_id.rsplit(":", 1)[1]) for event_id in result.ids]


def run_of(result: Streamed) -> str:
    return (result.frames[0].id or "").rsplit(":", 1)[0]


async def eventually_healthy(http: httpx.AsyncClient, url: str, *, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while (await http.get(f"{url}/api/health")).status_code != 200:
        assert time.monotonic() < deadline, "the server never became healthy again"
        await asyncio.sleep(0.1)


@pytest.fixture
def pair(postgres_url: str, redis_url: str) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    args = instance_args(postgres_url, redis_url)
    with server_process(*args, env=ENV) as a, server_process(*args, env=ENV) as b:
        yield a, b


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL for this test alone, to stop and start."""
    with own_postgres_server() as server:
        yield server


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server for this test alone, to freeze or restart."""
    with own_redis_server(tmp_path / "redis") as server:
        yield server


async def test_a_turn_on_a_is_kept_in_postgresql_and_read_on_b(
    pair: tuple[ServerProcess, ServerProcess],
    postgres_instance: PostgresServer,
    redis_url: str,
) -> None:
    a, b = pair
    async with httpx.AsyncClient(timeout=30) as http:
        params = {"message": "count to 12", "sessionId": "pg-1"}
        done = await stream(http, "GET", f"{a.url}/api/chat/stream", params=params)
        assert done.types[-1] == "done"
        assert done.data[-1]["historyLength"] == 2
        session = (await http.get(f"{b.url}/api/chat/sessions/pg-1")).json()
        assert [m["content"] for m in session["messages"]] == ["count to 12", counted(12)]
        health = (await http.get(f"{b.url}/api/health")).json()
        assert health["store"] == {"kind": "postgresql", "ok": True}
    # The session is in PostgreSQL, and nothing of it in Redis, which holds only runs.
    rows = postgres_instance.query("SELECT id, message_count FROM sessions")
    assert [(r["id"], r["message_count"]) for r in rows] == [("pg-1", 2)]
    async with Redis.from_url(redis_url) as redis:
        assert await redis.keys("chatstream:session*") == []
        assert await redis.keys("chatstream:run:*")  # the run's record and log


async def test_a_run_started_on_a_resumes_on_b(pair: tuple[ServerProcess, ServerProcess]) -> None:
    a, b = pair
    async with httpx.AsyncClient(timeout=30) as http:
        params = {"message": "count to 60", "sessionId": "pg-resume"}
        first = await stream(http, "GET", f"{a.url}/api/chat/stream", params=params, max_events=7)
        rest = await stream(
            http,
            "GET",
            f"{b.url}/api/chat/stream",
            headers={"Last-Event-ID": first.frames[6].id or ""},
        )
        frames = first.frames[:7] + rest.frames
        assert [int((f.id or "").rsplit(":", 1)[1]) for f in frames] == list(
            range(1, len(frames) + 1)
        )
        assert rest.types[-1] == "done"
        text = "".join(e.content for e in (first.events[:7] + rest.events) if e.type == "token")
        assert text == counted(60)
        session = (await http.get(f"{a.url}/api/chat/sessions/pg-resume")).json()
        assert session["messages"][-1]["content"] == text


async def test_sessions_outlive_a_restart_of_everything(
    own_postgres: PostgresServer, own_redis: RedisServer
) -> None:
    args = instance_args(own_postgres.url, own_redis.url)
    async with httpx.AsyncClient(timeout=30) as http:
        with server_process(*args, env=ENV) as a, server_process(*args, env=ENV) as b:
            for url, session_id in ((a.url, "kept-a"), (b.url, "kept-b")):
                params = {"message": "count to 5", "sessionId": session_id}
                done = await stream(http, "GET", f"{url}/api/chat/stream", params=params)
                assert done.types[-1] == "done"
            for server in (a, b):
                server.terminate()
                server.process.wait(30)
        own_postgres.stop()
        own_redis.restart()  # Redis keeps nothing: every run, lock and key is gone
        own_postgres.start()
        with server_process(*args, env=ENV) as a, server_process(*args, env=ENV) as b:
            for session_id in ("kept-a", "kept-b"):
                session = (await http.get(f"{b.url}/api/chat/sessions/{session_id}")).json()
                assert [m["content"] for m in session["messages"]] == ["count to 5", counted(5)]
            params = {"message": "count to 3", "sessionId": "kept-a"}
            again = await stream(http, "GET", f"{a.url}/api/chat/stream", params=params)
            assert again.data[-1]["historyLength"] == 4


async def test_kill_9_of_a_mid_turn_stores_what_the_followers_saw_once(
    postgres_url: str, redis_url: str
) -> None:
    args = instance_args(postgres_url, redis_url)
    with (
        server_process(*args, env=ENV) as a,
        server_process(*args, env=ENV) as b,
        server_process(*args, env=ENV) as c,
    ):
        async with httpx.AsyncClient(timeout=30) as http:
            # A tool round, then a long answer that A is killed in the middle of.
            question = "what is 2+3? then count to 5000"
            params = {"message": question, "sessionId": "pg-lost"}
            first = await stream(
                http, "GET", f"{a.url}/api/chat/stream", params=params, max_events=5
            )
            assert first.types == ["tool_call", "tool_progress", "tool_result", "token", "token"]
            # Two instances follow the run, so two notice its owner die.
            followers = [
                asyncio.create_task(
                    stream(
                        http,
                        "GET",
                        f"{url}/api/chat/stream",
                        headers={"Last-Event-ID": first.frames[-1].id or ""},
                    )
                )
                for url in (b.url, c.url)
            ]
            await asyncio.sleep(0.5)
            a.process.send_signal(signal.SIGKILL)
            on_b, on_c = await asyncio.wait_for(asyncio.gather(*followers), 15)
            for result in (on_b, on_c):
                assert result.types[-1] == "error"
                assert result.data[-1]["code"] == "RUN_LOST"
                assert seqs(result) == list(range(6, 6 + len(result.frames)))
            seen = first.text + on_b.text
            assert on_c.text == on_b.text
            assert len(seen.split()) > 5  # B saw tokens of its own before A died

            # The session holds the turn as its readers saw it: the tool round, and the text
            # as an interrupted answer, stored once although both instances noticed.
            session = (await http.get(f"{b.url}/api/chat/sessions/pg-lost")).json()
            assert [(m["role"], m["content"]) for m in session["messages"]] == [
                ("user", question),
                ("assistant", ""),
                ("tool", "5"),
                ("assistant", seen),
            ]
            call = session["messages"][1]["toolCalls"][0]
            assert (call["tool"], call["args"]) == ("calculate", {"expression": "2+3"})
            assert session["messages"][2]["toolCallId"] == call["id"]
            assert session["messages"][-1]["interrupted"] is True
            status = (await http.get(f"{c.url}/api/chat/runs/{run_of(first)}")).json()
            assert status["state"] == "failed"

            # The next turn goes on from it.
            after = await stream(
                http,
                "GET",
                f"{c.url}/api/chat/stream",
                params={"message": "count to 3", "sessionId": "pg-lost"},
            )
            assert after.data[-1]["historyLength"] == 4


async def test_postgresql_stopped_mid_turn_is_reported_refused_and_recovered(
    own_postgres: PostgresServer,
) -> None:
    # One instance, its runs in the process (no --runs): the store alone is shared state.
    args = ("--model", "scripted:20", "--store", own_postgres.url)
    with server_process(*args, env=ENV) as a:
        async with httpx.AsyncClient(base_url=a.url, timeout=30) as http:
            assert (await http.get("/api/health")).status_code == 200
            params = {"message": "count to 40", "sessionId": "pg-outage"}
            running = asyncio.create_task(stream(http, "GET", "/api/chat/stream", params=params))
            await asyncio.sleep(0.3)
            own_postgres.stop()
            try:
                started = time.monotonic()
                health = await http.get("/api/health")
                assert health.status_code == 503
                assert health.json()["store"] == {"kind": "postgresql", "ok": False}
                refused = await http.get(
                    "/api/chat/stream", params={"message": "hi", "sessionId": "pg-other"}
                )
                assert refused.status_code == 503
                assert refused.json()["error"]["code"] == "STORE_UNAVAILABLE"
                assert "127.0.0.1" not in refused.text  # where it failed is for the log
                assert time.monotonic() - started < 10  # nothing hangs
                await asyncio.sleep(1.0)  # the running turn ends while the database is down
            finally:
                own_postgres.start()
            # The turn that ended during the outage was stored once the database was back.
            result = await asyncio.wait_for(running, 20)
            assert result.types[-1] == "done"
            assert result.data[-1]["historyLength"] == 2
            await eventually_healthy(http, a.url, within_s=10)
            session = (await http.get("/api/chat/sessions/pg-outage")).json()
            assert [m["content"] for m in session["messages"]] == ["count to 40", counted(40)]
            after = await stream(
                http, "GET", "/api/chat/stream", params={"message": "hi", "sessionId": "pg-other"}
            )
            assert after.types[-1] == "done"
            # Each turn's claim takes a newer token: the next turn in a session is stored.
            params = {"message": "count to 2", "sessionId": "pg-outage"}
            again = await stream(http, "GET", "/api/chat/stream", params=params)
            assert again.data[-1]["historyLength"] == 4


class HeldLink:
    """A loopback relay to one server whose traffic, both ways, can be held and let go.

    Held, whatever an instance sends through it waits in the relay: the way a slow or
    congested link looks to that instance, with nothing lost.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._open = asyncio.Event()
        self._open.set()
        self._relays: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                await self._open.wait()
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(ConnectionError, OSError):
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        relay = asyncio.current_task()
        assert relay is not None
        self._relays.add(relay)
        relay.add_done_callback(self._relays.discard)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def cut(self) -> None:
        """Drop every connection, both ways: each relay then ends by itself."""
        self.release()
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()


@contextlib.asynccontextmanager
async def held_link(target_port: int) -> AsyncIterator[HeldLink]:
    link = HeldLink(target_port)
    server = await asyncio.start_server(link._handle, "127.0.0.1", 0)
    link.port = server.sockets[0].getsockname()[1]
    try:
        yield link
    finally:
        server.close()
        link.cut()
        await server.wait_closed()
        await asyncio.gather(*link._relays, return_exceptions=True)


def via(url: str, port: int) -> str:
    """``url`` with its port replaced."""
    head, _, rest = url.rpartition(":")
    return f"{head}:{port}/{rest.partition('/')[2]}"


async def test_a_redis_stall_past_the_lock_ttl_lets_no_second_writer_into_the_session(
    postgres_instance: PostgresServer, postgres_url: str, own_redis: RedisServer
) -> None:
    # A's turn is being stored when Redis stalls past the lock TTL: the lock expires, and
    # when Redis wakes, B's claim of the session gets there before A's renewal (A's links
    # give it a moment longer, to fix the order a race would otherwise pick). B's turn
    # writes the session; A's write, still under way, names the older token and is refused.
    async with (
        held_link(postgres_instance.port) as a_to_postgres,
        held_link(own_redis.port) as a_to_redis,
    ):
        a_args = instance_args(
            via(postgres_url, a_to_postgres.port), via(own_redis.url, a_to_redis.port)
        )
        b_args = instance_args(postgres_url, own_redis.url)
        with contextlib.ExitStack() as servers:
            # Started off the loop: A reaches PostgreSQL and Redis through the links it runs.
            a = await asyncio.to_thread(servers.enter_context, server_process(*a_args, env=ENV))
            b = await asyncio.to_thread(servers.enter_context, server_process(*b_args, env=ENV))
            async with httpx.AsyncClient(timeout=30) as http:
                params = {"message": "count to 30", "sessionId": "pg-fenced"}
                first = await stream(
                    http, "GET", f"{a.url}/api/chat/stream", params=params, max_events=1
                )
                run_id = run_of(first)
                a_to_postgres.hold()  # A read the session; its write will wait in the link
                on_a = asyncio.create_task(
                    stream(
                        http,
                        "GET",
                        f"{a.url}/api/chat/stream",
                        headers={"Last-Event-ID": f"{run_id}:1"},
                    )
                )
                deadline = time.monotonic() + 10
                while (await http.get(f"{a.url}/api/chat/runs/{run_id}")).json()["lastSeq"] < 30:
                    assert time.monotonic() < deadline, "A's turn never streamed its answer"
                    await asyncio.sleep(0.05)

                a_to_redis.hold()
                own_redis.pause()
                await asyncio.sleep(2.0)  # twice the lock TTL: A's lock expires
                newer = asyncio.create_task(
                    stream(
                        http,
                        "GET",
                        f"{b.url}/api/chat/stream",
                        params={"message": "count to 4", "sessionId": "pg-fenced"},
                    )
                )
                await asyncio.sleep(0.3)  # B's claim waits in the stalled Redis
                own_redis.resume()
                taken = await asyncio.wait_for(newer, 15)
                assert taken.types[-1] == "done"
                assert taken.data[-1]["historyLength"] == 2

                a_to_redis.release()
                a_to_postgres.release()
                lost = await asyncio.wait_for(on_a, 15)
                assert lost.types[-1] == "error"
                assert lost.data[-1]["code"] == "RUN_LOST"
                assert lost.text == counted(30).removeprefix("1 ")  # all of it, after the first

                session = (await http.get(f"{b.url}/api/chat/sessions/pg-fenced")).json()
                assert [m["content"] for m in session["messages"]] == ["count to 4", counted(4)]
                status = (await http.get(f"{b.url}/api/chat/runs/{run_id}")).json()
                assert status["state"] == "failed"


def test_runs_are_shared_through_redis_only() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "chatstream", "serve", "--runs", "postgresql://db/runs"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},  # the message on one line
    )
    assert done.returncode == 2
    assert "unsupported runs URL" in done.stderr
    assert "redis://" in done.stderr
