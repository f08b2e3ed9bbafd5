"""Settings: one frozen object of small typed groups, filled from ``CHATSTREAM_*`` variables.

Each field of a group reads ``CHATSTREAM_<FIELD>`` (``CHATSTREAM_HEARTBEAT_S`` fills
``Settings.streams.heartbeat_s``), so field names are unique across groups. A value is
parsed by its field's type (integers, numbers, booleans, comma-separated lists, text),
and one that does not parse stops start-up with an error naming the variable.
``Settings.with_(name=value)`` takes the same flat names.
"""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any

DEFAULT_GEOCODING_URL = "https://geocoding-api.open-meteo.com/v1/search"
DEFAULT_FORECAST_URL = "https://api.open-meteo.com/v1/forecast"


@dataclass(frozen=True, slots=True)
class StreamSettings:
    """How streams and runs behave: heartbeats, resume, how long runs are kept."""

    heartbeat_s: float = 15.0
    retry_ms: int = 3000
    resume_grace_s: float = 30.0
    run_ttl_s: float = 300.0
    run_log_max_events: int = 50_000
    shutdown_grace_s: float = 10.0
    lock_ttl_s: float = 10.0


@dataclass(frozen=True, slots=True)
class TurnSettings:
    """What one turn may take: rounds, time, message size, history shown to the model."""

    max_tool_rounds: int = 5
    turn_timeout_s: float = 600.0
    max_message_chars: int = 32_000
    max_history_messages: int = 200
    # How long a call that needs a person's yes waits for it before it is declined.
    approval_timeout_s: float = 600.0


@dataclass(frozen=True, slots=True)
class ToolSettings:
    """What the tools are given: their time limit, bounds, and the weather service."""

    tool_timeout_s: float = 20.0
    # A longer result is cut: the model reads every stored result on each later turn.
    tool_max_result_chars: int = 100_000
    calculate_max_chars: int = 500
    calculate_max_result_chars: int = 1002
    weather_geocoding_url: str = DEFAULT_GEOCODING_URL
    weather_forecast_url: str = DEFAULT_FORECAST_URL


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """The HTTP edge: body bounds, slow clients, browsers' origins and hosts, the log."""

    max_body_bytes: int = 256 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    cors_origins: tuple[str, ...] = ()
    # Host names (no port) a loopback-bound server answers to besides localhost,
    # 127.0.0.1 and [::1]: a name a proxy forwards, say (DNS rebinding guard).
    allowed_hosts: tuple[str, ...] = ()
    log_body_bytes: int = 2048


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """How much one caller may take: open streams and turns per minute (0: no limit)."""

    max_streams_per_key: int = 20
    max_streams_total: int = 5000
    turns_per_minute: int = 60


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """API keys: in the variable itself, or as SHA-256 digests in a file."""

    api_keys: tuple[str, ...] = ()
    api_keys_file: str = ""


_GROUPS = {
    "streams": StreamSettings,
    "turns": TurnSettings,
    "tooling": ToolSettings,
    "http": HttpSettings,
    "limits": LimitSettings,
    "auth": AuthSettings,
}


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the server can be told; each field reads ``CHATSTREAM_<NAME>``."""

    host: str = "127.0.0.1"
    port: int = 3002
    model: str = "local"
    store: str = "sqlite:///chatstream.db"
    # Where runs, locks, approvals and the stop button are shared between instances:
    # ``redis://…``. Empty: in this process, or with a Redis store, that same Redis.
    runs: str = ""
    # The agent: which tools (``builtin`` and ``module:attribute`` references), MCP servers
    # (a JSON file) and system prompt (text, or ``@path`` of a file; empty: the default).
    tools: tuple[str, ...] = ("builtin",)
    mcp_config: str = ""
    system_prompt: str = ""
    streams: StreamSettings = field(default_factory=StreamSettings)
    turns: TurnSettings = field(default_factory=TurnSettings)
    tooling: ToolSettings = field(default_factory=ToolSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then ``CHATSTREAM_*`` variables, then explicit overrides (CLI options)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, kind in _flat_fields().items():
            raw = env.get(f"CHATSTREAM_{name.upper()}")
            if raw is None or raw == "":
                continue
            values[name] = parse(name, kind, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls().with_(**values)

    def with_(self, **changes: Any) -> Settings:
        """A copy with fields changed, by their flat names (``heartbeat_s=1``) or by group."""
        top: dict[str, Any] = {}
        grouped: dict[str, dict[str, Any]] = {}
        owners = _owners()
        for name, value in changes.items():
            if name in _TOP_LEVEL or name in _GROUPS:
                top[name] = value
            elif name in owners:
                grouped.setdefault(owners[name], {})[name] = value
            else:
                raise TypeError(f"Settings has no field {name!r}")
        for group, values in grouped.items():
            top[group] = replace(top.get(group, getattr(self, group)), **values)
        return replace(self, **top)


_TOP_LEVEL = ("host", "port", "model", "store", "runs", "tools", "mcp_config", "system_prompt")


def _owners() -> dict[str, str]:
    """Each grouped field's name, and the group it belongs to."""
    return {f.name: group for group, kind in _GROUPS.items() for f in fields(kind)}


def _flat_fields() -> dict[str, Any]:
    """Every field a variable fills, by its flat name, with its type."""
    kinds: dict[str, Any] = {
        name: kind for name, kind in typing.get_type_hints(Settings).items() if name in _TOP_LEVEL
    }
    for group in _GROUPS.values():
        kinds.update(typing.get_type_hints(group))
    return kinds


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def parse(name: str, kind: Any, raw: str) -> Any:
    """``raw`` as a value of ``kind``; ``ValueError`` naming ``CHATSTREAM_<NAME>`` otherwise."""
    variable = f"CHATSTREAM_{name.upper()}"
    text = raw.strip()
    if kind is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError(f"{variable}={raw!r} is not a boolean: use true or false (1 or 0)")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{variable}={raw!r} is not a whole number") from None
    if kind is float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{variable}={raw!r} is not a number") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{variable}={raw!r} is not a finite number")
        return value
    if typing.get_origin(kind) is tuple:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return raw
