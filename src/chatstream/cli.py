"""The ``chatstream`` command: ``serve`` the API, or ``chat`` with a server in the terminal."""

from __future__ import annotations

import asyncio
import gc
import socket
import sys
from typing import Annotated, Any

import typer
import uvicorn

from chatstream import __version__, logs
from chatstream.config import Settings
from chatstream.server.listener import Server

app = typer.Typer(
    name="chatstream",
    help="Stream an LLM agent's answer and tool work over Server-Sent Events.",
    no_args_is_help=True,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"chatstream {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """chatstream: an SSE chat server with tools and persistent sessions."""


class _Server(Server):
    """uvicorn, told about SIGTERM/SIGINT early enough to drain runs before connections close."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._drain: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        from chatstream.server.runtime import runtime_in  # loaded by serve's create_app already

        # The runtime is in the lifespan state that uvicorn keeps for the app, the same
        # state every request gets: one way in, and none through the app object. uvicorn
        # makes ``lifespan`` once serve() begins; a signal may come before.
        lifespan = getattr(self, "lifespan", None)
        runtime = None if lifespan is None else runtime_in(lifespan.state)
        if runtime is not None and self._drain is None and not self.should_exit:
            # Runs end their streams themselves (done, or SHUTTING_DOWN at the deadline);
            # uvicorn meanwhile stops accepting and waits for open connections to finish.
            self._drain = asyncio.get_event_loop().create_task(runtime.begin_shutdown())
        super().handle_exit(sig, frame)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            settle_garbage_collector()


def settle_garbage_collector() -> None:
    """Tune the cyclic GC for a server whose start-up is over.

    Start-up leaves hundreds of thousands of objects that live as long as the process
    (FastAPI's routes, pydantic's validators, the model); frozen, no collection walks them
    again. A thousand turns starting together then add a few hundred thousand objects
    that live for the turn, and with the default thresholds every growth of a quarter set
    off a full collection that walked them all: pauses of 70 to 150 ms, felt by every
    stream at once (``bench/run.py``, C=1,000, frozen but default thresholds: a gap p99 of
    250 ms in the run that measured those pauses). Full collections now wait
    for a thousand middle ones; the young generations stay small so each pause is short
    (under 30 ms measured). Little of what a turn allocates is cyclic garbage: the
    collections during that run found almost none.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(2_000, 10, 1_000)


@app.command()
def serve(
    host: Annotated[
        str, typer.Option(envvar="CHATSTREAM_HOST", help="Address to bind.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="CHATSTREAM_PORT", help="Port to bind.")] = 3002,
    model: Annotated[
        str,
        typer.Option(
            envvar="CHATSTREAM_MODEL",
            help="local (Qwen2.5-Coder-1.5B) | local:small (0.5B) | local:<file.gguf> | "
            "openai:<model> | anthropic:<model> | scripted[:<ms>]",
        ),
    ] = "local",
    store: Annotated[
        str,
        typer.Option(
            envvar="CHATSTREAM_STORE",
            help="Where sessions live: sqlite:///<path> (default chatstream.db), "
            "redis://host:port/db, or postgresql://user:password@host:port/database",
        ),
    ] = "sqlite:///chatstream.db",
    runs: Annotated[
        str | None,
        typer.Option(
            envvar="CHATSTREAM_RUNS",
            help="Where runs, session locks, approvals and the stop button are shared "
            "between instances: redis://host:port/db (default: in this process, or the "
            "store's own Redis with a redis:// store). Several instances: --store "
            "postgresql://… --runs redis://…",
        ),
    ] = None,
    tools: Annotated[
        str,
        typer.Option(
            envvar="CHATSTREAM_TOOLS",
            help="Comma-separated: builtin (the four built-in tools) and <module>:<attribute> "
            "references to your own (a Tool, a ToolRegistry or a list of tools).",
        ),
    ] = "builtin",
    mcp: Annotated[
        str | None,
        typer.Option(
            envvar="CHATSTREAM_MCP_CONFIG",
            help='A JSON file of MCP servers, {"mcpServers": {...}}, whose tools are offered.',
        ),
    ] = None,
    system_prompt: Annotated[
        str | None,
        typer.Option(
            envvar="CHATSTREAM_SYSTEM_PROMPT",
            help="The system prompt: text, or @path of a file (default: chatstream's own).",
        ),
    ] = None,
    forwarded_allow_ips: Annotated[
        str,
        typer.Option(
            envvar=["CHATSTREAM_FORWARDED_ALLOW_IPS", "FORWARDED_ALLOW_IPS"],
            help="Proxies whose X-Forwarded-For / -Proto are believed: comma-separated "
            "addresses or networks, or * for any. Others' headers are ignored.",
        ),
    ] = "127.0.0.1",
    log_level: Annotated[
        str, typer.Option(envvar="CHATSTREAM_LOG_LEVEL", help="debug, info, warning or error")
    ] = "info",
    log_format: Annotated[
        str, typer.Option(envvar="CHATSTREAM_LOG_FORMAT", help="text, or json (one object a line)")
    ] = "text",
) -> None:
    """Run the HTTP server. Every other setting reads a CHATSTREAM_* variable (see the README)."""
    from chatstream.server.app import create_app
    from chatstream.server.protocol import uvicorn_config
    from chatstream.server.runtime import runs_location

    if log_format not in ("text", "json"):
        raise typer.BadParameter("use text or json", param_hint="--log-format")
    logs.configure(log_level, log_format)
    try:
        settings = Settings.from_env(
            host=host,
            port=port,
            model=model,
            store=store,
            runs=runs,
            tools=tuple(tools.split(",")),
            mcp_config=mcp,
            system_prompt=system_prompt,
        )
        _check_agent(settings)
        runs_location(settings)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    application = create_app(settings)
    config = uvicorn_config(
        application,
        settings,
        log_level=log_level.lower(),
        log_config=None,  # keep the handlers logs.configure set up
        access_log=False,  # chatstream.http logs each request once, with more detail
        forwarded_allow_ips=forwarded_allow_ips,
    )
    server = _Server(config)
    server.run()
    if not server.started:
        raise typer.Exit(1)


def _check_agent(settings: Settings) -> None:
    """Refuse a bad tool reference, MCP config or prompt file now, before serving (exit 2)."""
    from chatstream.prompts import system_prompt_from
    from chatstream.tools.loading import load_tools

    load_tools(settings.tools)
    system_prompt_from(settings.system_prompt)
    if settings.mcp_config:
        from chatstream.tools.mcp import McpServers

        McpServers.from_file(settings.mcp_config)


@app.command()
def chat(
    url: Annotated[
        str, typer.Option(envvar="CHATSTREAM_URL", help="The chatstream server to talk to.")
    ] = "http://127.0.0.1:3002",
    session: Annotated[
        str | None,
        typer.Option(
            envvar="CHATSTREAM_SESSION", help="Continue this session id (default: a new one)."
        ),
    ] = None,
    no_tools: Annotated[
        bool,
        typer.Option(
            "--no-tools", envvar="CHATSTREAM_NO_TOOLS", help="Do not let the model use tools."
        ),
    ] = False,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="CHATSTREAM_API_KEY", help="API key, when the server wants one."),
    ] = None,
    # No environment variable on purpose: approving everything is said each time.
    yes: Annotated[
        bool,
        typer.Option(
            "--yes",
            help="Approve every tool call that needs approval, without asking. Otherwise "
            "a terminal asks y/N, and piped input declines them.",
        ),
    ] = False,
) -> None:
    """Chat in the terminal: tokens as they come, a live line per running tool.

    Commands: /new (a new session), /history (this session so far), /exit. Ctrl-C
    stops the answer being written without leaving the chat. A tool call that needs
    approval is asked about (y/N) first.
    """
    from chatstream.terminal import run_chat

    raise typer.Exit(
        run_chat(
            url,
            session_id=session,
            enable_tools=not no_tools,
            api_key=api_key,
            approve_all=yes,
        )
    )


@app.command("hash-key")
def hash_key(
    key: Annotated[str, typer.Argument(help="The API key to hash (read from stdin when '-').")],
) -> None:
    """Print the SHA-256 digest of an API key, a line for CHATSTREAM_API_KEYS_FILE."""
    from chatstream.server.auth import digest

    if key == "-":
        key = sys.stdin.readline().strip()
    typer.echo(digest(key))


def main() -> None:
    app()
