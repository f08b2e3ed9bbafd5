"""``create_app(settings)``: the FastAPI application; ``runtime.py`` holds what it serves.

An application that has its own agent hands it over here: its tools, system prompt,
model and the dependencies its tools need (``create_app(tools=..., deps=...)``), and can
mount the result inside its own FastAPI or Starlette app (see the README, "Embedding").
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from starlette.staticfiles import StaticFiles

from chatstream import __version__
from chatstream.config import Settings
from chatstream.models import Model
from chatstream.server import agui, errors, openapi, routes, ui_stream
from chatstream.server.limits import BodyLimit
from chatstream.server.origin import CorsPolicy, OriginGuard, is_loopback
from chatstream.server.requestlog import RequestLog
from chatstream.server.runtime import State, build_runtime
from chatstream.tools import Tool, ToolRegistry

log = logging.getLogger("chatstream.server")


def create_app(
    settings: Settings | None = None,
    *,
    tools: ToolRegistry | Iterable[Tool] | None = None,
    system_prompt: str | None = None,
    model: Model | None = None,
    deps: object = None,
) -> FastAPI:
    """Build the app; the model, store and tools are opened when it starts.

    ``settings`` default to the ``CHATSTREAM_*`` variables. ``tools`` replaces what
    ``settings.tools`` names (MCP servers of ``settings.mcp_config`` are added to them),
    ``system_prompt`` and ``model`` replace the settings' own, and ``deps`` is handed to
    every tool as ``ctx.deps``.
    """
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[State]:
        async with build_runtime(
            settings, tools=tools, system_prompt=system_prompt, model=model, deps=deps
        ) as runtime:
            if settings.http.allowed_hosts and not is_loopback(settings.host):
                log.warning(
                    "CHATSTREAM_ALLOWED_HOSTS is checked only on a loopback bind; on %s every "
                    "Host is answered",
                    settings.host,
                )
            log.info(
                "chatstream %s serving model %s%s with store %s",
                __version__,
                runtime.model.name,
                " (a scripted test double, not a real model)"
                if runtime.model.name == "scripted"
                else "",
                runtime.store.name,
            )
            # Handlers read it as request.state.runtime (runtime_of); whoever holds the
            # server reads the same state from uvicorn (runtime_in), so nothing is kept on
            # the app object itself.
            yield {"runtime": runtime}

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
    openapi.describe(app)
    app.include_router(routes.router)
    # The same runs in the frontends' protocols: the Vercel AI SDK's and AG-UI.
    app.include_router(ui_stream.router)
    app.include_router(agui.router)
    # The chat page's scripts and styles (GET / serves its index.html).
    app.mount("/static", StaticFiles(directory=routes.STATIC), name="static")
    # Starlette runs the middleware added last first: RequestLog, OriginGuard, BodyLimit,
    # CORS. Refusals are logged; a foreign origin is refused before its body is read.
    if settings.http.cors_origins:
        app.add_middleware(
            CorsPolicy,
            allow_origins=list(settings.http.cors_origins),
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["Content-Type", "Authorization", "Last-Event-ID"],
            expose_headers=["X-Session-Id", "X-Run-Id"],
        )
    app.add_middleware(
        BodyLimit, limit=settings.http.max_body_bytes, timeout_s=settings.http.body_timeout_s
    )
    app.add_middleware(OriginGuard, settings=settings)
    app.add_middleware(RequestLog, body_limit=settings.http.log_body_bytes)
    return app
