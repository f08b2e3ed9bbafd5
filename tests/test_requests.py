"""Bad input is refused before any stream starts, with a JSON error body."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from chatstream.config import Settings
from chatstream.server.app import create_app


def error_of(response: httpx.Response) -> str:
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert set(body) == {"error"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    code: str = body["error"]["code"]
    return code


@pytest.mark.parametrize(
    ("method", "kwargs", "status", "code"),
    [
        ("GET", {"params": {}}, 400, "MISSING_MESSAGE"),
        ("GET", {"params": {"message": "   "}}, 400, "MISSING_MESSAGE"),
        ("POST", {"json": {}}, 400, "MISSING_MESSAGE"),
        ("POST", {"json": {"sessionId": "a"}}, 400, "MISSING_MESSAGE"),
        ("GET", {"params": {"message": "hi", "sessionId": "bad id!"}}, 400, "INVALID_REQUEST"),
        ("POST", {"json": {"message": "hi", "sessionId": "x" * 129}}, 400, "INVALID_REQUEST"),
        ("POST", {"json": {"message": "hi", "sessionId": ""}}, 400, "INVALID_REQUEST"),
        ("GET", {"params": {"message": "hi", "enableTools": "maybe"}}, 400, "INVALID_REQUEST"),
        ("POST", {"json": {"message": 42}}, 400, "INVALID_REQUEST"),
        ("POST", {"json": {"message": "hi", "extra": 1}}, 400, "INVALID_REQUEST"),
        (
            "POST",
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            400,
            "INVALID_REQUEST",
        ),
        ("POST", {"json": ["a list"]}, 400, "INVALID_REQUEST"),
        ("GET", {"params": {"message": "x" * 40_000}}, 413, "MESSAGE_TOO_LONG"),
        ("POST", {"json": {"message": "x" * 40_000}}, 413, "MESSAGE_TOO_LONG"),
        (
            "GET",
            {"params": {"message": "hi"}, "headers": {"Last-Event-ID": "nonsense"}},
            400,
            "INVALID_REQUEST",
        ),
        # A seq too long to be one of ours (Python refuses to parse over 4,300 digits).
        (
            "GET",
            {"headers": {"Last-Event-ID": "run_0123456789abcdef:" + "9" * 5000}},
            400,
            "INVALID_REQUEST",
        ),
        (
            "POST",
            {"params": {"lastEventId": "run_0123456789abcdef:" + "9" * 19}, "json": {}},
            400,
            "INVALID_REQUEST",
        ),
        # Lone surrogates, as JSON escapes: no UTF-8 writer can store or stream them.
        *(
            (
                "POST",
                {"content": body, "headers": {"content-type": "application/json"}},
                400,
                "INVALID_REQUEST",
            )
            for body in (
                b'{"message": "hi \\ud800"}',
                b'{"message": "\\udfff tail"}',
                b'{"message": "hi", "sessionId": "s\\ud800"}',
            )
        ),
        # Ids that a URL's path drops: such a session could never be read or deleted.
        *(
            ("POST", {"json": {"message": "hi", "sessionId": dots}}, 400, "INVALID_REQUEST")
            for dots in (".", "..")
        ),
    ],
)
async def test_bad_stream_requests_get_a_json_error(
    client: httpx.AsyncClient, method: str, kwargs: dict[str, Any], status: int, code: str
) -> None:
    response = await client.request(method, "/api/chat/stream", **kwargs)
    assert response.status_code == status
    assert error_of(response) == code


async def test_unknown_session_is_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/chat/sessions/nobody")
    assert response.status_code == 404
    assert error_of(response) == "SESSION_NOT_FOUND"
    response = await client.delete("/api/chat/sessions/nobody")
    assert response.status_code == 404
    assert error_of(response) == "SESSION_NOT_FOUND"


async def test_unknown_route_and_method_are_json_errors(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/nothing-here")
    assert response.status_code == 404
    assert error_of(response) == "NOT_FOUND"
    response = await client.put("/api/chat/stream")
    assert response.status_code == 405
    assert error_of(response) == "METHOD_NOT_ALLOWED"


async def test_cancel_of_an_unknown_run_is_404(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/chat/runs/run_0123456789abcdef/cancel")
    assert response.status_code == 404
    assert error_of(response) == "RUN_NOT_FOUND"


@pytest.mark.parametrize("path", ["/api/chat/stream", "/api/chat"])
async def test_a_lone_surrogate_is_refused_before_the_turn_starts(
    client: httpx.AsyncClient, path: str
) -> None:
    body = b'{"message": "hi \\ud800", "sessionId": "surrogate"}'
    response = await client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert error_of(response) == "INVALID_REQUEST"
    assert "Unicode" in response.json()["error"]["message"]
    # Nothing ran and nothing was stored: the session does not exist.
    assert (await client.get("/api/chat/sessions/surrogate")).status_code == 404
    ok = await client.post(path, json={"message": "hi", "sessionId": "surrogate"})
    assert ok.status_code == 200


@pytest.mark.parametrize(
    "event_id", ["no-such-run:3", "run_0123456789abcdef:0", "run_0123456789abcdef:17"]
)
async def test_resuming_a_run_that_does_not_exist_is_204(
    client: httpx.AsyncClient, event_id: str
) -> None:
    response = await client.get("/api/chat/stream", headers={"Last-Event-ID": event_id})
    assert response.status_code == 204
    response = await client.get("/api/chat/stream", params={"lastEventId": event_id})
    assert response.status_code == 204


async def test_the_docs_page_needs_no_network(client: httpx.AsyncClient) -> None:
    for page in ("/docs", "/redoc"):
        html = (await client.get(page)).text
        assets = re.findall(r'(?:src|href)="([^"]+)"', html) + re.findall(r"url: '([^']+)'", html)
        assert assets, page
        for url in assets:
            assert url.startswith("/"), f"{page} loads {url} from elsewhere"
            assert (await client.get(url)).status_code == 200, url


def test_the_openapi_document_lists_the_refusals_the_server_gives() -> None:
    document = create_app(Settings(model="scripted")).openapi()
    paths = document["paths"]
    for path, operations in paths.items():
        for method, operation in operations.items():
            responses = operation["responses"]
            # A request that does not fit its schema is a 400 with the error body, never
            # FastAPI's 422.
            assert "422" not in responses, (method, path)
            if path.startswith("/api/") and path != "/api/health":
                assert "401" in responses, (method, path)
    stream = paths["/api/chat/stream"]["get"]["responses"]
    assert {"400", "409", "413", "429", "503"} <= set(stream)
    frame = stream["200"]["content"]["text/event-stream"]["schema"]
    assert "approval_required" in frame["properties"]["event"]["enum"]
    assert re.fullmatch(frame["properties"]["id"]["pattern"], "run_0123456789abcdef:0")
    assert frame["required"] == ["id"]  # the opening frame has no event and no data
    assert "503" in paths["/api/health"]["get"]["responses"]
    assert "HTTPValidationError" not in document["components"]["schemas"]
