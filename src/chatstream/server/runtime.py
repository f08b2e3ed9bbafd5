"""``build_runtime(settings)``: what a running server holds, opened in one place.

It is an async context manager: everything it opens is closed on the way out, in reverse,
also when start-up fails half-way (an MCP server that cannot start closes what was opened
before it). The store URL names where sessions live: SQLite, Redis or PostgreSQL. The
runs URL (``--runs``) names the Redis where runs, locks, approvals and the stop button are
shared between instances; without one, runs stay in this process, except that a Redis
store shares its own Redis (one client, one connection pool, for both, closed after both).

The model warms up in the background (``WarmUp``), so the server answers health and the
page at once; a turn waits for the warm-up rather than failing while the weights load.

Handlers reach the runtime through Starlette's lifespan state: ``create_app``'s lifespan
yields ``{"runtime": …}`` and ``runtime_of(request)`` reads it back from ``request.state``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack, aclosing, asynccontextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypedDict

from starlette.requests import Request

from chatstream.agent import Agent
from chatstream.config import Settings
from chatstream.coordinator import Coordinator
from chatstream.messages import Message
from chatstream.metrics import Metrics
from chatstream.models import Model, ModelEvent, ToolSpec, resolve
from chatstream.prompts import system_prompt_from
from chatstream.runlog import RunLog
from chatstream.runs import RunManager
from chatstream.server.auth import KeyRing
from chatstream.server.limits import StreamSlots, TurnRate
from chatstream.store import SessionStore, StoreURL
from chatstream.tools import Tool, ToolRegistry
from chatstream.tools.loading import load_tools

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from chatstream.tools.mcp import McpServers

log = logging.getLogger("chatstream.server")

WarmUpStatus = Literal["warming up", "ready", "failed"]


class WarmUp:
    """The model's warm-up, run in the background while the server already answers.

    Health shows it; every model request waits for it, so the first turn of a fresh server
    waits instead of failing. A failed warm-up is logged and shown in health, and requests
    then go to the model anyway: it reports its own error to the turn (a missing weight
    package, by name), or serves it once the cause is gone.
    """

    def __init__(self, model: Model) -> None:
        self.model = model
        self.status: WarmUpStatus = "warming up"
        self.error: str | None = None
        self._started = time.monotonic()
        self._ended: float | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self, tools: Sequence[ToolSpec], *, system_prompt: str) -> None:
        """Begin warming up, on the running loop; the model's blocking work is in its thread."""
        self._started = time.monotonic()
        self._task = asyncio.create_task(
            self._run(list(tools), system_prompt), name="chatstream-warm-up"
        )

    @property
    def seconds(self) -> float:
        """How long the warm-up took, or has taken so far."""
        return (self._ended or time.monotonic()) - self._started

    @property
    def over(self) -> bool:
        """Whether the warm-up has ended, however it ended."""
        return self._task is not None and self._task.done()

    async def wait(self) -> None:
        """Return once the warm-up is over, however it ended."""
        if self._task is not None and not self._task.done():
            # Shielded: a turn cancelled while it waits must not cancel the warm-up.
            await asyncio.shield(self._task)

    async def close(self) -> None:
        """Stop a warm-up still running (the server is shutting down)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task

    async def _run(self, tools: list[ToolSpec], system_prompt: str) -> None:
        try:
            await self.model.warm_up(tools, system_prompt=system_prompt)
        except Exception as exc:
            self.status, self.error = "failed", str(exc) or type(exc).__name__
            log.error("model %s could not warm up: %s", self.model.name, self.error)
        else:
            self.status = "ready"
            log.info("model %s ready in %.1f s", self.model.name, self.seconds)
        finally:
            self._ended = time.monotonic()


class _AfterWarmUp:
    """The model as the agent drives it: each request first waits for the warm-up."""

    def __init__(self, warm: WarmUp) -> None:
        self._warm = warm
        self.name = warm.model.name

    def stream(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec]
    ) -> AsyncGenerator[ModelEvent, None]:
        if self._warm.over:
            # The model's own stream: no hop per token once the warm-up is behind us.
            return self._warm.model.stream(messages, tools)
        return self._after_warm_up(messages, tools)

    async def _after_warm_up(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec]
    ) -> AsyncGenerator[ModelEvent, None]:
        await self._warm.wait()
        async with aclosing(self._warm.model.stream(messages, tools)) as events:
            async for event in events:
                yield event

    async def warm_up(self, tools: Sequence[ToolSpec], *, system_prompt: str) -> None:
        await self._warm.wait()

    async def aclose(self) -> None:
        """Nothing: the runtime closes the model it wraps."""


@dataclass(slots=True)
class Runtime:
    """What a running server holds: settings, model, store, tools, runs."""

    settings: Settings
    model: Model
    store: SessionStore
    agent: Agent
    runs: RunManager
    metrics: Metrics
    keys: KeyRing
    turn_rate: TurnRate
    slots: StreamSlots
    # The model's warm-up, in the background: health shows it, turns wait for it.
    warm_up: WarmUp
    started_at: float
    # The MCP servers whose tools are offered (None without --mcp): health shows them.
    mcp: McpServers | None = None

    async def begin_shutdown(self) -> None:
        """Stop taking turns; let running ones finish up to the deadline, then cancel them."""
        await self.runs.drain(self.settings.streams.shutdown_grace_s)


class State(TypedDict):
    """The lifespan state: what every request finds in ``request.state``."""

    runtime: Runtime


def runtime_of(request: Request) -> Runtime:
    """The running server's runtime, as the lifespan handed it to this request."""
    runtime: Runtime = request.state.runtime
    return runtime


def runtime_in(state: Mapping[str, Any]) -> Runtime | None:
    """The runtime in a server's lifespan state (uvicorn's ``Server.lifespan.state``).

    None until start-up is over: for whoever holds the server rather than a request (the
    CLI's signal handler, the tests' live server).
    """
    runtime: Runtime | None = state.get("runtime")
    return runtime


@asynccontextmanager
async def build_runtime(
    settings: Settings,
    *,
    tools: ToolRegistry | Iterable[Tool] | None = None,
    system_prompt: str | None = None,
    model: Model | None = None,
    deps: object = None,
) -> AsyncIterator[Runtime]:
    """Open and warm up what ``settings`` name; close all of it on exit.

    An application that embeds chatstream may hand over its own ``tools`` (instead of
    ``settings.tools``; MCP servers of ``settings.mcp_config`` are added to them),
    ``system_prompt``, ``model`` and ``deps`` (given to every tool as ``ctx.deps``). The
    runtime owns the model it serves, given or resolved: it closes it.
    """
    async with AsyncExitStack() as stack:
        keys = KeyRing.load(settings.auth.api_keys, settings.auth.api_keys_file)
        model = model if model is not None else resolve(settings.model)
        stack.push_async_callback(model.aclose)
        registry = _registry(settings, tools)
        mcp = await _start_mcp(settings, registry, stack)
        store, run_log, coordinator = await _open_backend(settings, stack)
        warm_up = WarmUp(model)
        agent = Agent(
            _AfterWarmUp(warm_up),
            registry,
            max_tool_rounds=settings.turns.max_tool_rounds,
            tool_settings=settings.tooling,
            deps=deps,
            system_prompt=system_prompt or system_prompt_from(settings.system_prompt),
            approval_timeout_s=settings.turns.approval_timeout_s,
        )
        metrics = Metrics()
        # Runs stay in this process unless the backend shares them (log and coordinator).
        runs = RunManager(
            agent=agent,
            store=store,
            settings=settings,
            log=run_log,
            coordinator=coordinator,
            metrics=metrics,
        )
        stack.push_async_callback(runs.close)
        runtime = Runtime(
            settings=settings,
            model=model,
            store=store,
            agent=agent,
            runs=runs,
            metrics=metrics,
            keys=keys,
            mcp=mcp,
            turn_rate=TurnRate(settings.limits.turns_per_minute),
            slots=StreamSlots(
                settings.limits.max_streams_per_key,
                settings.limits.max_streams_total,
                on_change=metrics.active_streams.set,
            ),
            warm_up=warm_up,
            started_at=time.monotonic(),
        )
        # The embedded model loads its weights and reads the system prompt (about 25 s on
        # two cores for the default) while the server already answers; stopped first on
        # the way out, before the model closes.
        warm_up.start(registry.specs(), system_prompt=agent.system_prompt)
        stack.push_async_callback(warm_up.close)
        yield runtime


def _registry(settings: Settings, tools: ToolRegistry | Iterable[Tool] | None) -> ToolRegistry:
    """The tools handed over, or those ``settings.tools`` names (``ToolLoadError`` if bad)."""
    if isinstance(tools, ToolRegistry):
        return tools
    if tools is not None:
        return ToolRegistry(tools)
    return ToolRegistry(load_tools(settings.tools))


async def _start_mcp(
    settings: Settings, registry: ToolRegistry, stack: AsyncExitStack
) -> McpServers | None:
    """Start the MCP servers the config names, their tools a live part of the registry."""
    if not settings.mcp_config:
        return None
    from chatstream.tools.mcp import McpServers

    servers = McpServers.from_file(
        settings.mcp_config, default_timeout_s=settings.tooling.tool_timeout_s
    )
    stack.push_async_callback(servers.close)
    await servers.start()
    registry.add_source(servers)
    return servers


RUNS_SCHEMES = ("redis://", "rediss://", "unix://")


def runs_location(settings: Settings) -> str:
    """The Redis URL where runs are shared, or "" for this process; ``ValueError`` for a
    runs URL that names anything but a Redis."""
    if settings.runs:
        if not settings.runs.startswith(RUNS_SCHEMES):
            scheme = settings.runs.partition(":")[0]
            raise ValueError(
                f"unsupported runs URL (scheme {scheme!r}): runs are shared through Redis, "
                "redis://host:port/db"
            )
        return settings.runs
    where = StoreURL.parse(settings.store)
    return where.location if where.backend == "redis" else ""


async def _open_backend(
    settings: Settings, stack: AsyncExitStack
) -> tuple[SessionStore, RunLog | None, Coordinator | None]:
    """The store and, with a runs URL, the shared run log and coordinator.

    One Redis client per Redis URL: a Redis store and runs on that same Redis share it. The
    run manager closes the log and the coordinator; the runtime closes the clients last.
    """
    where = StoreURL.parse(settings.store)
    shared = runs_location(settings)
    clients: dict[str, Redis] = {}

    def client_for(url: str) -> Redis:
        if url not in clients:
            from chatstream.store.redis import connect

            clients[url] = connect(url)
            # The runtime owns the client: pushed first, so closed last, after the store
            # and the runs are done with it.
            stack.push_async_callback(clients[url].aclose)
        return clients[url]

    if shared:
        client_for(shared)
    store: SessionStore
    if where.backend == "sqlite":
        from chatstream.store.sqlite import SQLiteStore

        store = await SQLiteStore.open(where.location)
    elif where.backend == "postgresql":
        from chatstream.store.postgres import PostgresStore

        store = await PostgresStore.open(where.location)
    else:
        from chatstream.store.redis import RedisStore

        store = RedisStore(client_for(where.location))
    stack.push_async_callback(store.close)
    if not shared:
        return store, None, None
    from chatstream.cluster import shared_runs

    run_log, coordinator = shared_runs(client_for(shared), settings, store=store)
    return store, run_log, coordinator
