"""Where request handlers find the running server's ``Runtime``."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from starlette.requests import Request

if TYPE_CHECKING:
    from chatstream.server.app import Runtime


def runtime_of(request: Request) -> Runtime:
    return cast("Runtime", request.app.state.runtime)
