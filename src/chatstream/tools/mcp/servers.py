"""The configured MCP servers together: a live source of tools for the registry.

Servers start in parallel and ``start()`` returns once each is ready or has failed (or
after a bounded wait): a slow or broken server delays start-up by at most that wait and
never stops it. Each keeps (re)connecting in the background; its tools are offered
while it is ready and absent while it is not.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Self

from chatstream.tools.base import Tool
from chatstream.tools.mcp.config import McpConfigError, ServerConfig, load_config, parse_config

if TYPE_CHECKING:
    from chatstream.tools.mcp.connection import McpConnection

log = logging.getLogger("chatstream.mcp")

START_WAIT_S = 15.0


class McpServers:
    """Every enabled server of one config: start, their tools, their state, close."""

    def __init__(
        self, servers: Iterable[ServerConfig], *, start_wait_s: float = START_WAIT_S
    ) -> None:
        self._configs = [s for s in servers if s.enabled]
        self._start_wait_s = start_wait_s
        self._connections: dict[str, McpConnection] = {}
        self._clashes: set[str] = set()  # names two servers offer, said once each
        _check_prefixes(self._configs)

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        *,
        environ: Mapping[str, str] | None = None,
        default_timeout_s: float = 20.0,
        start_wait_s: float = START_WAIT_S,
    ) -> McpServers:
        """The servers of the config file at ``path``; ``McpConfigError`` when it is wrong."""
        configs = load_config(path, environ=environ, default_timeout_s=default_timeout_s)
        return cls(configs, start_wait_s=start_wait_s)

    @classmethod
    def from_config(
        cls,
        data: object,
        *,
        environ: Mapping[str, str] | None = None,
        default_timeout_s: float = 20.0,
        start_wait_s: float = START_WAIT_S,
    ) -> McpServers:
        """The servers of an already parsed config (``{"mcpServers": {...}}``)."""
        configs = parse_config(data, environ=environ, default_timeout_s=default_timeout_s)
        return cls(configs, start_wait_s=start_wait_s)

    async def start(self) -> None:
        """Start every server at once; return when each is ready or failed, or the wait ends."""
        # The SDK costs half a second to import: only a server that uses MCP pays it.
        from chatstream.tools.mcp.connection import McpConnection

        for config in self._configs:
            if config.name not in self._connections:
                connection = McpConnection(config)
                self._connections[config.name] = connection
                connection.start()
        waits = [c.settled() for c in self._connections.values()]
        try:
            async with asyncio.timeout(self._start_wait_s):
                await asyncio.gather(*waits)
        except TimeoutError:
            pass  # the slow ones go on starting in the background

    def tools(self) -> list[Tool]:
        """The tools of the servers that are ready now, each name once: the first
        server's ("a" with tool "b__c" and "a__b" with tool "c" both make "a__b__c")."""
        found: dict[str, Tool] = {}
        for connection in self._connections.values():
            for t in connection.tools():
                if t.name not in found:
                    found[t.name] = t
                elif t.name not in self._clashes:
                    self._clashes.add(t.name)
                    log.warning(
                        "MCP tool name %s is offered by %s and by %s; the second is left out",
                        t.name,
                        found[t.name].source,
                        t.source,
                    )
        return list(found.values())

    def status(self) -> dict[str, dict[str, object]]:
        """Each enabled server's state: ``{"status", "tools", "error"?}``."""
        return {
            config.name: (
                self._connections[config.name].status()
                if config.name in self._connections
                else {"status": "starting", "tools": 0}
            )
            for config in self._configs
        }

    async def close(self) -> None:
        """Stop every server (their processes end) and wait for it."""
        await asyncio.gather(*(c.close() for c in self._connections.values()))

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _check_prefixes(configs: list[ServerConfig]) -> None:
    """Two servers whose tools would get the same ``<server>__`` prefix are a config error."""
    seen: dict[str, str] = {}
    for config in configs:
        prefix = re.sub(r"[^A-Za-z0-9_-]", "_", config.name)
        if prefix in seen:
            raise McpConfigError(
                f"servers {seen[prefix]!r} and {config.name!r} would both name their tools "
                f"{prefix}__<tool>: rename one"
            )
        seen[prefix] = config.name
