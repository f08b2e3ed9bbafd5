"""MCP tools driven through chatstream: ``chatstream serve --mcp`` and its HTTP API.

One ``chatstream serve`` process (the scripted model, whose message ``call <tool> {json}``
makes the agent call that tool) runs for the module with five MCP servers: the pinned
``@modelcontextprotocol/server-everything`` from npm, the suite's own SDK server twice
over stdio (one to crash, one to hang and misbehave), a command that does not exist, and
an HTTP server that answers 401 to the key it is given. What the tests assert is what a
client of chatstream sees: ``/api/tools``, ``/api/health`` and the events of a turn.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from chatstream.events import FrameDecoder
from tests.support.mcp_helpers import (
    alive,
    descendants,
    events,
    everything_server,
    http_server,
    stdio,
)
from tests.support.process import server_process

# The test server's tools, in the order it lists them.
TEST_TOOLS = [
    "echo",
    "add",
    "write_note",
    "count",
    "sleep",
    "crash",
    "hang",
    "malformed",
    "fail",
    "refuse",
    "media",
    "structured",
    "grow",
]
# What server-everything 2026.8.31 offers a client that has no roots, sampling or
# elicitation to give (its tools that need them are left out).
EVERYTHING_TOOLS = [
    "echo",
    "get-annotated-message",
    "get-env",
    "get-resource-links",
    "get-resource-reference",
    "get-structured-content",
    "get-sum",
    "get-tiny-image",
    "gzip-file-as-resource",
    "toggle-simulated-logging",
    "toggle-subscriber-updates",
    "trigger-long-running-operation",
    "simulate-research-query",
]
GONE = "chatstream-no-such-mcp-server"
HANG_TIMEOUT_S = 1.5
# How long the crashing server takes to start again (its first start is quick): its time
# down, the backoff and then this, is what a client sees it failed.
RESTART_DELAY_S = 3.0


@dataclass
class Served:
    url: str
    logs: Path
    locked_url: str

    def log(self, server: str) -> Path:
        return self.logs / f"{server}.jsonl"


def write_config(path: Path, servers: dict[str, Any]) -> Path:
    path.write_text(json.dumps({"mcpServers": servers}), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """``chatstream serve --mcp`` with every kind of server, for the whole module."""
    logs = tmp_path_factory.mktemp("mcp-served")
    node, *argv = everything_server()
    # approval "never" for the suite's servers: these tests are about the calls, not about
    # asking for them (server-everything keeps the default, to show its tools' approvals).
    with http_server(logs / "locked.jsonl", token="right") as locked_url:
        config = write_config(
            logs / "mcp.json",
            {
                "everything": {"command": node, "args": argv},
                "test": stdio(logs / "test.jsonl", approval="never", timeoutS=HANG_TIMEOUT_S),
                "crashy": stdio(
                    logs / "crashy.jsonl",
                    approval="never",
                    env={"MCP_TEST_RESTART_DELAY": str(RESTART_DELAY_S)},
                ),
                "gone": {"command": GONE},
                "locked": {"url": locked_url, "headers": {"Authorization": "Bearer wrong"}},
            },
        )
        args = ("--model", "scripted", "--mcp", str(config), "--store", "sqlite:///:memory:")
        with server_process(*args) as server:
            yield Served(server.url, logs, locked_url)


@pytest.fixture
async def http(served: Served) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
        yield client


@dataclass
class Turn:
    """A streamed turn: each event's type and data, with the time it arrived."""

    sent: float  # when the request went out
    events: list[tuple[str, dict[str, Any], float]]

    @property
    def types(self) -> list[str]:
        return [kind for kind, _, _ in self.events]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [data for k, data, _ in self.events if k == kind]

    def times(self, kind: str) -> list[float]:
        return [at for k, _, at in self.events if k == kind]

    @property
    def result(self) -> dict[str, Any]:
        (result,) = self.of("tool_result")
        return result

    @property
    def text(self) -> str:
        return "".join(d["content"] for d in self.of("token"))


async def turn(http: httpx.AsyncClient, message: str) -> Turn:
    """``POST /api/chat/stream`` read to its end, each event timed as it arrives."""
    decoder = FrameDecoder()
    timed: list[tuple[str, dict[str, Any], float]] = []
    sent = time.monotonic()
    async with http.stream("POST", "/api/chat/stream", json={"message": message}) as response:
        assert response.status_code == 200, await response.aread()
        async for chunk in response.aiter_raw():
            arrived = time.monotonic()
            for frame in decoder.feed(chunk):
                if frame.event:
                    timed.append((frame.event, orjson.loads(frame.data), arrived))
    return Turn(sent, timed)


def answered(turn: Turn) -> None:
    """The turn went on after its one tool call: the model answered, and it is done."""
    assert turn.types == ["tool_call", "tool_result", *["token"] * (len(turn.types) - 3), "done"]
    assert len(turn.types) > 3
    assert turn.result["id"] == turn.of("tool_call")[0]["id"]


async def health(http: httpx.AsyncClient) -> dict[str, Any]:
    response = await http.get("/api/health")
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    assert body["status"] == "ok"  # a server that is down is not chatstream failing
    return body


async def tool_names(http: httpx.AsyncClient) -> list[str]:
    return [t["name"] for t in (await http.get("/api/tools")).json()["tools"]]


async def until(check: Callable[[], Awaitable[bool]], within: float = 20.0) -> None:
    """Wait for a state that other processes change (nothing to wait on but time)."""
    async with asyncio.timeout(within):
        while not await check():  # noqa: ASYNC110
            await asyncio.sleep(0.05)


# A real server from npm.


async def test_server_everything_tools_are_listed_under_its_name_with_its_schema(
    http: httpx.AsyncClient,
) -> None:
    listed = (await http.get("/api/tools")).json()["tools"]
    mine = [t for t in listed if t["source"] == "mcp:everything"]
    assert [t["name"] for t in mine] == [f"everything__{name}" for name in EVERYTHING_TOOLS]
    by_name = {t["name"]: t for t in mine}
    get_sum = by_name["everything__get-sum"]
    assert get_sum["description"] == "Returns the sum of two numbers"
    assert get_sum["parameters"]["properties"]["a"]["type"] == "number"
    assert set(get_sum["parameters"]["required"]) == {"a", "b"}
    # Approval unless read-only (the default): get-sum is annotated read-only, gzip is not.
    assert get_sum["approval"] is False
    assert by_name["everything__gzip-file-as-resource"]["approval"] is True


async def test_server_everything_get_sum_answers_through_a_turn(http: httpx.AsyncClient) -> None:
    summed = await turn(http, 'call everything__get-sum {"a": 2, "b": 40}')
    answered(summed)
    assert summed.of("tool_call")[0] == {
        "id": summed.result["id"],
        "tool": "everything__get-sum",
        "args": {"a": 2, "b": 40},
    }
    assert summed.result == {
        "id": summed.result["id"],
        "tool": "everything__get-sum",
        "result": "The sum of 2 and 40 is 42.",
        "isError": False,
    }
    assert summed.text == "Here is what I found: The sum of 2 and 40 is 42."


async def test_a_long_operation_streams_its_progress_while_it_runs(
    http: httpx.AsyncClient,
) -> None:
    # A step every 0.5 s; the last one and the result come together.
    args = {"duration": 2, "steps": 4}
    long = await turn(http, f"call everything__trigger-long-running-operation {json.dumps(args)}")
    assert long.types[:6] == ["tool_call", *["tool_progress"] * 4, "tool_result"]
    assert long.types[-1] == "done"
    call_id = long.of("tool_call")[0]["id"]
    assert long.of("tool_progress") == [
        {
            "id": call_id,
            "tool": "everything__trigger-long-running-operation",
            "message": f"step {step} of 4",
            "progress": step / 4,
        }
        for step in (1, 2, 3, 4)
    ]
    assert (
        long.result["result"] == "Long running operation completed. Duration: 2 seconds, Steps: 4."
    )
    assert not long.result["isError"]
    # Each step reaches the client as it happens, not all with the result. The real gaps
    # are 0.5 s a step: the bounds leave room for a slow machine (only a stall of most of
    # a second in this process could break them).
    steps = long.times("tool_progress")
    (ended,) = long.times("tool_result")
    assert steps[0] - long.sent >= 0.4
    assert steps[2] - steps[0] > 0.5
    assert ended - steps[0] > 0.75


# Servers that fail.


async def test_health_shows_each_server_and_the_failed_ones_say_why(
    http: httpx.AsyncClient, served: Served
) -> None:
    mcp = (await health(http))["mcp"]
    assert mcp["everything"] == {"status": "ready", "tools": len(EVERYTHING_TOOLS)}
    assert mcp["test"] == {"status": "ready", "tools": len(TEST_TOOLS)}
    assert mcp["gone"] == {
        "status": "failed",
        "tools": 0,
        "error": f"cannot run {GONE!r}: No such file or directory",
    }
    assert mcp["locked"] == {
        "status": "failed",
        "tools": 0,
        "error": f"{served.locked_url} answered HTTP 401 Unauthorized: "
        "check the credentials in its headers",
    }


async def test_the_tools_of_failed_servers_are_absent_and_chats_still_work(
    http: httpx.AsyncClient,
) -> None:
    names = await tool_names(http)
    assert [n for n in names if n.startswith("test__")] == [f"test__{t}" for t in TEST_TOOLS]
    assert not [n for n in names if n.startswith(("gone__", "locked__"))]
    assert names[:4] == ["get_weather", "convert_temperature", "calculate", "get_current_time"]
    echoed = await turn(http, 'call test__echo {"text": "still serving"}')
    answered(echoed)
    assert echoed.result["result"] == "still serving" and not echoed.result["isError"]
    # Asked for a tool of a server that is down, the model hears that there is none.
    absent = await turn(http, 'call locked__echo {"text": "hi"}')
    answered(absent)
    assert absent.result["isError"] is True
    assert absent.result["result"] == "There is no tool called 'locked__echo'."
    chat = await turn(http, "hello")
    assert chat.types[-1] == "done" and "scripted model" in chat.text


async def test_a_crash_mid_call_is_an_error_result_and_the_server_comes_back(
    http: httpx.AsyncClient, served: Served
) -> None:
    crashed = await turn(http, 'call crashy__crash {"delay": 0.1}')
    answered(crashed)
    went_away = "the MCP server 'crashy' went away during the call (reconnecting to it)"
    assert crashed.result == {
        "id": crashed.result["id"],
        "tool": "crashy__crash",
        "result": went_away,
        "isError": True,
    }
    assert crashed.text == f"Here is what I found: crashy__crash failed: {went_away}"
    # While it starts again (the backoff, then its slow restart), health says so and
    # its tools are gone; the other servers go on.
    down = (await health(http))["mcp"]
    assert down["crashy"] == {
        "status": "failed",
        "tools": 0,
        "error": "the connection ended (did the server exit?)",
    }
    assert down["test"]["status"] == "ready"
    assert not [n for n in await tool_names(http) if n.startswith("crashy__")]

    async def back() -> bool:
        return bool((await health(http))["mcp"]["crashy"]["status"] == "ready")

    await until(back)
    starts = [e["pid"] for e in events(served.log("crashy"), "start")]
    (crash,) = events(served.log("crashy"), "crash")
    assert len(starts) == 2 and starts[0] == crash["pid"] != starts[1]
    assert not alive(crash["pid"])
    again = await turn(http, 'call crashy__echo {"text": "back again"}')
    answered(again)
    assert again.result["result"] == "back again" and not again.result["isError"]


async def test_a_hung_call_times_out_per_server_and_the_turn_goes_on(
    http: httpx.AsyncClient, served: Served
) -> None:
    hung = await turn(http, 'call test__hang {"tag": "served"}')
    answered(hung)
    timed_out = f"test__hang timed out after {HANG_TIMEOUT_S:g} s."
    assert hung.result["result"] == timed_out and hung.result["isError"] is True
    (ended,) = hung.times("tool_result")
    assert ended - hung.sent >= HANG_TIMEOUT_S
    # The server was told the call is off, and goes on serving.
    log = served.log("test")

    async def cancelled() -> bool:
        return any(e["tag"] == "served" for e in events(log, "cancelled"))

    await until(cancelled, within=5)
    echoed = await turn(http, 'call test__echo {"text": "next"}')
    assert echoed.result["result"] == "next"


async def test_a_malformed_result_is_an_error_result_and_the_server_stays_ready(
    http: httpx.AsyncClient,
) -> None:
    broken = await turn(http, "call test__malformed {}")
    answered(broken)
    assert broken.result == {
        "id": broken.result["id"],
        "tool": "test__malformed",
        "result": "the MCP server 'test' sent a malformed result for malformed",
        "isError": True,
    }
    assert (await health(http))["mcp"]["test"] == {"status": "ready", "tools": len(TEST_TOOLS)}
    added = await turn(http, 'call test__add {"a": 2, "b": 3}')
    assert added.result["result"] == "5" and not added.result["isError"]


async def test_an_error_result_from_the_server_keeps_is_error(http: httpx.AsyncClient) -> None:
    failed = await turn(http, 'call test__fail {"reason": "no such city"}')
    answered(failed)
    assert failed.result["result"] == "no such city" and failed.result["isError"] is True


# Shutdown.


async def test_stopping_serve_leaves_no_mcp_process_behind(tmp_path: Path) -> None:
    node, *argv = everything_server()
    hanging_log, stubborn_log = tmp_path / "hanging.jsonl", tmp_path / "stubborn.jsonl"
    config = write_config(
        tmp_path / "mcp.json",
        {
            "hanging": stdio(hanging_log, approval="never", timeoutS=60),
            # Deaf to its stdin closing and to SIGTERM, with a child of its own.
            "stubborn": stdio(stubborn_log, env={"MCP_TEST_STUBBORN": "1"}),
            "everything": {"command": node, "args": argv},
        },
    )
    args = ("--model", "scripted", "--mcp", str(config), "--store", "sqlite:///:memory:")
    env = {"CHATSTREAM_SHUTDOWN_GRACE_S": "1.0"}
    with server_process(*args, env=env) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            assert {s["status"] for s in (await health(http))["mcp"].values()} == {"ready"}
            # A call in flight when it stops.
            hang = asyncio.create_task(turn(http, "call hanging__hang {}"))

            async def hanging() -> bool:
                return bool(events(hanging_log, "hang"))

            await until(hanging, within=10)
            below = descendants(server.process.pid)
            servers = {
                e["pid"] for log in (hanging_log, stubborn_log) for e in events(log, "start")
            }
            (child,) = [e["child"] for e in events(stubborn_log, "child")]
            assert len(servers) == 2 and servers | {child} <= below
            assert len(below) >= 4  # and server-everything's node
            server.terminate()
            cut = await asyncio.wait_for(hang, 15)
            assert cut.types == ["tool_call", "error"]
            assert cut.of("error")[0]["code"] == "SHUTTING_DOWN"
        # uvicorn re-raises the signal once it has shut down cleanly.
        assert server.process.wait(30) in (0, -signal.SIGTERM)
        left = {pid for pid in below if alive(pid)}
        for pid in left:  # not to leave them to the rest of the suite either
            os.kill(pid, signal.SIGKILL)
        assert left == set(), server.output()
