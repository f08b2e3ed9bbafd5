"""The HTTP edge of errors: each exception's status, in one table, and the JSON body.

The core raises ``chatstream.errors`` exceptions, which carry a code and a message
but no status; ``status_of`` is the only place that knows which status each one
gets (httpx's ``map_httpcore_exceptions`` is the shape). Every refusal, validation
failure and crash is rendered as ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from chatstream.errors import (
    ApprovalAnswered,
    ChatstreamError,
    ClientGone,
    ErrorCode,
    InvalidRequest,
    MessageTooLong,
    ModelError,
    NotFound,
    RateLimited,
    Refused,
    ServerBusy,
    SessionBusy,
    ShuttingDown,
    StoreError,
    Unauthorized,
)

log = logging.getLogger("chatstream.http")

# The first class in an exception's method resolution order that is listed here gives
# its status: a subclass with a status of its own is listed before its base.
STATUS: dict[type[ChatstreamError], int] = {
    InvalidRequest: 400,
    MessageTooLong: 413,
    Unauthorized: 401,
    NotFound: 404,
    SessionBusy: 409,
    ApprovalAnswered: 409,
    RateLimited: 429,
    ClientGone: 499,
    ServerBusy: 503,
    ShuttingDown: 503,
    StoreError: 503,
    ModelError: 502,
    Refused: 400,
}

# How long a caller should wait before retrying, when the exception does not say.
_RETRY_AFTER_S: dict[type[ChatstreamError], int] = {
    ServerBusy: 5,
    ShuttingDown: 5,
    StoreError: 5,
}

# A non-streaming turn that failed: the status for its ``error`` event's code.
TURN_FAILURE_STATUS: dict[str, int] = {
    ErrorCode.MODEL_ERROR: 502,
    ErrorCode.TIMEOUT: 502,
    ErrorCode.CANCELLED: 409,
    ErrorCode.SHUTTING_DOWN: 503,
}

# Starlette's own refusals (routing, FastAPI's parsing) by status.
_HTTP_CODES: dict[int, ErrorCode] = {
    400: ErrorCode.INVALID_REQUEST,
    401: ErrorCode.UNAUTHORIZED,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    413: ErrorCode.REQUEST_TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    429: ErrorCode.RATE_LIMITED,
}


def status_of(exc: ChatstreamError) -> int:
    """The HTTP status of a refusal or failure raised by the core."""
    for kind in type(exc).__mro__:
        status = STATUS.get(kind)
        if status is not None:
            return status
    return 500


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """``{"error": {"code", "message"}}`` with a status."""
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


def refusal(exc: ChatstreamError) -> JSONResponse:
    """The response for a core exception: its status, code, message and headers."""
    headers: dict[str, str] = {}
    wait = exc.retry_after_s if isinstance(exc, Refused) else None
    if wait is None:
        wait = next((s for k, s in _RETRY_AFTER_S.items() if isinstance(exc, k)), None)
    if wait is not None:
        headers["Retry-After"] = str(max(wait, 1))
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="chatstream"'
    return error_response(status_of(exc), exc.code, exc.message, headers or None)


def _names_a_place(part: object) -> bool:
    """Whether a part of a validation error's location names a field, header or index.

    Pydantic also puts the body itself ("body") there and, for a field of several types,
    the type that was tried ("function-after[_encodable(), str]"): words for its own
    tracebacks, not for a client.
    """
    return part != "body" and not (isinstance(part, str) and "[" in part)


def install(app: FastAPI) -> None:
    """Render every refusal, validation failure and crash as a JSON error."""

    @app.exception_handler(StoreError)
    async def store_error(request: Request, exc: StoreError) -> JSONResponse:
        # The store's own words (a host, a port, a driver's message) go to the log only.
        log.warning("store failed on %s %s: %s", request.method, request.url.path, exc.message)
        return refusal(StoreError("The session store is unavailable; try again shortly."))

    @app.exception_handler(ChatstreamError)
    async def chatstream_error(_: Request, exc: ChatstreamError) -> JSONResponse:
        return refusal(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems: dict[str, None] = {}  # in order, once each
        for error in exc.errors():
            location = ".".join(str(part) for part in error.get("loc", ()) if _names_a_place(part))
            problems[f"{location}: {error['msg']}" if location else str(error["msg"])] = None
        return refusal(InvalidRequest("; ".join(problems) or "invalid request"))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, ErrorCode.HTTP_ERROR)
        headers = dict(exc.headers) if exc.headers else None
        return error_response(exc.status_code, code, str(exc.detail), headers)

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(
            500, ErrorCode.INTERNAL_ERROR, "The server failed to handle the request."
        )
