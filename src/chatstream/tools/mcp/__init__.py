"""Tools from MCP servers: the config, one server's connection, and the set of servers.

``McpServers.from_file(path)`` reads and checks a ``{"mcpServers": {...}}`` config
(``McpConfigError`` names what is wrong); ``start()`` connects to every server in
parallel; ``tools()`` is a live ``ToolSource`` for the registry; ``status()`` is what
health shows; ``close()`` stops them all. The ``mcp`` SDK is imported by ``start()``.
"""

from __future__ import annotations

from chatstream.tools.mcp.config import McpConfigError, ServerConfig
from chatstream.tools.mcp.servers import McpServers

__all__ = ["McpConfigError", "McpServers", "ServerConfig"]
