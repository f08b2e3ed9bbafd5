"""What every endpoint that starts or streams a turn shares: who calls, and a turn within limits.

The native stream (``routes.py``) and the frontends' protocols (``ui_stream.py``,
``agui.py``) start turns and open streams the same way: one caller dependency, one
validation of a turn's message and session id, one start that counts against the
caller's rate and stream slots.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from chatstream.errors import ErrorCode, InvalidRequest, MessageTooLong, Refused
from chatstream.messages import encodable
from chatstream.runlog import Reader
from chatstream.runs import Run, new_session_id
from chatstream.server.auth import Caller
from chatstream.server.runtime import runtime_of

__all__ = [
    "SESSION_ID",
    "CallerDep",
    "acquire_slot",
    "start_turn",
    "validate_session_id",
    "validate_turn",
]

_bearer = HTTPBearer(
    auto_error=False,
    description="An API key, when the server has keys (also accepted as ?access_token=).",
)
SESSION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_DOT_SEGMENTS = frozenset({".", ".."})


async def _caller(
    request: Request,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    return runtime_of(request).keys.caller(request)


CallerDep = Annotated[Caller, Depends(_caller)]
"""Who sends the request, resolved once; 401 for a missing or wrong key."""


async def require_run_of(request: Request, caller: Caller, run_id: str, session_id: str) -> None:
    """400 when ``run_id`` is a run of another of the caller's sessions than ``session_id``.

    A frontend's approval answer names both the chat and the run; one that names a run
    of another chat would continue it under the wrong chat's name.
    """
    status = await runtime_of(request).runs.status(run_id, caller=caller.id)
    if status is not None and status.session.id != session_id:
        raise InvalidRequest(
            f"Run {run_id!r} belongs to another session than {session_id!r}: answer it there."
        )


async def start_turn(
    request: Request,
    caller: Caller,
    text: str | None,
    session_id: str,
    enable_tools: bool,
    *,
    regenerate: bool = False,
) -> tuple[Run, Callable[[], None]]:
    """Start a turn within the caller's limits; the run, and the release of its slot.

    A streamed and a non-streamed turn count alike: one turn against the rate, one slot
    against the open-stream limits while the caller waits for it.
    """
    runtime = runtime_of(request)
    identity = caller.identity
    refund = runtime.turn_rate.check(identity)
    try:
        release = runtime.slots.acquire(identity)
    except Refused:
        refund()
        raise
    try:
        ref = caller.session(session_id)
        run = await runtime.runs.start(ref, text, enable_tools=enable_tools, regenerate=regenerate)
    except BaseException:
        # A turn refused here (busy session, store down) is not counted.
        release()
        refund()
        raise
    return run, release


def acquire_slot(request: Request, caller: Caller, reader: Reader) -> Callable[[], None]:
    """A stream slot for a reader of a run that is already going (a resume or a replay);
    the reader is closed when the caller has no slot left."""
    try:
        return runtime_of(request).slots.acquire(caller.identity)
    except Refused:
        reader.close()
        raise


def validate_session_id(session_id: str | None, *, field: str = "sessionId") -> str:
    """The session id, or a new one when absent; 400 for one of the wrong shape."""
    if session_id is None:
        return new_session_id()
    if not SESSION_ID.fullmatch(session_id):
        raise InvalidRequest(f"`{field}` must be 1-128 characters of [A-Za-z0-9._:-].")
    if session_id in _DOT_SEGMENTS:
        # A URL's path drops these ("/sessions/.." is "/"): the session could never be
        # read or deleted.
        raise InvalidRequest(f"`{field}` cannot be {session_id!r}: a URL cannot name it.")
    return session_id


def validate_turn(message: str | None, session_id: str | None, max_chars: int) -> tuple[str, str]:
    if message is None or not message.strip():
        raise InvalidRequest(
            "`message` is required and cannot be blank.", code=ErrorCode.MISSING_MESSAGE
        )
    if len(message) > max_chars:
        raise MessageTooLong(f"`message` has {len(message)} characters; the limit is {max_chars}.")
    if not encodable(message):
        # A lone surrogate that came in a part the request's schema does not check
        # (AG-UI's content parts): no store or stream could write it.
        raise InvalidRequest("`message` is not valid Unicode text (it holds a lone surrogate).")
    return message, validate_session_id(session_id)
