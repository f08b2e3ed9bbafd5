"""The request log line: secrets hidden in every body and query, its size bounded."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator

import httpx
import pytest

from chatstream.config import Settings
from tests.support.server import LiveServer, live_server

SECRET = "sk-live-0123456789abcdefSECRET"
LIMIT = 512
# Method, status, duration and the stream's figures around the bounded parts.
OVERHEAD = 200
JSON = {"content-type": "application/json"}


@pytest.fixture
def logged(settings: Settings) -> Iterator[LiveServer]:
    with live_server(settings.with_(log_body_bytes=LIMIT)) as live:
        yield live


async def request_lines(caplog: pytest.LogCaptureFixture, count: int) -> list[str]:
    """The ``count`` request log lines, once the server's thread has written them.

    The line is written when the response is over, so it may follow the client's read.
    """
    deadline = time.monotonic() + 5
    while True:
        lines = [r.getMessage() for r in caplog.records if r.name == "chatstream.http"]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        await asyncio.sleep(0.01)


async def test_a_large_json_body_shows_no_secret(
    logged: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="chatstream.http")
    # Larger than the log keeps of it, so the kept part no longer parses as JSON.
    first = {"api_key": SECRET, "message": "x" * 5000}
    # The log keeps LIMIT bytes: the cut falls ten characters into the secret's value.
    padding = "y" * (LIMIT - len('{"message":"","password":"') - 10)
    cut_inside = {"message": padding, "password": SECRET}
    async with httpx.AsyncClient(base_url=logged.url, timeout=30) as http:
        for body in (first, cut_inside):
            compact = json.dumps(body, separators=(",", ":"))
            await http.post("/api/chat", content=compact, headers=JSON)
    lines = await request_lines(caplog, 2)
    assert len(lines) == 2
    for line in lines:
        assert SECRET[:8] not in line
        assert len(line) < LIMIT + OVERHEAD
    assert '"api_key":"[redacted]"' in lines[0].replace(" ", "")


async def test_a_form_encoded_body_shows_no_secret(
    logged: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="chatstream.http")
    form = f"message=hi&api_key={SECRET}&pad=" + "z" * 5000
    async with httpx.AsyncClient(base_url=logged.url, timeout=30) as http:
        await http.post(
            "/api/chat",
            content=form,
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
    (line,) = await request_lines(caplog, 1)
    assert SECRET[:8] not in line
    assert "api_key=[redacted]" in line


async def test_a_huge_query_gives_a_bounded_line(
    logged: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="chatstream.http")
    async with httpx.AsyncClient(base_url=logged.url, timeout=30) as http:
        response = await http.get("/api/health", params={"pad": "q" * 60_000})
        assert response.status_code == 200
    (line,) = await request_lines(caplog, 1)
    assert line.startswith("GET /api/health?pad=qqq")
    assert len(line) < LIMIT + OVERHEAD


async def test_secrets_in_a_cut_query_stay_hidden(
    logged: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="chatstream.http")
    # The secret straddles the cut, and a percent-encoded key is a key all the same.
    query = (
        f"message={'m' * (LIMIT - 30)}&access_token={SECRET}&pad={'p' * 60_000}&api%5Fkey={SECRET}"
    )
    async with httpx.AsyncClient(base_url=logged.url, timeout=30) as http:
        await http.get(f"/api/health?{query}")
        await http.get(f"/api/health?api%5Fkey={SECRET}&token={SECRET}")
    cut, short = await request_lines(caplog, 2)
    assert len(cut) < LIMIT + OVERHEAD
    assert SECRET[:8] not in cut
    assert SECRET[:8] not in short
    assert "api%5Fkey=[redacted]&token=[redacted]" in short


async def test_a_body_cannot_forge_log_lines(
    logged: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="chatstream.http")
    forged = "not json\n2099-01-01T00:00:00 INFO chatstream.http: GET /admin 200 0.1ms"
    async with httpx.AsyncClient(base_url=logged.url, timeout=30) as http:
        await http.post("/api/chat", content=forged, headers={"content-type": "text/plain"})
        await http.get("/api/chat/sessions/a%0D%0A2099-01-01T00:00:00%20INFO%20forged")
    for line in await request_lines(caplog, 2):
        assert "\n" not in line
        assert "\r" not in line
