"""Exceptions raised by chatstream, and the one vocabulary of error codes.

Every code a client can see, as an ``error`` event or in a refusal's JSON body
``{"error": {"code", "message"}}``, is an ``ErrorCode``. The core raises the
exceptions below, which carry a code and a plain message but no HTTP status: the
HTTP edge alone (``chatstream.server.errors``) maps each exception to a status, in
one table. One root, a shallow tree::

    ChatstreamError                 anything chatstream raises          INTERNAL_ERROR
    ├── ModelError                  the LLM provider failed             MODEL_ERROR
    │   └── ModelTimeout            … by not answering in time          TIMEOUT
    ├── ToolError                   a tool could not do its job         TOOL_ERROR (in a
    │                                                                   tool_result, isError)
    ├── StoreError                  the session store failed            STORE_UNAVAILABLE
    └── Refused                     a request refused before a stream   (code varies)
        ├── InvalidRequest          malformed input                     INVALID_REQUEST,
        │                                                               MISSING_MESSAGE
        ├── MessageTooLong          the message is over its limit       MESSAGE_TOO_LONG
        ├── Unauthorized            a missing or wrong API key          UNAUTHORIZED
        ├── NotFound                no such session, run or approval    SESSION_NOT_FOUND,
        │                           (or not the caller's)               RUN_NOT_FOUND,
        │                                                               APPROVAL_NOT_FOUND
        ├── SessionBusy             a turn is already running there     SESSION_BUSY
        ├── ApprovalAnswered        the call was answered, or expired   APPROVAL_ANSWERED
        ├── RateLimited             too many turns or open streams      RATE_LIMITED,
        │                                                               TOO_MANY_STREAMS
        ├── ServerBusy              the server's stream limit           SERVER_BUSY
        ├── ShuttingDown            the server takes no new turns       SHUTTING_DOWN
        └── ClientGone              the caller hung up before the end   CLIENT_GONE

In-stream codes (an ``error`` event ends the stream; the turn is stored as
interrupted): ``MODEL_ERROR``, ``TIMEOUT`` (the provider did not answer in time, or
the turn ran past its limit: the message says which), ``CANCELLED``,
``SHUTTING_DOWN``, ``OUTPUT_LIMIT``, ``RUN_LOST``, ``MODEL_BUSY``, ``INTERNAL_ERROR``.
Codes the HTTP layer gives before the application runs: ``HEADERS_TOO_LARGE``,
``INVALID_HOST``, ``FORBIDDEN_ORIGIN``, ``REQUEST_TOO_LARGE``, ``REQUEST_TIMEOUT``,
``NOT_FOUND``, ``METHOD_NOT_ALLOWED``, ``UNSUPPORTED_MEDIA_TYPE``, ``HTTP_ERROR``.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """Every error code on the wire: in ``error`` events and in refusals' bodies."""

    # Refusals of a request, before any stream starts.
    INVALID_REQUEST = "INVALID_REQUEST"
    MISSING_MESSAGE = "MISSING_MESSAGE"
    MESSAGE_TOO_LONG = "MESSAGE_TOO_LONG"
    UNAUTHORIZED = "UNAUTHORIZED"
    SESSION_NOT_FOUND = "SESSION_NOT_FOUND"
    RUN_NOT_FOUND = "RUN_NOT_FOUND"
    SESSION_BUSY = "SESSION_BUSY"
    APPROVAL_NOT_FOUND = "APPROVAL_NOT_FOUND"
    APPROVAL_ANSWERED = "APPROVAL_ANSWERED"
    RATE_LIMITED = "RATE_LIMITED"
    TOO_MANY_STREAMS = "TOO_MANY_STREAMS"
    SERVER_BUSY = "SERVER_BUSY"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    STORE_UNAVAILABLE = "STORE_UNAVAILABLE"
    CLIENT_GONE = "CLIENT_GONE"
    # Refusals by the HTTP layer, before the application sees the request.
    HEADERS_TOO_LARGE = "HEADERS_TOO_LARGE"
    INVALID_HOST = "INVALID_HOST"
    FORBIDDEN_ORIGIN = "FORBIDDEN_ORIGIN"
    REQUEST_TOO_LARGE = "REQUEST_TOO_LARGE"
    REQUEST_TIMEOUT = "REQUEST_TIMEOUT"
    NOT_FOUND = "NOT_FOUND"
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
    UNSUPPORTED_MEDIA_TYPE = "UNSUPPORTED_MEDIA_TYPE"
    HTTP_ERROR = "HTTP_ERROR"
    # The end of a turn that failed, as its stream's ``error`` event.
    MODEL_ERROR = "MODEL_ERROR"
    TIMEOUT = "TIMEOUT"
    CANCELLED = "CANCELLED"
    OUTPUT_LIMIT = "OUTPUT_LIMIT"
    RUN_LOST = "RUN_LOST"
    MODEL_BUSY = "MODEL_BUSY"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    # A tool's failure, as a ``tool_result`` with ``isError`` (never a stream's end).
    TOOL_ERROR = "TOOL_ERROR"


class ChatstreamError(Exception):
    """Root of every chatstream exception: a code and a message a client may read."""

    code: ErrorCode = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class ModelError(ChatstreamError):
    """The model provider failed: HTTP error, dropped connection, bad stream."""

    code = ErrorCode.MODEL_ERROR


class ModelTimeout(ModelError):
    """The model provider did not answer in time."""

    code = ErrorCode.TIMEOUT


class ToolError(ChatstreamError):
    """A tool failed in a way its caller should read (unknown place, bad zone...)."""

    code = ErrorCode.TOOL_ERROR


class StoreError(ChatstreamError):
    """The session store (or the shared run state) could not read or write."""

    code = ErrorCode.STORE_UNAVAILABLE


class Refused(ChatstreamError):
    """A request refused before any stream starts; ``retry_after_s`` when waiting helps."""

    def __init__(
        self, message: str, *, code: ErrorCode | None = None, retry_after_s: int | None = None
    ) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class InvalidRequest(Refused):
    """The request's input is malformed or out of bounds."""

    code = ErrorCode.INVALID_REQUEST


class MessageTooLong(Refused):
    """The user's message is longer than the server takes."""

    code = ErrorCode.MESSAGE_TOO_LONG


class Unauthorized(Refused):
    """The request carries no API key, or one the server does not know."""

    code = ErrorCode.UNAUTHORIZED


class NotFound(Refused):
    """No such session or run, or it belongs to another caller."""

    code = ErrorCode.SESSION_NOT_FOUND


class SessionBusy(Refused):
    """A turn is already running in the session."""

    code = ErrorCode.SESSION_BUSY


class ApprovalAnswered(Refused):
    """The call was already answered (or its approval expired): one answer decides it."""

    code = ErrorCode.APPROVAL_ANSWERED


class RateLimited(Refused):
    """The caller started too many turns, or has too many streams open."""

    code = ErrorCode.RATE_LIMITED


class ServerBusy(Refused):
    """The server has as many streams open as it takes."""

    code = ErrorCode.SERVER_BUSY


class ShuttingDown(Refused):
    """The server is draining and takes no new turns."""

    code = ErrorCode.SHUTTING_DOWN


class ClientGone(Refused):
    """The caller hung up before its answer was ready (only the request log sees this)."""

    code = ErrorCode.CLIENT_GONE
