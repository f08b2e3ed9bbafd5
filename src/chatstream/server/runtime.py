"""``build_runtime(settings)``: what a running server holds, opened in one place.

It is an async context manager: everything it opens is closed on the way out, in reverse,
also when start-up fails half-way (a model that cannot warm up closes the store it was
opened with). The store URL names where sessions live: SQLite, Redis or PostgreSQL. The
runs URL (``--runs``) names the Redis where runs, locks, approvals and the stop button are
shared between instances; without one, runs stay in this process, except that a Redis
store shares its own Redis (one client, one connection pool, for both, closed after both).

Handlers reach the runtime through Starlette's lifespan state: ``create_app``'s lifespan
yields ``{"runtime": …}`` and ``runtime_of(request)`` reads it back from ``request.state``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict

from starlette.requests import Request

from chatstream.agent import Agent
from chatstream.config import Settings
from chatstream.coordinator import Coordinator
from chatstream.metrics import Metrics
from chatstream.models import Model, resolve
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
        agent = Agent(
            model,
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
            started_at=time.monotonic(),
        )
        # The embedded model loads its weights and reads the system prompt once here, so
        # the first user does not wait for it (a few seconds on two cores).
        started = time.monotonic()
        await model.warm_up(registry.specs(), system_prompt=agent.system_prompt)
        log.info("model %s ready in %.1f s", model.name, time.monotonic() - started)
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
