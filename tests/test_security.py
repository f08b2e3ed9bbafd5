"""With API keys configured, every endpoint refuses the wrong caller; limits hold."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from chatstream.config import Settings
from chatstream.server.auth import digest
from tests.fakes.open_meteo import run_fake_open_meteo
from tests.fakes.openai_upstream import Completion, FakeOpenAI
from tests.support.process import server_process
from tests.support.server import LiveServer, live_server
from tests.support.sse import stream

KEY_A = "sk-alpha-0123456789"
KEY_B = "sk-bravo-9876543210"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}


@pytest.fixture
def keyed(settings: Settings, tmp_path: Path) -> Iterator[LiveServer]:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# bravo\n{digest(KEY_B)}\n")
    with live_server(
        settings.with_(model="scripted:20", api_keys=(KEY_A,), api_keys_file=str(keys_file))
    ) as live:
        yield live


PROTECTED = [
    ("GET", "/api/chat/stream?message=hi"),
    ("POST", "/api/chat/stream"),
    ("POST", "/api/chat"),
    ("GET", "/api/chat/sessions"),
    ("GET", "/api/chat/sessions/s1"),
    ("DELETE", "/api/chat/sessions/s1"),
    ("GET", "/api/chat/runs/run_0123456789abcdef"),
    ("POST", "/api/chat/runs/run_0123456789abcdef/cancel"),
    ("GET", "/api/tools"),
    ("GET", "/metrics"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
async def test_every_endpoint_refuses_a_missing_or_wrong_key(
    keyed: LiveServer, method: str, path: str
) -> None:
    async with httpx.AsyncClient(base_url=keyed.url) as http:
        for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": KEY_A}):
            response = await http.request(method, path, headers=headers, json={"message": "hi"})
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "UNAUTHORIZED"
            assert response.headers["www-authenticate"].startswith("Bearer")


async def test_health_and_page_stay_open_and_keys_work(keyed: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=keyed.url) as http:
        assert (await http.get("/api/health")).status_code == 200
        assert (await http.get("/")).status_code == 200
        assert (await http.get("/api/tools", headers=A)).status_code == 200
        assert (await http.get("/api/tools", headers=B)).status_code == 200
        # EventSource cannot send headers: the key may ride in the query string.
        result = await stream(
            http, "GET", "/api/chat/stream", params={"message": "hi", "access_token": KEY_B}
        )
        assert result.types[-1] == "done"


async def test_sessions_and_runs_belong_to_the_key_that_made_them(keyed: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=keyed.url, timeout=30) as http:
        params = {"message": "count to 300", "sessionId": "mine"}
        first = await stream(
            http, "GET", "/api/chat/stream", params=params, headers=A, max_events=3
        )
        run_id = (first.frames[0].id or "").split(":")[0]
        # B cannot resume, inspect or cancel A's run: it does not exist for B.
        resumed = await http.get("/api/chat/stream", headers={**B, "Last-Event-ID": f"{run_id}:1"})
        assert resumed.status_code == 204
        assert (await http.get(f"/api/chat/runs/{run_id}", headers=B)).status_code == 404
        assert (await http.post(f"/api/chat/runs/{run_id}/cancel", headers=B)).status_code == 404
        # B's session of the same name is B's own: not busy, separate history.
        theirs = await stream(
            http,
            "GET",
            "/api/chat/stream",
            params={"message": "hi", "sessionId": "mine"},
            headers=B,
        )
        assert theirs.data[-1]["historyLength"] == 2
        # A's run went on regardless; A can stop it.
        stopped = await http.post(f"/api/chat/runs/{run_id}/cancel", headers=A)
        assert stopped.json()["cancelled"] is True
        a_session = (await http.get("/api/chat/sessions/mine", headers=A)).json()
        b_session = (await http.get("/api/chat/sessions/mine", headers=B)).json()
        assert a_session["messages"][0]["content"] == "count to 300"
        assert b_session["messages"][0]["content"] == "hi"
        listed = (await http.get("/api/chat/sessions", headers=B)).json()
        assert [s["sessionId"] for s in listed["sessions"]] == ["mine"]
        assert listed["sessions"][0]["title"] == "hi"
        # B deleting "mine" deletes B's, never A's.
        assert (await http.delete("/api/chat/sessions/mine", headers=B)).status_code == 200
        assert (await http.get("/api/chat/sessions/mine", headers=A)).status_code == 200
        assert (await http.delete("/api/chat/sessions/mine", headers=B)).status_code == 404


async def test_a_flood_of_turns_is_rate_limited_without_starving_other_keys(
    settings: Settings,
) -> None:
    limited = settings.with_(api_keys=(KEY_A, KEY_B), turns_per_minute=5)
    with live_server(limited) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
            statuses = []
            for i in range(12):
                response = await http.post(
                    "/api/chat", json={"message": "hi", "sessionId": f"f{i}"}, headers=A
                )
                statuses.append(response.status_code)
                if response.status_code == 429:
                    assert response.json()["error"]["code"] == "RATE_LIMITED"
                    assert int(response.headers["retry-after"]) >= 1
            assert statuses == [200] * 5 + [429] * 7
            # The other key is untouched by A's flood.
            other = await http.post("/api/chat", json={"message": "hi"}, headers=B)
            assert other.status_code == 200


async def test_open_streams_are_limited_per_caller(settings: Settings) -> None:
    with live_server(settings.with_(model="scripted:50", max_streams_per_key=2)) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
            running = [
                asyncio.create_task(
                    stream(http, "GET", "/api/chat/stream", params={"message": "count to 20"})
                )
                for _ in range(2)
            ]
            await asyncio.sleep(0.3)
            third = await http.get("/api/chat/stream", params={"message": "count to 20"})
            assert third.status_code == 429
            assert third.json()["error"]["code"] == "TOO_MANY_STREAMS"
            assert all(r.types[-1] == "done" for r in await asyncio.gather(*running))
            # Slots come back when streams end.
            again = await stream(http, "GET", "/api/chat/stream", params={"message": "hi"})
            assert again.types[-1] == "done"


async def test_oversized_bodies_are_refused(settings: Settings) -> None:
    with live_server(settings.with_(max_body_bytes=1000)) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
            big = await http.post("/api/chat/stream", json={"message": "x" * 2000})
            assert big.status_code == 413
            assert big.json()["error"]["code"] == "REQUEST_TOO_LARGE"

            async def chunked() -> object:
                for _ in range(20):
                    yield b'{"message": "' + b"y" * 100

            sneaky = await http.post(
                "/api/chat", content=chunked(), headers={"content-type": "application/json"}
            )
            assert sneaky.status_code == 413


def test_idle_and_slow_loris_connections_are_closed(settings: Settings) -> None:
    with live_server(settings.with_(header_timeout_s=0.5)) as live:
        port = int(live.url.rsplit(":", 1)[1])
        for opening in (b"", b"GET /api/health HTTP/1.1\r\nHost: x\r\n"):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(opening)
                sock.settimeout(5)
                started = time.monotonic()
                assert sock.recv(100) == b""  # closed by the server, no response
                assert time.monotonic() - started < 2


async def test_secrets_never_show_in_logs_health_or_openapi(tmp_path: Path) -> None:
    args = ("--model", "scripted", "--store", f"sqlite:///{tmp_path / 'c.db'}")
    provider_key = "sk-provider-SECRET-42"
    env = {"CHATSTREAM_API_KEYS": KEY_A, "OPENAI_API_KEY": provider_key}
    with server_process(*args, "--log-level", "debug", env=env) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            await stream(
                http, "GET", "/api/chat/stream", params={"message": "hi", "access_token": KEY_A}
            )
            await http.post("/api/chat", json={"message": "hi", "password": "hunter2"}, headers=A)
            await http.get("/api/tools", headers={"Authorization": "Bearer sk-wrong-key"})
            health = (await http.get("/api/health")).text
            openapi = (await http.get("/openapi.json")).text
        server.terminate()
        log = server.output()
    for secret in (KEY_A, provider_key, "hunter2", "sk-wrong-key"):
        assert secret not in log
        assert secret not in health
        assert secret not in openapi
    assert "access_token=%5Bredacted%5D" in log or "access_token=[redacted]" in log


async def test_history_is_trimmed_for_the_model_but_kept_in_storage(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeOpenAI() as upstream:
        monkeypatch.setenv("OPENAI_BASE_URL", upstream.url)
        trimmed = settings.with_(model="openai:fake", max_history_messages=4)
        with live_server(trimmed) as live:
            async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
                for i in range(4):
                    upstream.enqueue(Completion(text=[f"answer {i}"]))
                    await http.post("/api/chat", json={"message": f"turn {i}", "sessionId": "t"})
                session = (await http.get("/api/chat/sessions/t")).json()
        sent = upstream.requests[-1].body["messages"]
    assert [m["content"] for m in sent] == [
        sent[0]["content"],  # the system prompt
        "turn 1", "answer 1", "turn 2", "answer 2", "turn 3",
    ]  # fmt: skip
    assert session["historyLength"] == 8


async def test_tool_rounds_per_turn_are_limited(settings: Settings) -> None:
    with run_fake_open_meteo() as weather:
        one_round = settings.with_(
            max_tool_rounds=1,
            weather_geocoding_url=weather.geocoding_url,
            weather_forecast_url=weather.forecast_url,
        )
        with live_server(one_round) as live:
            async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
                result = await stream(
                    http, "GET", "/api/chat/stream", params={"message": "서울 날씨를 화씨로"}
                )
    # The scripted model would convert in a second round; it is offered no tools there.
    assert [c["tool"] for c in result.of("tool_call")] == ["get_weather"]
    assert result.types[-1] == "done"


async def test_calculate_input_and_result_sizes_are_limited(settings: Settings) -> None:
    small = settings.with_(calculate_max_chars=20, calculate_max_result_chars=10)
    with live_server(small) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
            long_input = await stream(
                http, "GET", "/api/chat/stream", params={"message": "what is " + "1+" * 20 + "1?"}
            )
            big_result = await stream(
                http, "GET", "/api/chat/stream", params={"message": "what is 99999*99999*99?"}
            )
    assert "too long" in long_input.of("tool_result")[0]["result"]
    assert long_input.of("tool_result")[0]["isError"] is True
    assert "too long" in big_result.of("tool_result")[0]["result"]


def test_hash_key_prints_the_digest_a_keys_file_takes() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "chatstream", "hash-key", KEY_B],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == digest(KEY_B)


async def test_refused_turns_do_not_count_against_the_rate(settings: Settings) -> None:
    with live_server(settings.with_(model="scripted:30", turns_per_minute=3)) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
            running = asyncio.create_task(
                stream(
                    http,
                    "GET",
                    "/api/chat/stream",
                    params={"message": "count to 20", "sessionId": "r"},
                )
            )
            await asyncio.sleep(0.2)
            for _ in range(5):  # busy, so refused with 409: none of these is a turn
                busy = await http.get(
                    "/api/chat/stream", params={"message": "hi", "sessionId": "r"}
                )
                assert busy.status_code == 409
            await running
            for i in range(2):
                ok = await http.post("/api/chat", json={"message": "hi", "sessionId": f"o{i}"})
                assert ok.status_code == 200
            limited = await http.post("/api/chat", json={"message": "hi"})
            assert limited.status_code == 429
