"""Shared fixtures: a live server on loopback and an HTTP client; no internet."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatstream.config import Settings
from tests.support.postgres import PostgresServer, postgres_server
from tests.support.redis import RedisServer, redis_server
from tests.support.server import LiveServer, live_server

_LOOPBACK = ("127.0.0.1", "::1", "localhost")


@pytest.fixture(autouse=True)
def no_internet(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refuse any connection that is not to this machine."""
    real_connect = socket.socket.connect

    def guarded(sock: socket.socket, address: Any) -> Any:
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in _LOOPBACK and not host.startswith("127."):
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                raise ConnectionRefusedError(f"tests may not reach {host}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Scripted model, a fresh SQLite file, and weather endpoints that cannot be reached."""
    return Settings().with_(
        model="scripted",
        store=f"sqlite:///{tmp_path / 'chat.db'}",
        weather_geocoding_url="http://127.0.0.1:9/v1/search",
        weather_forecast_url="http://127.0.0.1:9/v1/forecast",
        tool_timeout_s=5.0,
    )


@pytest.fixture
def server(settings: Settings) -> Iterator[LiveServer]:
    with live_server(settings) as live:
        yield live


@pytest.fixture
async def client(server: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        yield http


@pytest.fixture(scope="session")
def redis_instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One Redis for the whole run (REDIS_URL, or a redis-server the suite starts)."""
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_url(redis_instance: RedisServer) -> str:
    """A Redis database emptied for this test."""
    redis_instance.flush()
    return redis_instance.url


@pytest.fixture(scope="session")
def postgres_instance() -> Iterator[PostgresServer]:
    """One PostgreSQL for the whole run (POSTGRES_URL, or a server the suite starts)."""
    with postgres_server() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_instance: PostgresServer) -> str:
    """A PostgreSQL database without chatstream's tables, for this test."""
    postgres_instance.flush()
    return postgres_instance.url


@pytest.fixture
def ran_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The file ``tests/support/approval_tools`` records each tool call that runs in (for
    servers in this process, and for server processes started after it)."""
    path = tmp_path / "ran.jsonl"
    monkeypatch.setenv("APPROVAL_TOOLS_LOG", str(path))
    return path
