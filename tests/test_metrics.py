"""/metrics tells an operator what the server is doing, in Prometheus's text format."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import orjson

from tests.support.process import server_process
from tests.support.sse import stream


def sample(text: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name) + (re.escape("{" + labels + "}") if labels else "") + r" ([0-9.e+]+)"
    match = re.search(r"^" + pattern + r"$", text, re.M)
    assert match, f"{name}{{{labels}}} not in /metrics"
    return float(match.group(1))


async def test_metrics_count_turns_tokens_tools_and_errors(client: httpx.AsyncClient) -> None:
    await stream(client, "GET", "/api/chat/stream", params={"message": "count to 7"})
    await stream(client, "GET", "/api/chat/stream", params={"message": "what is 6*7?"})
    await stream(client, "GET", "/api/chat/stream", params={"message": "weather in Paris"})
    await stream(client, "GET", "/api/chat/stream", params={"message": "simulate a model error"})
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert sample(text, "chatstream_runs_total", 'outcome="done"') == 3
    assert sample(text, "chatstream_runs_total", 'outcome="model_error"') == 1
    assert sample(text, "chatstream_model_errors_total") == 1
    assert sample(text, "chatstream_tool_calls_total", 'outcome="ok",tool="calculate"') == 1
    assert sample(text, "chatstream_tool_calls_total", 'outcome="error",tool="get_weather"') == 1
    assert sample(text, "chatstream_tokens_out_total") >= 7 + 2
    assert sample(text, "chatstream_time_to_first_token_seconds_count") == 4
    assert sample(text, "chatstream_turn_duration_seconds_count") == 4
    assert sample(text, "chatstream_active_runs") == 0
    assert sample(text, "chatstream_active_streams") == 0


async def test_json_logs_have_one_object_per_request(tmp_path: Path) -> None:
    args = ("--model", "scripted", "--store", f"sqlite:///{tmp_path / 'c.db'}")
    with server_process(*args, "--log-format", "json") as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            await stream(http, "GET", "/api/chat/stream", params={"message": "count to 3"})
            await http.post("/api/chat", json={"message": "hi", "apiKey": "sk-secret-value"})
        server.terminate()
        lines = [
            orjson.loads(line) for line in server.output().splitlines() if line.startswith("{")
        ]
    requests = [e for e in lines if e["logger"] == "chatstream.http"]
    stream_line = next(e for e in requests if "/api/chat/stream" in e["message"])
    assert "events=4" in stream_line["message"] and "first_event=" in stream_line["message"]
    post_line = next(e for e in requests if e["message"].startswith("POST /api/chat "))
    assert "sk-secret-value" not in post_line["message"]
    assert "[redacted]" in post_line["message"]
    assert {"time", "level", "logger", "message"} <= set(stream_line)
