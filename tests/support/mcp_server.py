"""An MCP server for the test suite, written with the official ``mcp`` SDK.

Run it over stdio (``python tests/support/mcp_server.py``) or over Streamable HTTP on
loopback (``... --http PORT [--token SECRET]``: with a token, a request without
``Authorization: Bearer SECRET`` is answered 401, as a server behind an API key does).

Its tools each show one behaviour a client must handle: progress with and without a
total or message, a slow call, a process that dies mid-call, a call that never ends, a
result that breaks the protocol, every kind of content, ``isError``, and a tool list
that changes while connected. What the server saw (starts, calls cancelled by the
client) goes, one JSON object a line, to the file named by ``MCP_TEST_LOG`` so a test
can assert it; ``MCP_TEST_START_DELAY`` makes it slow to start, and
``MCP_TEST_RESTART_DELAY`` slow to start again (when that log already holds a start:
a client restarting it after a crash stays without it that long, a first start is quick).
``MCP_TEST_STUBBORN`` makes it a server that will not stop: it ignores SIGTERM and the
end of its stdin, and runs a child process of its own (recorded as ``child``), as a
server wrapping another program does; only killing its process tree ends both.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import anyio
import mcp_types as types
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.shared.exceptions import MCPError

READ_ONLY = types.ToolAnnotations(read_only_hint=True)
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


def record(event: str, **fields: Any) -> None:
    """Append what the server saw to ``MCP_TEST_LOG`` (when set)."""
    path = os.environ.get("MCP_TEST_LOG")
    if not path:
        return
    line = json.dumps({"event": event, "pid": os.getpid(), "t": time.time(), **fields})
    with open(path, "a", encoding="utf-8") as log:
        log.write(line + "\n")


def restarted() -> bool:
    """Whether ``MCP_TEST_LOG`` says the server has started before."""
    path = os.environ.get("MCP_TEST_LOG")
    if not path or not os.path.exists(path):
        return False
    with open(path, encoding="utf-8") as log:
        return any(json.loads(line)["event"] == "start" for line in log)


async def malformed_results(
    ctx: ServerRequestContext[Any, Any], call_next: CallNext
) -> HandlerResult:
    """Answer ``malformed`` with a result no MCP client can read (the SDK would refuse it)."""
    params = ctx.params if isinstance(ctx.params, dict) else {}
    if ctx.method == "tools/call" and params.get("name") == "malformed":
        return {"content": [{"type": "text"}], "isError": "no"}
    return await call_next(ctx)


server = MCPServer("chatstream-test", middleware=[malformed_results])


@server.tool(annotations=READ_ONLY)
async def echo(text: str) -> str:
    """Say the text back."""
    return text


@server.tool(annotations=READ_ONLY)
async def add(a: int, b: int) -> str:
    """Add two integers."""
    return str(a + b)


@server.tool()
async def write_note(text: str) -> str:
    """Pretend to write a note (not read-only: a client asks before it runs)."""
    return f"noted: {text}"


@server.tool(annotations=READ_ONLY)
async def count(ctx: Context, steps: int = 3, delay: float = 0.3, total: bool = True) -> str:
    """Count to ``steps``, reporting progress after each step and sleeping ``delay`` s."""
    for step in range(1, steps + 1):
        await anyio.sleep(delay)
        if total:
            await ctx.report_progress(step, steps, f"counted {step}")
        else:
            await ctx.report_progress(step)
    return f"counted to {steps}"


@server.tool(annotations=READ_ONLY)
async def sleep(seconds: float) -> str:
    """Sleep, then say so."""
    await anyio.sleep(seconds)
    return f"slept {seconds:g} s"


@server.tool()
async def crash(delay: float = 0.2) -> str:
    """Die mid-call, as a server with a bug does."""
    await anyio.sleep(delay)
    record("crash")
    os._exit(3)


@server.tool()
async def hang(tag: str = "") -> str:
    """Never answer; record it when the client cancels the call."""
    record("hang", tag=tag)
    try:
        await anyio.sleep_forever()
    except anyio.get_cancelled_exc_class():
        record("cancelled", tag=tag)
        raise
    return "unreachable"


@server.tool(annotations=READ_ONLY)
async def malformed() -> str:
    """Answered by the middleware above with a broken result."""
    return "never sent"


@server.tool(annotations=READ_ONLY)
async def fail(reason: str) -> types.CallToolResult:
    """Fail the way MCP tools do: a result with ``isError``."""
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=reason)], is_error=True
    )


@server.tool(annotations=READ_ONLY)
async def refuse() -> str:
    """Answer with a JSON-RPC error instead of a result."""
    raise MCPError(code=types.INVALID_PARAMS, message="refused on purpose")


@server.tool(annotations=READ_ONLY)
async def media() -> types.CallToolResult:
    """One of each kind of content."""
    return types.CallToolResult(
        content=[
            types.TextContent(type="text", text="here is everything"),
            types.ImageContent(
                type="image", data=base64.b64encode(PNG).decode(), mime_type="image/png"
            ),
            types.AudioContent(
                type="audio", data=base64.b64encode(b"\0" * 2048).decode(), mime_type="audio/wav"
            ),
            types.EmbeddedResource(
                type="resource",
                resource=types.TextResourceContents(
                    uri="file:///notes.txt", mime_type="text/plain", text="a note"
                ),
            ),
            types.EmbeddedResource(
                type="resource",
                resource=types.BlobResourceContents(
                    uri="file:///data.bin",
                    mime_type="application/octet-stream",
                    blob=base64.b64encode(b"\1" * 1500).decode(),
                ),
            ),
            types.ResourceLink(
                type="resource_link", uri="https://example.com/report.pdf", name="report"
            ),
        ]
    )


@server.tool(annotations=READ_ONLY)
async def structured() -> types.CallToolResult:
    """Structured content and no text."""
    return types.CallToolResult(content=[], structured_content={"temperature": 21.5, "unit": "C"})


@server.tool()
async def grow(ctx: Context) -> str:
    """Add a tool named ``grown`` and tell the client the list changed."""

    async def grown() -> str:
        return "I am new"

    server.add_tool(grown, name="grown", description="Added while connected.")
    await ctx.notify_tools_changed()
    await ctx.session.send_tool_list_changed()
    return "grown"


def run_http(port: int, token: str | None) -> None:
    import uvicorn
    from starlette.responses import JSONResponse
    from starlette.types import ASGIApp, Receive, Scope, Send

    app: ASGIApp = server.streamable_http_app()

    if token is not None:
        inner = app

        async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
            headers = dict(scope.get("headers") or [])
            if (
                scope["type"] == "http"
                and headers.get(b"authorization") != f"Bearer {token}".encode()
            ):
                response = JSONResponse({"error": "invalid_token"}, status_code=401)
                await response(scope, receive, send)
                return
            await inner(scope, receive, send)

        app = guarded
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--http", type=int, metavar="PORT")
    parser.add_argument("--token")
    options = parser.parse_args()
    delay = float(os.environ.get("MCP_TEST_START_DELAY", "0"))
    if restarted():
        delay += float(os.environ.get("MCP_TEST_RESTART_DELAY", "0"))
    if delay:
        time.sleep(delay)
    record("start", transport="http" if options.http else "stdio")
    stubborn = bool(os.environ.get("MCP_TEST_STUBBORN"))
    if stubborn:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the child inherits it
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(120)"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        record("child", child=child.pid)
    if options.http:
        run_http(options.http, options.token)
    else:
        asyncio.run(server.run_stdio_async())
    if stubborn:
        time.sleep(120)  # bounded, so that a test that fails leaves nothing for long
    print("mcp test server stopped", file=sys.stderr)


if __name__ == "__main__":
    main()
