"""Settings: one frozen object, filled from ``CHATSTREAM_*`` environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from typing import Any

DEFAULT_GEOCODING_URL = "https://geocoding-api.open-meteo.com/v1/search"
DEFAULT_FORECAST_URL = "https://api.open-meteo.com/v1/forecast"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the server can be told; each field reads ``CHATSTREAM_<NAME>``."""

    host: str = "127.0.0.1"
    port: int = 3002
    model: str = "local"
    store: str = "sqlite:///chatstream.db"
    # Streams
    heartbeat_s: float = 15.0
    retry_ms: int = 3000
    resume_grace_s: float = 30.0
    run_ttl_s: float = 300.0
    run_log_max_events: int = 50_000
    shutdown_grace_s: float = 10.0
    lock_ttl_s: float = 10.0
    # Turns
    max_tool_rounds: int = 5
    turn_timeout_s: float = 600.0
    tool_timeout_s: float = 20.0
    max_message_chars: int = 32_000
    max_body_bytes: int = 256 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    max_history_messages: int = 200
    # Tools
    calculate_max_chars: int = 500
    calculate_max_result_chars: int = 1002
    weather_geocoding_url: str = DEFAULT_GEOCODING_URL
    weather_forecast_url: str = DEFAULT_FORECAST_URL
    # Who may call, and how much
    api_keys: tuple[str, ...] = ()
    api_keys_file: str = ""
    max_streams_per_key: int = 20
    max_streams_total: int = 5000
    turns_per_minute: int = 60
    # HTTP
    cors_origins: tuple[str, ...] = ()
    # Host names (no port) a loopback-bound server answers to besides localhost,
    # 127.0.0.1 and [::1]: a name a proxy forwards, say (DNS rebinding guard).
    allowed_hosts: tuple[str, ...] = ()
    log_body_bytes: int = 2048
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then ``CHATSTREAM_*`` variables, then explicit overrides (CLI options)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "extra":
                continue
            raw = env.get(f"CHATSTREAM_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            values[f.name] = _coerce(f.name, f.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)


def _coerce(name: str, kind: Any, raw: str) -> Any:
    kind = str(kind)
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind.startswith("tuple"):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"CHATSTREAM_{name.upper()}={raw!r} is not a valid {kind}") from None
    return raw
