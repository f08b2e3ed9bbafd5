"""``create_app(settings)``: the FastAPI application and what it holds while it runs."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from starlette.staticfiles import StaticFiles

from chatstream import __version__
from chatstream.agent import Agent
from chatstream.cluster import Cluster
from chatstream.config import Settings
from chatstream.metrics import Metrics
from chatstream.models import Model, resolve
from chatstream.runs import RunManager
from chatstream.server import errors, routes
from chatstream.server.auth import KeyRing
from chatstream.server.limits import BodyLimit, StreamSlots, TurnRate
from chatstream.server.origin import CorsPolicy, OriginGuard, is_loopback
from chatstream.server.requestlog import RequestLog
from chatstream.store import SessionStore, open_store
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
        await self.runs.drain(self.settings.shutdown_grace_s)


def open_cluster(settings: Settings) -> Cluster | None:
    """Shared runs and locks when the store is Redis; None for a single-instance store."""
    if not settings.store.startswith(("redis://", "rediss://", "unix://")):
        return None
    from chatstream.cluster import Cluster

    return Cluster.from_url(settings.store, settings)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; the model and store are opened when it starts."""
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        keys = KeyRing.load(settings.api_keys, settings.api_keys_file)
        model = resolve(settings.model)
        store = await open_store(settings.store)
        cluster = open_cluster(settings)
        tools = default_tools()
        agent = Agent(
            model,
            tools,
            max_tool_rounds=settings.max_tool_rounds,
            tool_timeout_s=settings.tool_timeout_s,
            tool_settings=settings,
        )
        metrics = Metrics()
        runtime = Runtime(
            settings=settings,
            model=model,
            store=store,
            agent=agent,
            runs=RunManager(
                agent=agent, store=store, settings=settings, cluster=cluster, metrics=metrics
            ),
            metrics=metrics,
            keys=keys,
            turn_rate=TurnRate(settings.turns_per_minute),
            slots=StreamSlots(
                settings.max_streams_per_key,
                settings.max_streams_total,
                on_change=metrics.active_streams.set,
            ),
            started_at=time.monotonic(),
        )
        app.state.runtime = runtime
        warm_up = getattr(model, "load", None)
        if warm_up is not None:
            # The embedded model loads its weights and reads the system prompt once here,
            # so the first user does not wait for it (a few seconds on two cores).
            started = time.monotonic()
            await warm_up(tools.specs())
            log.info("model %s ready in %.1f s", model.name, time.monotonic() - started)
        if settings.allowed_hosts and not is_loopback(settings.host):
            log.warning(
                "CHATSTREAM_ALLOWED_HOSTS is checked only on a loopback bind; on %s every "
                "Host is answered",
                settings.host,
            )
        log.info(
            "chatstream %s serving model %s%s with store %s",
            __version__,
            model.name,
            " (a scripted test double, not a real model)" if model.name == "scripted" else "",
            store.name,
        )
        try:
            yield
        finally:
            await runtime.runs.close()
            if cluster is not None:
                await cluster.close()
            await model.aclose()
            await store.close()

    # fastapi-offline serves Swagger UI and ReDoc from its own package, so /docs and /redoc
    # work with no network (FastAPI's own pages load them from a CDN).
    app = FastAPIOffline(
        title="chatstream",
        version=__version__,
        summary="Stream an LLM agent's answer and tool work over Server-Sent Events.",
        lifespan=lifespan,
        # FastAPI's built-in OpenTelemetry looks up the global providers (os.environ
        # reads) on every request even when none is configured.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    errors.install(app)
    app.include_router(routes.router)
    # The chat page's scripts and styles (GET / serves its index.html).
    app.mount("/static", StaticFiles(directory=routes.STATIC), name="static")
    # Starlette runs the middleware added last first: RequestLog, OriginGuard, BodyLimit,
    # CORS. Refusals are logged; a foreign origin is refused before its body is read.
    if settings.cors_origins:
        app.add_middleware(
            CorsPolicy,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["Content-Type", "Authorization", "Last-Event-ID"],
            expose_headers=["X-Session-Id", "X-Run-Id"],
        )
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(OriginGuard, settings=settings)
    app.add_middleware(RequestLog, body_limit=settings.log_body_bytes)
    return app
