"""Tools from MCP servers, driven through ``McpServers`` against real servers.

The servers are real processes: ``tests/support/mcp_server.py`` (written with the ``mcp``
SDK) over stdio and over Streamable HTTP on loopback, and
``@modelcontextprotocol/server-everything`` from npm, pinned in
``tests/support/npm_mcp`` and installed on first use with ``npm ci`` (the test fails with
an install hint where Node.js or npm is missing). A tool is called as the agent calls it:
``tool(ctx, args)`` under ``asyncio.timeout(tool.timeout_s)``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from chatstream.errors import ToolError
from chatstream.tools.base import Tool, ToolContext
from chatstream.tools.mcp import McpConfigError, McpServers
from chatstream.tools.mcp.config import HttpTransport, StdioTransport, load_config
from tests.support.mcp_helpers import alive, children, events, everything_server, http_server, stdio
from tests.support.process import serving
from tests.support.server import free_port

# Helpers.


class Progress:
    """A ToolContext whose progress is kept with the time it arrived."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, float | None, float]] = []
        self.ctx: ToolContext[None] = ToolContext(self._sink)

    def _sink(self, message: str, fraction: float | None) -> None:
        self.steps.append((message, fraction, time.monotonic()))


@asynccontextmanager
async def started(servers: dict[str, Any], **options: Any) -> AsyncIterator[McpServers]:
    mcp = McpServers.from_config({"mcpServers": servers}, **options)
    await mcp.start()
    try:
        yield mcp
    finally:
        await mcp.close()


def tools_of(mcp: McpServers) -> dict[str, Tool]:
    return {t.name: t for t in mcp.tools()}


async def call(mcp: McpServers, name: str, args: dict[str, Any], ctx: ToolContext[Any]) -> str:
    """Call as the agent does: under the tool's own time limit."""
    tool = tools_of(mcp)[name]
    assert tool.timeout_s is not None
    async with asyncio.timeout(tool.timeout_s):
        return await tool(ctx, args)


async def until(condition: Callable[[], bool], within: float = 15.0) -> None:
    """Wait for a state that other processes change (nothing to wait on but time)."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.05)


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "server.jsonl"


@pytest.fixture(params=["stdio", "http"])
def transport(request: pytest.FixtureRequest, log: Path) -> Iterator[dict[str, Any]]:
    """The test server's config, over stdio or over Streamable HTTP."""
    if request.param == "stdio":
        yield stdio(log)
    else:
        with http_server(log) as url:
            yield {"url": url}


# The config.


def write(tmp_path: Path, config: object) -> Path:
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def test_config_reads_both_transports_and_fills_variables_from_the_environment(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path,
        {
            "mcpServers": {
                "files": {
                    "command": "npx",
                    "args": ["-y", "server", "${ROOT}"],
                    "env": {"TOKEN": "${FILES_TOKEN}"},
                    "cwd": "${ROOT}",
                },
                "search": {
                    "url": "https://mcp.example.com/mcp",
                    "headers": {"Authorization": "Bearer ${SEARCH_KEY}"},
                    "approval": ["write"],
                    "tools": ["find", "write"],
                },
                "slow": {"command": "python", "approval": "never", "timeoutS": 120},
                "off": {"command": "python", "enabled": False, "args": ["${UNSET:-x}"]},
            },
            "globalShortcut": "belongs to another client",
        },
    )
    env = {"ROOT": "/srv", "FILES_TOKEN": "t0k", "SEARCH_KEY": "k3y"}
    files, search, slow, off = load_config(path, environ=env, default_timeout_s=7)
    assert files.transport == StdioTransport(
        command="npx", args=("-y", "server", "/srv"), env={"TOKEN": "t0k"}, cwd="/srv"
    )
    assert files.approval == "unless-read-only" and files.timeout_s == 7 and files.tools is None
    assert search.transport == HttpTransport(
        url="https://mcp.example.com/mcp", headers={"Authorization": "Bearer k3y"}
    )
    assert search.needs_approval("write", read_only=True)
    assert not search.needs_approval("find", read_only=False)
    assert search.tools == frozenset({"find", "write"})
    assert slow.timeout_s == 120 and not slow.needs_approval("x", read_only=False)
    assert not off.enabled and off.transport == StdioTransport(command="python", args=("x",))
    servers = McpServers.from_file(path, environ=env)
    assert set(servers.status()) == {"files", "search", "slow"}  # "off" is not started


def test_a_missing_variable_stops_start_up_with_its_name(tmp_path: Path) -> None:
    path = write(tmp_path, {"mcpServers": {"s": {"url": "http://x/mcp?k=${NOPE_KEY}"}}})
    with pytest.raises(
        McpConfigError, match=r'server "s": "url" uses \$\{NOPE_KEY\}, which is not set'
    ):
        McpServers.from_file(path, environ={})


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"command": "x", "autoApprove": []}, 'unknown key "autoApprove"'),
        ({"command": "x", "args": "a b"}, '"args" must be a list of strings'),
        ({"command": 3}, '"command" must be a string'),
        ({"command": "x", "env": {"A": 1}}, '"env" must be an object of strings'),
        ({"command": "x", "timeoutS": 0}, '"timeoutS" must be a number of seconds above 0'),
        ({"command": "x", "timeoutS": True}, '"timeoutS" must be a number'),
        ({"command": "x", "enabled": "yes"}, '"enabled" must be true or false'),
        ({"command": "x", "approval": "sometimes"}, '"approval" must be "always", "never"'),
        ({"command": "x", "tools": "echo"}, '"tools" must be a list of strings'),
        ({"command": "x", "headers": {}}, '"headers" does not apply to a stdio server'),
        ({"url": "http://h/mcp", "cwd": "/"}, '"cwd" does not apply to an HTTP server'),
        ({"url": "ftp://h/mcp"}, '"url" must be an http:// or https:// URL, not "ftp://h/mcp"'),
        ({"args": []}, 'give either "command" (stdio) or "url" (HTTP)'),
        ({"command": "x", "url": "http://h/mcp"}, 'give either "command"'),
        ({"url": "http://h/sse", "type": "sse"}, "the SSE transport is not supported"),
        ("npx server", "expected an object"),
    ],
)
def test_wrong_keys_and_types_are_refused_naming_file_server_and_key(
    tmp_path: Path, entry: object, message: str
) -> None:
    path = write(tmp_path, {"mcpServers": {"files": entry}})
    with pytest.raises(McpConfigError) as refused:
        McpServers.from_file(path)
    assert str(refused.value).startswith(f'{path}: server "files": ')
    assert message in str(refused.value)


def test_a_config_that_is_not_json_or_not_there_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "mcp.json"
    path.write_text('{"mcpServers": {"a": {"command": "x",}}}', encoding="utf-8")
    with pytest.raises(McpConfigError, match=rf"{path} is not JSON: .* line 1 column"):
        McpServers.from_file(path)
    with pytest.raises(McpConfigError, match=r"cannot read the MCP config .*absent\.json"):
        McpServers.from_file(tmp_path / "absent.json")
    path.write_text('{"servers": {}}', encoding="utf-8")
    with pytest.raises(McpConfigError, match='expected an object with "mcpServers"'):
        McpServers.from_file(path)


def test_two_servers_whose_tools_would_share_a_prefix_are_refused() -> None:
    with pytest.raises(McpConfigError, match=r"'my.files' and 'my_files'.*my_files__<tool>"):
        McpServers.from_config(
            {"mcpServers": {"my.files": {"command": "a"}, "my_files": {"command": "b"}}}
        )


# A server's tools.


async def test_tools_are_offered_as_server_tool_with_schema_source_limit_and_approval(
    log: Path,
) -> None:
    servers = {
        "test": stdio(log, timeoutS=3.5),
        "picky.one": stdio(log, approval=["echo"], tools=["echo", "write_note", "absent"]),
    }
    async with started(servers, default_timeout_s=9) as mcp:
        tools = tools_of(mcp)
        assert {n for n in tools if n.startswith("picky_one__")} == {
            "picky_one__echo",
            "picky_one__write_note",
        }
        echo = tools["test__echo"]
        assert echo.description == "Say the text back."
        assert echo.parameters["properties"]["text"]["type"] == "string"
        assert echo.parameters["required"] == ["text"]
        assert echo.source == "mcp:test" and echo.validator is None
        assert echo.timeout_s == 3.5 and tools["picky_one__echo"].timeout_s == 9
        # unless-read-only (the default): echo is annotated read-only, write_note is not.
        assert not echo.approval and tools["test__write_note"].approval
        # A list: exactly the tools it names.
        assert tools["picky_one__echo"].approval and not tools["picky_one__write_note"].approval
        assert await call(mcp, "test__echo", {"text": "hi"}, Progress().ctx) == "hi"
        # An argument named like the context the tool is handed goes to the server too.
        with_ctx = {"text": "hi", "ctx": "theirs"}
        assert await call(mcp, "test__echo", with_ctx, Progress().ctx) == "hi"
        assert mcp.status() == {
            "test": {"status": "ready", "tools": 13},
            "picky.one": {"status": "ready", "tools": 2},
        }


async def test_progress_arrives_while_the_call_runs(transport: dict[str, Any]) -> None:
    async with started({"test": transport}) as mcp:
        progress = Progress()
        begun = time.monotonic()
        result = await call(mcp, "test__count", {"steps": 4, "delay": 0.3}, progress.ctx)
        ended = time.monotonic()
    assert result == "counted to 4"
    assert [(m, f) for m, f, _ in progress.steps] == [
        ("counted 1", 0.25),
        ("counted 2", 0.5),
        ("counted 3", 0.75),
        ("counted 4", 1.0),
    ]
    times = [t for _, _, t in progress.steps]
    # Each step as it happens: the first well before the result, then about 0.3 s apart.
    assert times[0] - begun < 0.9 and ended - times[0] > 0.6
    assert all(b - a > 0.15 for a, b in pairwise(times))


async def test_progress_without_a_total_or_message_says_the_step(log: Path) -> None:
    async with started({"test": stdio(log)}) as mcp:
        progress = Progress()
        args = {"steps": 2, "delay": 0.05, "total": False}
        await call(mcp, "test__count", args, progress.ctx)
    assert [(m, f) for m, f, _ in progress.steps] == [("step 1", None), ("step 2", None)]


async def test_results_become_text_with_placeholders_and_errors_become_tool_errors(
    transport: dict[str, Any],
) -> None:
    ctx = Progress().ctx
    async with started({"test": transport}) as mcp:
        assert await call(mcp, "test__media", {}, ctx) == "\n".join(
            [
                "here is everything",
                "[image: image/png, 70 B]",
                "[audio: audio/wav, 2.0 kB]",
                "[resource: file:///notes.txt, text/plain, 6 B]",
                "[resource: file:///data.bin, application/octet-stream, 1.5 kB]",
                "[resource link: https://example.com/report.pdf, report]",
            ]
        )
        assert await call(mcp, "test__structured", {}, ctx) == '{"temperature":21.5,"unit":"C"}'
        with pytest.raises(ToolError, match=r"^no such city$"):
            await call(mcp, "test__fail", {"reason": "no such city"}, ctx)


async def test_a_malformed_result_is_a_tool_error_and_the_server_stays_usable(
    transport: dict[str, Any],
) -> None:
    ctx = Progress().ctx
    async with started({"test": transport}) as mcp:
        with pytest.raises(ToolError, match=r"'test' sent a malformed result for malformed$"):
            await call(mcp, "test__malformed", {}, ctx)
        assert await call(mcp, "test__echo", {"text": "still here"}, ctx) == "still here"
        assert mcp.status()["test"]["status"] == "ready"


async def test_a_server_refusing_a_call_is_a_tool_error(log: Path) -> None:
    async with started({"test": stdio(log)}) as mcp:
        with pytest.raises(ToolError) as refused:
            await call(mcp, "test__refuse", {}, Progress().ctx)
    assert refused.value.message == "the MCP server 'test' refused the call: refused on purpose"


async def test_a_crash_mid_call_is_a_tool_error_then_the_server_is_restarted(log: Path) -> None:
    ctx = Progress().ctx
    async with started({"test": stdio(log), "other": stdio(log)}) as mcp:
        with pytest.raises(ToolError, match="'test' went away during the call \\(reconnecting"):
            await call(mcp, "test__crash", {}, ctx)
        # Down: failed, its tools absent, the other server untouched.
        await until(lambda: mcp.status()["test"]["status"] != "ready")
        assert mcp.status()["test"] == {
            "status": "failed",
            "tools": 0,
            "error": "the connection ended (did the server exit?)",
        }
        assert not any(n.startswith("test__") for n in tools_of(mcp))
        assert mcp.status()["other"]["status"] == "ready"
        # Back, as a new process, and a new call works.
        await until(lambda: mcp.status()["test"]["status"] == "ready")
        assert await call(mcp, "test__echo", {"text": "back"}, ctx) == "back"
    starts = [e["pid"] for e in events(log, "start")]
    crashed = events(log, "crash")[0]["pid"]
    assert len(starts) == 3 and starts.count(crashed) == 1


async def test_a_hung_call_runs_into_the_server_timeout_and_the_server_hears_cancelled(
    transport: dict[str, Any], log: Path
) -> None:
    ctx = Progress().ctx
    async with started({"test": {**transport, "timeoutS": 0.5}}) as mcp:
        begun = time.monotonic()
        with pytest.raises(TimeoutError):
            await call(mcp, "test__hang", {"tag": "slow"}, ctx)
        assert 0.5 <= time.monotonic() - begun < 2
        await until(lambda: bool(events(log, "cancelled")), within=5)
        assert events(log, "cancelled")[0]["tag"] == "slow"
        # The session is fine after it.
        assert await call(mcp, "test__echo", {"text": "next"}, ctx) == "next"


async def test_a_cancelled_call_sends_cancelled_to_the_server(
    transport: dict[str, Any], log: Path
) -> None:
    ctx = Progress().ctx
    async with started({"test": transport}) as mcp:
        hang = asyncio.create_task(call(mcp, "test__hang", {"tag": "stop"}, ctx))
        await until(lambda: bool(events(log, "hang")), within=5)
        hang.cancel()
        with pytest.raises(asyncio.CancelledError):
            await hang
        await until(lambda: bool(events(log, "cancelled")), within=5)
        assert [e["tag"] for e in events(log, "cancelled")] == ["stop"]
        assert await call(mcp, "test__echo", {"text": "next"}, ctx) == "next"


async def test_tools_list_changed_refreshes_the_tools(transport: dict[str, Any]) -> None:
    async with started({"test": transport}) as mcp:
        assert "test__grown" not in tools_of(mcp)
        assert await call(mcp, "test__grow", {}, Progress().ctx) == "grown"
        await until(lambda: "test__grown" in tools_of(mcp), within=5)
        assert await call(mcp, "test__grown", {}, Progress().ctx) == "I am new"
        assert mcp.status()["test"]["tools"] == 14


# Servers that fail.


async def test_a_command_that_does_not_exist_fails_alone(log: Path) -> None:
    servers = {"gone": {"command": "chatstream-no-such-mcp-server"}, "test": stdio(log)}
    async with started(servers) as mcp:
        assert mcp.status() == {
            "gone": {
                "status": "failed",
                "tools": 0,
                "error": "cannot run 'chatstream-no-such-mcp-server': No such file or directory",
            },
            "test": {"status": "ready", "tools": 13},
        }
        assert {t.source for t in mcp.tools()} == {"mcp:test"}


async def test_a_server_that_exits_at_once_is_failed_and_retried(tmp_path: Path) -> None:
    marker = tmp_path / "runs"
    script = f"open({str(marker)!r}, 'a').write('x'); raise SystemExit(1)"
    async with started({"broken": {"command": sys.executable, "args": ["-c", script]}}) as mcp:
        status = mcp.status()["broken"]
        assert status["status"] == "failed" and "did it exit?" in str(status["error"])
        # Retried with backoff: 0.5 s, then 1 s later.
        await until(lambda: marker.exists() and len(marker.read_text()) >= 3, within=10)


async def test_an_http_server_answering_401_is_failed_and_says_so(log: Path) -> None:
    with http_server(log, token="right") as url:
        servers = {
            "locked": {"url": url, "headers": {"Authorization": "Bearer ${KEY}"}},
            "open": {"url": url, "headers": {"Authorization": "Bearer right"}},
        }
        async with started(servers, environ={"KEY": "wrong"}) as mcp:
            assert mcp.status() == {
                "locked": {
                    "status": "failed",
                    "tools": 0,
                    "error": f"{url} answered HTTP 401 Unauthorized: "
                    "check the credentials in its headers",
                },
                "open": {"status": "ready", "tools": 13},
            }


async def test_an_http_server_that_dies_mid_call_is_a_tool_error_and_is_reconnected(
    log: Path,
) -> None:
    port = free_port()
    ctx = Progress().ctx
    with http_server(log, port=port) as url:
        mcp = McpServers.from_config({"mcpServers": {"web": {"url": url}}})
        await mcp.start()
        try:
            with pytest.raises(ToolError, match="'web' went away during the call \\(reconnecting"):
                await call(mcp, "web__crash", {}, ctx)
            await until(lambda: mcp.status()["web"]["status"] == "failed")
            assert f"cannot reach {url}" in str(mcp.status()["web"]["error"])
            assert mcp.tools() == []
        except BaseException:
            await mcp.close()
            raise
    try:
        with http_server(log, port=port):
            await until(lambda: mcp.status()["web"]["status"] == "ready", within=20)
            assert await call(mcp, "web__echo", {"text": "again"}, ctx) == "again"
    finally:
        await mcp.close()


# Starting and stopping.


async def test_servers_start_in_parallel(log: Path) -> None:
    slow = {"env": {"MCP_TEST_START_DELAY": "4"}}
    begun = time.monotonic()
    async with started({"a": stdio(log, **slow), "b": stdio(log, **slow)}) as mcp:
        took = time.monotonic() - begun
        assert {s["status"] for s in mcp.status().values()} == {"ready"}
    # One after the other would take over 8 s: the two delays overlapped.
    assert 4 <= took < 8, took


async def test_start_waits_a_bounded_time_and_a_slow_server_goes_on_starting(log: Path) -> None:
    mcp = McpServers.from_config(
        {"mcpServers": {"slow": stdio(log, env={"MCP_TEST_START_DELAY": "2"})}},
        start_wait_s=0.3,
    )
    try:
        begun = time.monotonic()
        await mcp.start()
        assert time.monotonic() - begun < 1
        assert mcp.status() == {"slow": {"status": "starting", "tools": 0}}
        assert mcp.tools() == []
        await until(lambda: mcp.status()["slow"]["status"] == "ready")
    finally:
        await mcp.close()


async def test_close_leaves_no_child_process(log: Path) -> None:
    before = children()
    async with started({"a": stdio(log), "b": stdio(log)}) as mcp:
        pids = {e["pid"] for e in events(log, "start")}
        assert len(pids) == 2 and all(alive(p) for p in pids)
        assert pids <= children() - before
        # One call in flight while it closes.
        hang = asyncio.create_task(call(mcp, "a__hang", {}, Progress().ctx))
        await until(lambda: bool(events(log, "hang")))
    assert not any(alive(p) for p in pids)
    assert children() - before == set()
    with pytest.raises(ToolError, match="'a' was stopped during the call"):
        await hang


# A real server from npm.


async def test_server_everything_from_npm_sums_and_reports_progress_as_it_runs() -> None:
    node, *argv = everything_server()
    async with started({"everything": {"command": node, "args": argv}}) as mcp:
        tools = tools_of(mcp)
        assert {"everything__get-sum", "everything__trigger-long-running-operation"} <= set(tools)
        assert not tools["everything__get-sum"].approval  # annotated read-only
        ctx = Progress()
        summed = await call(mcp, "everything__get-sum", {"a": 2, "b": 40}, ctx.ctx)
        assert "42" in summed
        begun = time.monotonic()
        args = {"duration": 1.5, "steps": 3}
        done = await call(mcp, "everything__trigger-long-running-operation", args, ctx.ctx)
        ended = time.monotonic()
    assert "Long running operation completed" in done
    assert [(m, f) for m, f, _ in ctx.steps] == [
        ("step 1 of 3", pytest.approx(1 / 3)),
        ("step 2 of 3", pytest.approx(2 / 3)),
        ("step 3 of 3", 1.0),
    ]
    # One step every 0.5 s, each as it happens, not all at the end.
    times = [t for _, _, t in ctx.steps]
    assert 0.3 < times[0] - begun < 1.0
    assert all(0.3 < b - a < 0.9 for a, b in pairwise(times))
    assert ended - times[0] > 0.8


@contextmanager
def everything_over_http(port: int) -> Iterator[str]:
    """server-everything's Streamable HTTP transport (sessions kept in memory) on ``port``."""
    node, entry, _ = everything_server()
    env = {**os.environ, "PORT": str(port)}
    process = subprocess.Popen(
        [node, entry, "streamableHttp"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with serving(process, port):
        yield f"http://127.0.0.1:{port}/mcp"


async def test_an_http_server_that_restarted_between_calls_gets_a_new_session() -> None:
    port = free_port()
    ctx = Progress().ctx
    mcp = McpServers.from_config({"mcpServers": {"web": {"url": f"http://127.0.0.1:{port}/mcp"}}})
    try:
        with everything_over_http(port):
            await mcp.start()
            assert "5" in await call(mcp, "web__get-sum", {"a": 2, "b": 3}, ctx)
        with everything_over_http(port):
            # The new process does not know the old session: the first request that says
            # so (the call, or the event stream reconnecting first) makes a new one.
            try:
                await call(mcp, "web__get-sum", {"a": 2, "b": 3}, ctx)
            except ToolError as exc:
                assert "'web' went away during the call" in exc.message
            await until(lambda: mcp.status()["web"]["status"] == "ready")
            assert "7" in await call(mcp, "web__get-sum", {"a": 3, "b": 4}, ctx)
    finally:
        await mcp.close()
