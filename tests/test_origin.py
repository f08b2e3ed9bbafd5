"""Who may reach a server from a browser: the Host rule on loopback, cross-site refusals."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from chatstream.config import Settings
from tests.support.process import server_process
from tests.support.server import LiveServer, live_server

EVIL = "https://evil.example"
APP = "https://app.example"


def port_of(live: LiveServer) -> int:
    return int(live.url.rsplit(":", 1)[1])


def assert_refused(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["message"]


async def request_lines(caplog: pytest.LogCaptureFixture, count: int) -> list[str]:
    """The request log lines, once ``count`` are in: each follows its response."""
    deadline = time.monotonic() + 5
    while True:
        lines = [r.getMessage() for r in caplog.records if r.name == "chatstream.http"]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        await asyncio.sleep(0.01)


@pytest.fixture
def cors(settings: Settings) -> Iterator[LiveServer]:
    with live_server(settings.with_(cors_origins=(APP,))) as live:
        yield live


async def test_a_loopback_server_answers_only_to_its_own_host_names(
    settings: Settings,
) -> None:
    with live_server(settings.with_(allowed_hosts=("chat.example", "*.lan.example"))) as live:
        port = port_of(live)
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
            # A page on a rebound name reads nothing: not the API, not the page.
            for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example"):
                for path in ("/api/chat/sessions", "/", "/api/health"):
                    refused = await http.get(path, headers={"Host": host})
                    assert_refused(refused, 400, "INVALID_HOST")
            for host in (
                f"localhost:{port}",
                "LOCALHOST",
                f"127.0.0.1:{port}",
                f"[::1]:{port}",
                "chat.example:8443",
                "box.lan.example",
            ):
                ok = await http.get("/api/chat/sessions", headers={"Host": host})
                assert ok.status_code == 200, host


async def test_cross_site_turns_and_changes_are_refused_and_nothing_runs(
    server: LiveServer, client: httpx.AsyncClient
) -> None:
    port = port_of(server)
    kept = await client.post("/api/chat", json={"message": "hi", "sessionId": "keep"})
    assert kept.status_code == 200
    cross_site = {"Sec-Fetch-Site": "cross-site"}
    attempts = [
        # <img src=http://127.0.0.1:PORT/api/chat/stream?message=…> on another site.
        ("GET", "/api/chat/stream?message=hi&sessionId=x1", cross_site),
        ("GET", "/api/chat/stream?message=hi&sessionId=x2", {"Sec-Fetch-Site": "same-site"}),
        ("POST", "/api/chat", {"Origin": EVIL}),
        ("POST", "/api/chat", {"Origin": EVIL, "Sec-Fetch-Site": "same-origin"}),
        ("POST", "/api/chat/stream", {"Origin": "null"}),
        ("POST", "/api/chat", {"Origin": f"http://127.0.0.1:{port + 1}"}),
        ("POST", "/api/chat", {"Origin": f"https://127.0.0.1:{port}"}),
        ("DELETE", "/api/chat/sessions/keep", cross_site),
        ("POST", "/api/chat/runs/run_0123456789abcdef/cancel", {"Origin": EVIL}),
    ]
    for method, path, headers in attempts:
        body = {"message": "hi", "sessionId": "x3"} if method == "POST" else None
        refused = await client.request(method, path, headers=headers, json=body)
        assert_refused(refused, 403, "FORBIDDEN_ORIGIN")
    listed = (await client.get("/api/chat/sessions", headers=cross_site)).json()
    assert [s["sessionId"] for s in listed["sessions"]] == ["keep"]
    assert (await client.get("/api/chat/sessions/keep")).json()["historyLength"] == 2
    # The page's own requests, an address typed in the bar, and non-browser clients pass.
    for headers in (
        {"Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"},
        {"Origin": f"http://localhost:{port}", "Host": f"localhost:{port}"},
        {"Sec-Fetch-Site": "same-origin"},
        {"Sec-Fetch-Site": "none"},
        {},
    ):
        ok = await client.post("/api/chat", headers=headers, json={"message": "hi"})
        assert ok.status_code == 200, headers


async def test_allowed_cors_origins_start_turns_and_preflights_answer_json(
    cors: LiveServer,
) -> None:
    async with httpx.AsyncClient(base_url=cors.url, timeout=30) as http:
        preflight = {
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        }
        allowed = await http.options("/api/chat", headers={"Origin": APP, **preflight})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == APP
        resume = await http.options(
            "/api/chat/stream",
            headers={
                "Origin": APP,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "last-event-id",
            },
        )
        assert resume.status_code == 200
        turn = await http.post(
            "/api/chat",
            headers={"Origin": APP, "Sec-Fetch-Site": "cross-site"},
            json={"message": "hi"},
        )
        assert turn.status_code == 200
        assert turn.headers["access-control-allow-origin"] == APP

        other = await http.options("/api/chat", headers={"Origin": EVIL, **preflight})
        assert_refused(other, 403, "FORBIDDEN_ORIGIN")
        assert "access-control-allow-origin" not in other.headers
        method = await http.options(
            "/api/chat", headers={"Origin": APP, "Access-Control-Request-Method": "PUT"}
        )
        assert_refused(method, 400, "INVALID_REQUEST")
        assert "method" in method.json()["error"]["message"]
        refused = await http.post("/api/chat", headers={"Origin": EVIL}, json={"message": "hi"})
        assert_refused(refused, 403, "FORBIDDEN_ORIGIN")


async def test_refusals_are_logged(server: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="chatstream.http")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        await http.get("/api/health", headers={"Host": "evil.example"})
        await http.post("/api/chat", headers={"Origin": EVIL}, json={"message": "hi"})
    lines = await request_lines(caplog, 2)
    assert lines[0].startswith("GET /api/health 400 ")
    assert lines[1].startswith("POST /api/chat 403 ")


async def test_a_server_bound_beyond_loopback_takes_any_host_but_no_cross_site_turn(
    tmp_path: Path,
) -> None:
    args = ("--host", "0.0.0.0", "--model", "scripted", "--store", f"sqlite:///{tmp_path / 'c.db'}")
    with server_process(*args) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            named = await http.get("/api/chat/sessions", headers={"Host": "chat.example.com"})
            assert named.status_code == 200
            own = await http.post(
                "/api/chat",
                headers={"Host": "chat.example.com", "Origin": "http://chat.example.com"},
                json={"message": "hi"},
            )
            assert own.status_code == 200
            refused = await http.post(
                "/api/chat",
                headers={"Host": "chat.example.com", "Origin": EVIL},
                json={"message": "hi"},
            )
            assert_refused(refused, 403, "FORBIDDEN_ORIGIN")
