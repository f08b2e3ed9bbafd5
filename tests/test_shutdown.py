"""SIGTERM drains: running turns finish up to a deadline, the rest end with SHUTTING_DOWN."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx

from tests.support.process import server_process
from tests.support.sse import stream


async def test_sigterm_lets_short_turns_finish_and_cuts_long_ones(tmp_path: Path) -> None:
    db = tmp_path / "chat.db"
    args = ("--model", "scripted:20", "--store", f"sqlite:///{db}")
    env = {"CHATSTREAM_SHUTDOWN_GRACE_S": "1.0", "CHATSTREAM_RETRY_MS": "1500"}
    with server_process(*args, env=env) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            short = asyncio.create_task(
                stream(
                    http,
                    "GET",
                    "/api/chat/stream",
                    params={"message": "count to 30", "sessionId": "short"},
                )
            )
            long = asyncio.create_task(
                stream(
                    http,
                    "GET",
                    "/api/chat/stream",
                    params={"message": "count to 100000", "sessionId": "long"},
                )
            )
            await asyncio.sleep(0.3)
            server.terminate()
            short_result = await asyncio.wait_for(short, 10)
            long_result = await asyncio.wait_for(long, 10)
        assert short_result.types[-1] == "done"
        assert long_result.types[-1] == "error"
        ending = long_result.frames[-1]
        assert long_result.data[-1]["code"] == "SHUTTING_DOWN"
        assert ending.retry == 1500 or long_result.frames[0].retry == 1500
        # uvicorn re-raises the signal once it has shut down cleanly.
        assert server.process.wait(15) in (0, -signal.SIGTERM)
        log = server.output()
        assert "draining" in log

    # Nothing stored is lost: a new process on the same file has both turns.
    with server_process(*args) as again:
        async with httpx.AsyncClient(base_url=again.url) as http:
            long_session = (await http.get("/api/chat/sessions/long")).json()
            short_session = (await http.get("/api/chat/sessions/short")).json()
    assert short_session["historyLength"] == 2
    answer = long_session["messages"][-1]
    assert answer["interrupted"] is True
    assert answer["content"] == long_result.text
