"""``build_runtime(settings)``: what a running server holds, opened in one place.

It is an async context manager: everything it opens is closed on the way out, in reverse,
also when start-up fails half-way (a model that cannot warm up closes the store it was
opened with). The store URL names one backend: SQLite, with runs kept in this process; or
Redis, where one client (one connection pool) carries both the sessions and the runs shared
between instances, and is closed after both.

Handlers reach the runtime through Starlette's lifespan state: ``create_app``'s lifespan
yields ``{"runtime": …}`` and ``runtime_of(request)`` reads it back from ``request.state``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypedDict

from starlette.requests import Request

from chatstream.agent import Agent
from chatstream.config import Settings
from chatstream.coordinator import Coordinator
from chatstream.metrics import Metrics
from chatstream.models import Model, resolve
from chatstream.runlog import RunLog
from chatstream.runs import RunManager
from chatstream.server.auth import KeyRing
from chatstream.server.limits import StreamSlots, TurnRate
from chatstream.store import SessionStore, StoreURL
from chatstream.tools import default_tools

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
    settings: Settings, *, model: Model | None = None
) -> AsyncIterator[Runtime]:
    """Open and warm up what ``settings`` name (or ``model``); close all of it on exit.

    The runtime owns the model it serves, given or resolved: it closes it.
    """
    async with AsyncExitStack() as stack:
        keys = KeyRing.load(settings.auth.api_keys, settings.auth.api_keys_file)
        model = model if model is not None else resolve(settings.model)
        stack.push_async_callback(model.aclose)
        store, run_log, coordinator = await _open_backend(settings, stack)
        tools = default_tools()
        agent = Agent(
            model,
            tools,
            max_tool_rounds=settings.turns.max_tool_rounds,
            tool_settings=settings.tools,
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
        await model.warm_up(tools.specs())
        log.info("model %s ready in %.1f s", model.name, time.monotonic() - started)
        yield runtime


async def _open_backend(
    settings: Settings, stack: AsyncExitStack
) -> tuple[SessionStore, RunLog | None, Coordinator | None]:
    """The store and, on Redis, the shared run log and coordinator: one client under all.

    The run manager closes the log and the coordinator; the runtime closes the client last.
    """
    where = StoreURL.parse(settings.store)
    if where.backend == "sqlite":
        from chatstream.store.sqlite import SQLiteStore

        sqlite = await SQLiteStore.open(where.location)
        stack.push_async_callback(sqlite.close)
        return sqlite, None, None
    from chatstream.cluster import shared_runs
    from chatstream.store.redis import RedisStore, connect

    client = connect(where.location)
    # The runtime owns the client: pushed first, so closed last, after the store and the
    # runs are done with it.
    stack.push_async_callback(client.aclose)
    redis = RedisStore(client)
    stack.push_async_callback(redis.close)
    run_log, coordinator = shared_runs(client, settings)
    return redis, run_log, coordinator
