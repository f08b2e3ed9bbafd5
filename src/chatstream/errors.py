"""Exceptions raised by chatstream.

One root, a shallow tree; every exception carries a stable ``code`` that the
server puts on the wire (an ``error`` event, or a JSON error body)::

    ChatstreamError
    ├── ModelError          the LLM provider failed            MODEL_ERROR
    │   └── ModelTimeout    … by not answering in time         TIMEOUT
    ├── ToolError           a tool could not do its job        (a tool_result with isError)
    ├── StoreError          the session store failed           STORE_ERROR
    └── RequestError        a request refused before a stream  (4xx, code varies)
"""

from __future__ import annotations


class ChatstreamError(Exception):
    """Root of every chatstream exception."""

    code = "INTERNAL_ERROR"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ModelError(ChatstreamError):
    """The model provider failed: HTTP error, dropped connection, bad stream."""

    code = "MODEL_ERROR"


class ModelTimeout(ModelError):
    """The model provider did not answer in time."""

    code = "TIMEOUT"


class ToolError(ChatstreamError):
    """A tool failed in a way its caller should read (unknown place, bad zone...)."""

    code = "TOOL_ERROR"


class StoreError(ChatstreamError):
    """The session store could not read or write."""

    code = "STORE_ERROR"


class RequestError(ChatstreamError):
    """A request refused before any stream starts; rendered as a JSON error body."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.headers = headers or {}
