"""The MCP servers' config: the ``{"mcpServers": {...}}`` JSON that MCP clients share.

A server is stdio (``command``, ``args``, ``env``, ``cwd``) or Streamable HTTP (``url``,
``headers``); chatstream's own keys are ``approval``, ``timeoutS``, ``enabled`` and
``tools``. ``${VAR}`` (or ``${VAR:-default}``) in any string is read from the
environment. Anything else stops start-up with a message naming the file, the server,
the key and, for a missing variable, the variable.

Departures, on purpose: keys beside ``mcpServers`` at the top belong to other clients
sharing the file and are ignored; ``type`` (``stdio``, ``http``, ``streamable-http``),
which some clients write, is taken when it agrees with the other keys; ``sse``, the
transport the spec deprecated, is refused with a message that says so.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast
from urllib.parse import urlsplit

Approval = Literal["always", "never", "unless-read-only"] | frozenset[str]

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_COMMON = {"approval", "timeoutS", "enabled", "tools", "type"}
_STDIO = {"command", "args", "env", "cwd"}
_HTTP = {"url", "headers"}


def _q(text: str) -> str:
    """A key or value as JSON writes it, the way the user typed it in the file."""
    return json.dumps(text, ensure_ascii=False)


class McpConfigError(ValueError):
    """The MCP config cannot be used; the message names what is wrong and where."""


@dataclass(frozen=True, slots=True)
class StdioTransport:
    """Run ``command`` with ``args`` and talk to it over its stdin and stdout."""

    command: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] | None = None
    cwd: str | None = None


@dataclass(frozen=True, slots=True)
class HttpTransport:
    """Talk Streamable HTTP to ``url``, sending ``headers`` with each request."""

    url: str
    headers: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """One MCP server: how to reach it, and what chatstream makes of its tools."""

    name: str
    transport: StdioTransport | HttpTransport
    approval: Approval = "unless-read-only"
    timeout_s: float = 20.0
    enabled: bool = True
    # Offer only these of its tools (the server's own names); None: all of them.
    tools: frozenset[str] | None = None

    def needs_approval(self, tool: str, *, read_only: bool) -> bool:
        """Whether a person says yes before ``tool`` (the server's name for it) runs."""
        if isinstance(self.approval, frozenset):
            return tool in self.approval
        if self.approval == "unless-read-only":
            return not read_only
        return self.approval == "always"


def load_config(
    path: str | os.PathLike[str],
    *,
    environ: Mapping[str, str] | None = None,
    default_timeout_s: float = 20.0,
) -> list[ServerConfig]:
    """Read and check the config file at ``path``."""
    where = os.fspath(path)
    try:
        with open(where, encoding="utf-8") as file:
            text = file.read()
    except OSError as exc:
        raise McpConfigError(f"cannot read the MCP config {where}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise McpConfigError(
            f"the MCP config {where} is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    return parse_config(data, environ=environ, default_timeout_s=default_timeout_s, origin=where)


def parse_config(
    data: object,
    *,
    environ: Mapping[str, str] | None = None,
    default_timeout_s: float = 20.0,
    origin: str = "the MCP config",
) -> list[ServerConfig]:
    """Check a parsed config (``{"mcpServers": {...}}``) and expand its variables."""
    env = os.environ if environ is None else environ
    if not isinstance(data, dict) or "mcpServers" not in data:
        raise McpConfigError(f'{origin}: expected an object with "mcpServers"')
    servers = data["mcpServers"]
    if not isinstance(servers, dict):
        raise McpConfigError(f'{origin}: "mcpServers" must be an object of servers by name')
    return [
        _server(name, entry, env, default_timeout_s, f"{origin}: server {_q(name)}")
        for name, entry in servers.items()
    ]


def _server(
    name: str, entry: object, env: Mapping[str, str], default_timeout_s: float, where: str
) -> ServerConfig:
    if not name.strip():
        raise McpConfigError(f"{where}: a server needs a name")
    if not isinstance(entry, dict):
        raise McpConfigError(f"{where}: expected an object")
    unknown = sorted(set(entry) - _COMMON - _STDIO - _HTTP)
    if unknown:
        known = ", ".join(sorted(_COMMON - {"type"} | _STDIO | _HTTP))
        raise McpConfigError(f"{where}: unknown key {_q(unknown[0])} (known: {known})")
    read = _Reader(entry, env, where)
    kind = read.text("type")
    if kind == "sse":
        raise McpConfigError(
            f"{where}: the SSE transport is not supported (deprecated by MCP); "
            "use the server's Streamable HTTP endpoint"
        )
    if kind not in (None, "stdio", "http", "streamable-http"):
        raise McpConfigError(f'{where}: "type" must be "stdio" or "http", not {_q(kind)}')
    has_command, has_url = "command" in entry, "url" in entry
    if has_command == has_url:
        raise McpConfigError(f'{where}: give either "command" (stdio) or "url" (HTTP)')
    transport: StdioTransport | HttpTransport
    if has_command:
        if kind not in (None, "stdio"):
            raise McpConfigError(f'{where}: "type" is {_q(kind)} but the server has a "command"')
        _refuse(entry, _HTTP, "a stdio", where)
        command = read.text("command")
        if not command:
            raise McpConfigError(f'{where}: "command" must not be empty')
        transport = StdioTransport(
            command=command,
            args=tuple(read.texts("args") or ()),
            env=read.mapping("env"),
            cwd=read.text("cwd"),
        )
    else:
        if kind == "stdio":
            raise McpConfigError(f'{where}: "type" is "stdio" but the server has a "url"')
        _refuse(entry, _STDIO, "an HTTP", where)
        url = read.text("url") or ""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise McpConfigError(
                f'{where}: "url" must be an http:// or https:// URL, not {_q(url)}'
            )
        transport = HttpTransport(url=url, headers=read.mapping("headers"))
    tools = read.texts("tools")
    return ServerConfig(
        name=name,
        transport=transport,
        approval=read.approval(),
        timeout_s=read.seconds("timeoutS", default_timeout_s),
        enabled=read.flag("enabled", True),
        tools=frozenset(tools) if tools is not None else None,
    )


def _refuse(entry: dict[str, Any], keys: set[str], kind: str, where: str) -> None:
    for key in sorted(keys & set(entry)):
        raise McpConfigError(f"{where}: {_q(key)} does not apply to {kind} server")


class _Reader:
    """Typed reads of one server's keys, each failure naming the key."""

    def __init__(self, entry: dict[str, Any], env: Mapping[str, str], where: str) -> None:
        self._entry, self._env, self._where = entry, env, where

    def _fail(self, key: str, expected: str) -> McpConfigError:
        return McpConfigError(f"{self._where}: {_q(key)} must be {expected}")

    def _expand(self, key: str, value: str) -> str:
        def substitute(match: re.Match[str]) -> str:
            variable, default = match.group(1), match.group(2)
            found = self._env.get(variable)
            if found is not None and (found or default is None):
                return found
            if default is not None:
                return default
            raise McpConfigError(
                f"{self._where}: {_q(key)} uses ${{{variable}}}, "
                "which is not set in the environment"
            )

        return _VARIABLE.sub(substitute, value)

    def text(self, key: str) -> str | None:
        value = self._entry.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self._fail(key, "a string")
        return self._expand(key, value)

    def texts(self, key: str) -> list[str] | None:
        value = self._entry.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._fail(key, "a list of strings")
        return [self._expand(key, v) for v in value]

    def mapping(self, key: str) -> dict[str, str] | None:
        value = self._entry.get(key)
        if value is None:
            return None
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise self._fail(key, "an object of strings")
        return {k: self._expand(f"{key}.{k}", v) for k, v in value.items()}

    def seconds(self, key: str, default: float) -> float:
        value = self._entry.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise self._fail(key, "a number of seconds above 0")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self._entry.get(key, default)
        if not isinstance(value, bool):
            raise self._fail(key, "true or false")
        return value

    def approval(self) -> Approval:
        value = self._entry.get("approval", "unless-read-only")
        if isinstance(value, str) and value in ("always", "never", "unless-read-only"):
            return cast(Approval, value)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return frozenset(self._expand("approval", v) for v in value)
        raise self._fail(
            "approval", '"always", "never", "unless-read-only" or a list of tool names'
        )
