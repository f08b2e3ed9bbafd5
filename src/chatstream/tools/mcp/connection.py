"""One MCP server's connection: kept up by one long-lived task, called from any other.

The SDK's client is a nest of anyio task groups, which must be entered and left by the
same task, and whose failure (a Streamable HTTP server that drops a request, say)
cancels the task that entered them. So each server gets a supervisor task that alone
enters ``mcp.Client``, lists the tools, follows their changes and, when the connection
ends, waits (0.5 s doubling to 30 s) and connects again: a stdio server is started
anew. Calls come from the agent's tasks through the same ``ClientSession``, which is
safe across tasks; a call in flight when the connection ends gets ``CONNECTION_CLOSED``
and becomes a ``ToolError``. A call whose task is cancelled makes the SDK send
``notifications/cancelled`` (on a 2026-07-28 HTTP connection: abort that request's
POST, the new spelling of the same thing).

What the SDK lacks, written here: noticing that a stdio server's output ended (the
read stream is watched), saying *why* an HTTP server refused (its status is noted by
a response hook: the SDK reports a 401 as "Server returned an error response"), and
following tool-list changes in both protocol eras (``notifications/tools/list_changed``
before 2026-07-28, a ``subscriptions/listen`` stream since).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

import anyio
import httpx2
import mcp_types as types
from mcp.client import Client, UnexpectedClaimedResult
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.client.subscriptions import ListenNotSupportedError
from mcp.shared.exceptions import MCPError
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import ValidationError

from chatstream.errors import ToolError
from chatstream.tools.base import Tool, ToolContext, ToolFunction
from chatstream.tools.mcp.config import HttpTransport, ServerConfig, StdioTransport
from chatstream.tools.mcp.content import progress_fraction, progress_message, result_text

if TYPE_CHECKING:
    # Only the SDK's private modules name these stream types.
    from mcp.client._transport import ReadStream, TransportStreams
    from mcp.shared.message import SessionMessage

log = logging.getLogger("chatstream.mcp")

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
# A connection that stayed up this long was healthy: the next failure waits from the start.
STEADY_S = 30.0
# Connecting, the handshake and the first tools/list together.
CONNECT_TIMEOUT_S = 30.0
# How long a server gets to stop before its supervisor is cancelled outright.
CLOSE_TIMEOUT_S = 10.0
_LIST_PAGES = 100
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]")

State = Literal["starting", "ready", "failed"]


def tool_name(server: str, tool: str) -> str:
    """``<server>__<tool>``, in the characters models take, cut to 64."""
    return _NAME_CHARS.sub("_", f"{server}__{tool}")[:64]


class McpConnection:
    """One configured server: its state, its current tools, and calls to them."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.state: State = "starting"
        self.error: str | None = None
        self._tools: list[Tool] = []
        self._client: Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._settled = asyncio.Event()  # the first attempt ended, either way
        self._wake = asyncio.Event()  # the supervisor has something to do
        self._lost: str | None = None  # why the connection is known to be over
        self._stale = False
        self._closing = False
        self._refused_status: int | None = None

    def start(self) -> None:
        """Start connecting in the background."""
        if self._task is None:
            self._task = asyncio.create_task(self._supervise(), name=f"mcp:{self.config.name}")

    async def settled(self) -> None:
        """Return once the first attempt to connect has succeeded or failed."""
        await self._settled.wait()

    def tools(self) -> list[Tool]:
        return self._tools if self.state == "ready" else []

    def status(self) -> dict[str, object]:
        status: dict[str, object] = {"status": self.state, "tools": len(self.tools())}
        if self.state == "failed" and self.error:
            status["error"] = self.error
        return status

    async def close(self) -> None:
        """Stop the server (a stdio server's process is ended) and the supervisor."""
        self._closing = True
        self._wake.set()
        task = self._task
        if task is None or task.done():
            return
        # Left to unwind on its own, the SDK closes stdin, waits, then kills the process
        # tree; cancelling the task outright is the fallback for one that does not stop.
        done, _ = await asyncio.wait({task}, timeout=CLOSE_TIMEOUT_S)
        if not done:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task

    async def call(self, tool: str, arguments: dict[str, Any], ctx: ToolContext[Any]) -> str:
        """Call ``tool`` (the server's name for it); its progress goes to ``ctx``."""
        server = self.config.name
        client = self._client
        if client is None or self.state != "ready" or self._lost:
            why = self.error or "it is starting"
            raise ToolError(f"the MCP server {server!r} is not available: {why}")

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            ctx.progress(
                progress_message(progress, total, message), progress_fraction(progress, total)
            )

        try:
            result = await client.call_tool(tool, arguments, progress_callback=on_progress)
        except MCPError as exc:
            if self._closing:
                raise ToolError(f"the MCP server {server!r} was stopped during the call") from None
            if exc.code == types.CONNECTION_CLOSED or self._lost:
                raise ToolError(
                    f"the MCP server {server!r} went away during the call (reconnecting to it)"
                ) from None
            raise ToolError(
                f"the MCP server {server!r} refused the call: {exc.error.message}"
            ) from None
        except ValidationError as exc:
            # The first problem is enough to find the bug; all of them repeat the result.
            first = exc.errors()[0]
            log.warning(
                "MCP server %s sent a malformed result for %s (%d problems; first: %s at %s)",
                server,
                tool,
                exc.error_count(),
                first["msg"],
                ".".join(str(p) for p in first["loc"]),
            )
            raise ToolError(
                f"the MCP server {server!r} sent a malformed result for {tool}"
            ) from None
        except (RuntimeError, UnexpectedClaimedResult) as exc:
            # An output schema the result breaks, or input the server asks for that
            # chatstream cannot give (sampling, elicitation).
            raise ToolError(f"the MCP server {server!r} could not finish {tool}: {exc}") from None
        return result_text(result)

    # The supervisor.

    async def _supervise(self) -> None:
        delay = BACKOFF_FIRST_S
        while not self._closing:
            ready_for = await self._connect_once()
            if self._closing:
                break
            if ready_for >= STEADY_S:
                delay = BACKOFF_FIRST_S
            await self._pause(delay)
            delay = min(delay * 2, BACKOFF_MAX_S)
        self._settled.set()

    async def _connect_once(self) -> float:
        """Connect and serve until the connection ends; return how long it was ready."""
        self._lost, self._stale = None, False
        self._refused_status = None
        loop = asyncio.get_running_loop()
        ready_at: float | None = None
        try:
            # One scope around the client's whole life (anyio's scopes nest strictly):
            # its deadline bounds connecting and the first listing, then is lifted.
            with anyio.CancelScope(deadline=anyio.current_time() + CONNECT_TIMEOUT_S) as limit:
                async with self._new_client() as client:
                    self._tools = await self._list_tools(client)
                    limit.deadline = math.inf
                    self._client, self.state, self.error = client, "ready", None
                    self._settled.set()
                    ready_at = loop.time()
                    log.info("MCP server %s ready: %d tools", self.config.name, len(self._tools))
                    await self._serve(client)
            if limit.cancelled_caught:
                self._failed(f"no answer within {CONNECT_TIMEOUT_S:g} s")
            elif not self._closing:
                self._failed(self._lost or "the server ended the connection")
        except Exception as exc:
            if not self._closing:
                self._failed(self._describe(exc))
        finally:
            self._client = None
        return 0.0 if ready_at is None else loop.time() - ready_at

    def _failed(self, error: str) -> None:
        was_ready, said = self.state == "ready", self.error
        self.state, self.error, self._tools = "failed", error, []
        self._settled.set()
        if was_ready:
            log.warning("MCP server %s is down: %s; restarting it", self.config.name, error)
        elif error != said:
            log.warning("MCP server %s failed: %s", self.config.name, error)
        else:  # the same failure again: said once is enough
            log.debug("MCP server %s failed again: %s", self.config.name, error)

    async def _pause(self, seconds: float) -> None:
        """Wait before the next attempt, or less if closing."""
        self._wake.clear()
        with suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while not self._closing:
                    await self._wake.wait()
                    self._wake.clear()

    async def _serve(self, client: Client) -> None:
        """Follow the connection until it ends or the server is closed."""
        async with anyio.create_task_group() as group:
            if client.protocol_version in MODERN_PROTOCOL_VERSIONS:
                group.start_soon(self._listen, client)
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._closing or self._lost:
                    break
                if self._stale:
                    self._stale = False
                    await self._refresh(client)
            group.cancel_scope.cancel()

    async def _listen(self, client: Client) -> None:
        """On a 2026-07-28 connection, tool-list changes come on a listen stream.

        The stream has no replay and may end (an idle HTTP stream times out): each time
        it does, the list is fetched again and a new stream opened, waiting longer after
        each stream that ended quickly.
        """
        delay = BACKOFF_FIRST_S
        loop = asyncio.get_running_loop()
        while True:
            opened = loop.time()
            try:
                async with client.listen(tools_list_changed=True) as subscription:
                    async for _event in subscription:
                        self._mark_stale()
            except ListenNotSupportedError:
                return
            except MCPError as exc:
                if exc.code == types.METHOD_NOT_FOUND:
                    log.info("MCP server %s does not announce tool changes", self.config.name)
                    return
                log.debug("MCP server %s: the listen stream ended: %s", self.config.name, exc)
            except Exception as exc:
                log.debug("MCP server %s: the listen stream ended: %r", self.config.name, exc)
            if self._lost or self._closing:
                return
            delay = BACKOFF_FIRST_S if loop.time() - opened > STEADY_S else delay
            await anyio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX_S)
            self._mark_stale()  # what changed while no stream was open is not known

    async def _refresh(self, client: Client) -> None:
        try:
            self._tools = await self._list_tools(client)
        except MCPError as exc:
            if exc.code == types.CONNECTION_CLOSED:
                raise
            log.warning(
                "MCP server %s: tools/list failed (%s); keeping the old list",
                self.config.name,
                exc.error.message,
            )
        else:
            log.info("MCP server %s: tools changed, %d now", self.config.name, len(self._tools))

    async def _list_tools(self, client: Client) -> list[Tool]:
        listed: list[types.Tool] = []
        cursor: str | None = None
        for _ in range(_LIST_PAGES):
            page = await client.list_tools(cursor=cursor, cache_mode="bypass")
            listed.extend(page.tools)
            cursor = page.next_cursor
            if cursor is None:
                break
        return self._as_tools(listed)

    def _as_tools(self, listed: list[types.Tool]) -> list[Tool]:
        config = self.config
        wanted = config.tools
        tools: list[Tool] = []
        names: set[str] = set()
        for listed_tool in listed:
            if wanted is not None and listed_tool.name not in wanted:
                continue
            name = tool_name(config.name, listed_tool.name)
            if name in names:
                log.warning(
                    "MCP server %s: two tools are both offered as %s; the second is left out",
                    config.name,
                    name,
                )
                continue
            names.add(name)
            hints = listed_tool.annotations
            read_only = bool(hints and hints.read_only_hint)
            tools.append(
                Tool(
                    name=name,
                    description=listed_tool.description or listed_tool.title or "",
                    parameters=dict(listed_tool.input_schema),
                    function=self._function(listed_tool.name),
                    source=f"mcp:{config.name}",
                    approval=config.needs_approval(listed_tool.name, read_only=read_only),
                    timeout_s=config.timeout_s,
                )
            )
        missing = (wanted or frozenset()) - {t.name for t in listed}
        if missing:
            log.warning(
                "MCP server %s offers no tool named %s", config.name, ", ".join(sorted(missing))
            )
        return tools

    def _function(self, tool: str) -> ToolFunction:
        # ctx is positional-only: a tool of the server may take an argument named "ctx".
        async def call(ctx: ToolContext[Any], /, **arguments: Any) -> str:
            return await self.call(tool, arguments, ctx)

        call.__name__ = tool_name(self.config.name, tool)
        return call

    def _mark_stale(self) -> None:
        self._stale = True
        self._wake.set()

    def _mark_lost(self, why: str) -> None:
        """The connection is over: say so at once (no call tries it), then reconnect."""
        if self._lost is None and not self._closing:
            self._lost = why
            if self.state == "ready":
                self._failed(why)
        self._wake.set()

    async def _on_message(self, message: types.ServerNotification | Exception) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            self._mark_stale()
        elif isinstance(message, Exception):
            log.debug("MCP server %s: transport error: %r", self.config.name, message)

    # Connecting.

    def _new_client(self) -> Client:
        from chatstream import __version__

        return Client(
            self._transport(),
            message_handler=self._on_message,
            client_info=types.Implementation(name="chatstream", version=__version__),
            # chatstream refetches on the server's signals; the SDK's cache would serve old lists.
            cache=None,
        )

    @asynccontextmanager
    async def _transport(self) -> AsyncIterator[TransportStreams]:
        transport = self.config.transport
        if isinstance(transport, StdioTransport):
            params = StdioServerParameters(
                command=transport.command,
                args=list(transport.args),
                env=dict(transport.env) if transport.env else None,
                cwd=transport.cwd,
            )
            async with stdio_client(params, errlog=sys.stderr) as (read, write):
                yield _WatchedStream(read, self._output_ended), write
            return
        # The read limit is the longest a tool may go quiet; the call's own limit is the agent's.
        timeout = httpx2.Timeout(30.0, read=max(300.0, self.config.timeout_s))
        http = httpx2.AsyncClient(
            headers=dict(transport.headers or {}),
            timeout=timeout,
            event_hooks={"response": [self._note_refusal]},
        )
        async with http, streamable_http_client(transport.url, http_client=http) as (read, write):
            yield _WatchedStream(read, self._output_ended), write

    def _output_ended(self) -> None:
        self._mark_lost("the connection ended (did the server exit?)")

    async def _note_refusal(self, response: httpx2.Response) -> None:
        if response.status_code in (401, 403, 407):
            self._refused_status = response.status_code
        elif response.status_code in (400, 404) and "mcp-session-id" in response.request.headers:
            # The server forgot the session (it restarted): the spec's cue to start anew is
            # a 404; servers made from the TypeScript SDK's example answer 400.
            self._mark_lost("the server no longer knows the session (did it restart?)")

    def _describe(self, exc: BaseException) -> str:
        """Why connecting failed, in a line that names what to check."""
        transport = self.config.transport
        if self._refused_status is not None and isinstance(transport, HttpTransport):
            status = self._refused_status
            reason = {401: "Unauthorized", 403: "Forbidden", 407: "Proxy Authentication Required"}
            return (
                f"{transport.url} answered HTTP {status} {reason[status]}: "
                "check the credentials in its headers"
            )
        leaf = _leaf(exc)
        if isinstance(leaf, OSError) and isinstance(transport, StdioTransport):
            return f"cannot run {transport.command!r}: {leaf.strerror or leaf}"
        if isinstance(leaf, MCPError):
            if leaf.code == types.CONNECTION_CLOSED:
                return "the server closed the connection (did it exit?)"
            return f"the server answered with an error: {leaf.error.message}"
        if isinstance(leaf, httpx2.HTTPError) and isinstance(transport, HttpTransport):
            return f"cannot reach {transport.url}: {leaf or type(leaf).__name__}"
        return f"{type(leaf).__name__}: {leaf}"


def _leaf(exc: BaseException) -> BaseException:
    """The first real failure inside the task groups' exception groups."""
    while isinstance(exc, BaseExceptionGroup):
        inner = [e for e in exc.exceptions if not isinstance(e, asyncio.CancelledError)]
        exc = (inner or list(exc.exceptions))[0]
    return exc


class _WatchedStream:
    """A transport's read stream that says when it ends (a stdio server exited)."""

    def __init__(
        self, inner: ReadStream[SessionMessage | Exception], on_end: Callable[[], None]
    ) -> None:
        self._inner = inner
        self._on_end = on_end

    @property
    def last_context(self) -> Any:
        return getattr(self._inner, "last_context", None)

    async def receive(self) -> SessionMessage | Exception:
        try:
            item = await self._inner.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._on_end()
            raise
        return item

    async def aclose(self) -> None:
        await self._inner.aclose()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> SessionMessage | Exception:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        await self.aclose()
        return None
