"""The OpenAPI document, made to say what the server answers.

FastAPI documents ``422 HTTPValidationError`` for every operation with parameters, but
chatstream answers a request that does not fit its schema with ``400 INVALID_REQUEST`` and
the error body every refusal has (``server/errors.py``); and ``401 UNAUTHORIZED`` applies
to every endpoint under ``/api`` but health once API keys are configured. ``describe``
rewrites the generated document once, when it is first asked for.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}
_INVALID = {
    "description": "INVALID_REQUEST: the request does not fit its schema",
    "content": _ERROR,
}
_UNAUTHORIZED = {
    "description": "UNAUTHORIZED: API keys are configured and none of them was given",
    "content": _ERROR,
}
# Open to anyone even with keys: a load balancer's probe, and the chat page.
_OPEN = frozenset({"/api/health"})


def describe(app: FastAPI) -> None:
    """Have ``app.openapi()`` return the rewritten document."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _rewrite(generate())
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _rewrite(document: dict[str, Any]) -> None:
    for path, operations in document.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            if responses.pop("422", None) is not None:
                responses.setdefault("400", _INVALID)
            if path.startswith("/api/") and path not in _OPEN:
                responses.setdefault("401", _UNAUTHORIZED)
    schemas = document.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
