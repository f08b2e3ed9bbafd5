"""The Vercel AI SDK's UI message stream: what ``useChat`` and ``DefaultChatTransport`` speak.

``POST /api/ui/chat`` takes the transport's body (``id`` = the session, ``messages``,
``trigger``), starts a turn from the last user message (the server keeps the history),
and streams the run as ``data: {chunk}`` lines ending with ``data: [DONE]``.
``GET /api/ui/chat/{id}/stream`` is the transport's reconnect: the session's active run
from its start, then live; ``204`` when none is active.

A run maps onto one assistant message whose id is the run id: ``start``, then per model
round ``start-step`` … ``finish-step`` with its text (``text-start`` / ``text-delta`` /
``text-end``) and tool calls (``tool-input-available``, ``tool-approval-request``,
``data-tool-progress`` with the call's id, ``tool-output-available`` or
``tool-output-error``), then ``finish``, or ``error`` and ``finish``.

Departures from what the SDK's own server writes, on purpose:

* Tools run on the server: ``tool-input-available`` says ``providerExecuted: true`` so a
  client's ``onToolCall`` is not asked to run them.
* A run that waits for a person ends its stream (``finish-step``, ``finish`` with
  ``finishReason: "tool-calls"``) while the run goes on waiting, because the SDK sends
  the answer in its next request. That request streams the run from where this one
  stopped, with a ``start-step`` of its own.
* ``error`` chunks carry the error's ``code`` beside ``errorText``; ``finish``'s metadata
  says the run's ``state`` (``done``, ``waiting``, ``failed``, ``cancelled``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from chatstream.errors import ApprovalAnswered, ErrorCode, InvalidRequest
from chatstream.events import (
    ApprovalRequired,
    Done,
    Error,
    Token,
    ToolCall,
    ToolProgress,
    ToolResult,
    dumps,
)
from chatstream.runlog import Entry, Reader
from chatstream.runs import is_run_id
from chatstream.server.auth import Caller
from chatstream.server.relay import DATA_EVENT_SCHEMA, Rounds
from chatstream.server.runtime import runtime_of
from chatstream.server.schemas import ErrorOut, Text
from chatstream.server.sse import EncodedStream
from chatstream.server.turns import (
    CallerDep,
    acquire_slot,
    require_run_of,
    start_turn,
    validate_session_id,
    validate_turn,
)

router = APIRouter(tags=["frontends"])
_DONE = b"data: [DONE]\n\n"
_TEXT_END = b'data: {"type":"text-end","id":"%s"}\n\n'
_START_STEP = b'data: {"type":"start-step"}\n\n'
_FINISH_STEP = b'data: {"type":"finish-step"}\n\n'


def _chunk(value: dict[str, Any]) -> bytes:
    return b"data: " + dumps(value) + b"\n\n"


class UIEncoder:
    """One run's entries as UI message stream chunks (see the module docstring).

    ``answered`` are the calls whose approval the request answered: their stream picks
    up where the one that asked for them stopped, and only a call answered elsewhere
    pauses it again.
    """

    def __init__(
        self,
        run_id: str,
        session_id: str,
        *,
        message_id: str | None = None,
        answered: frozenset[str] = frozenset(),
        continues: bool = False,
    ) -> None:
        self.run_id = run_id
        self.session_id = session_id
        self.message_id = message_id or run_id
        self.rounds = Rounds(answered)
        self._skipping = continues
        self._in_step = False
        self._texts = 0
        # While a text part is open: its id, and the bytes each delta of it starts with.
        self._text_id: bytes | None = None
        self._delta = b""
        self._ended = False

    @property
    def ended(self) -> bool:
        return self._ended

    def opening(self) -> bytes:
        metadata = {"sessionId": self.session_id, "runId": self.run_id}
        return _chunk({"type": "start", "messageId": self.message_id, "messageMetadata": metadata})

    def closing(self) -> bytes:
        return _DONE

    def encode(self, entries: Sequence[Entry]) -> bytes:
        out: list[bytes] = []
        if self._skipping:
            entries = self._skip(entries, out)
        append = out.append
        rounds = self.rounds
        for entry in entries:
            event = entry.event
            if type(event) is Token:
                if self._text_id is None:
                    self._open_text(append)
                append(self._delta + dumps(event.content) + b"}\n\n")
            elif isinstance(event, ToolCall):
                self._open_step(append)
                self._close_text(append)
                rounds.take(event)
                append(
                    _chunk(
                        {
                            "type": "tool-input-available",
                            "toolCallId": event.id,
                            "toolName": event.tool,
                            "input": event.args,
                            "providerExecuted": True,
                        }
                    )
                )
            elif isinstance(event, ApprovalRequired):
                rounds.take(event)
                append(
                    _chunk(
                        {
                            "type": "tool-approval-request",
                            "approvalId": event.id,
                            "toolCallId": event.id,
                        }
                    )
                )
            elif isinstance(event, ToolProgress):
                data: dict[str, Any] = {"tool": event.tool, "message": event.message}
                if event.progress is not None:
                    data["progress"] = event.progress
                append(_chunk({"type": "data-tool-progress", "id": event.id, "data": data}))
            elif isinstance(event, ToolResult):
                rounds.take(event)
                if event.is_error:
                    chunk: dict[str, Any] = {"type": "tool-output-error", "toolCallId": event.id}
                    chunk["errorText"] = event.result
                else:
                    chunk = {"type": "tool-output-available", "toolCallId": event.id}
                    chunk["output"] = event.result
                chunk["providerExecuted"] = True
                append(_chunk(chunk))
                if not rounds.open and self._in_step:
                    append(_FINISH_STEP)
                    self._in_step = False
            elif isinstance(event, Done | Error):
                self._end(event, append)
                break
        if not self._ended and rounds.paused:
            self._pause(append)
        return b"".join(out)

    def _skip(self, entries: Sequence[Entry], out: list[bytes]) -> Sequence[Entry]:
        """Follow the entries that the stream this one continues has sent; the rest."""
        rounds = self.rounds
        for index, entry in enumerate(entries):
            event = entry.event
            if type(event) is Token:
                if self._text_id is None:
                    self._texts += 1
                    self._text_id = b""
                continue
            if isinstance(event, Done | Error):
                self._skipping = False
                self._text_id = None
                return entries[index:]
            if isinstance(event, ToolCall):
                self._text_id = None
            rounds.take(event)
            if rounds.resumed_here:
                self._skipping = False
                self._in_step = True
                out.append(_START_STEP)
                return entries[index + 1 :]
        return ()

    def _open_step(self, append: Callable[[bytes], None]) -> None:
        if not self._in_step:
            self._in_step = True
            append(_START_STEP)

    def _open_text(self, append: Callable[[bytes], None]) -> None:
        self._open_step(append)
        self._texts += 1
        text_id = b"text-%d" % self._texts
        self._text_id = text_id
        self._delta = b'data: {"type":"text-delta","id":"' + text_id + b'","delta":'
        append(b'data: {"type":"text-start","id":"' + text_id + b'"}\n\n')

    def _close_text(self, append: Callable[[bytes], None]) -> None:
        if self._text_id is not None:
            append(_TEXT_END % self._text_id)
            self._text_id = None

    def _close_step(self, append: Callable[[bytes], None]) -> None:
        self._close_text(append)
        if self._in_step:
            append(_FINISH_STEP)
            self._in_step = False

    def _end(self, event: Done | Error, append: Callable[[bytes], None]) -> None:
        self._close_step(append)
        metadata: dict[str, Any] = {"sessionId": self.session_id, "runId": self.run_id}
        if isinstance(event, Done):
            metadata["state"] = "done"
            metadata["historyLength"] = event.history_length
            metadata["usage"] = event.usage
            append(_chunk({"type": "finish", "finishReason": "stop", "messageMetadata": metadata}))
        else:
            metadata["state"] = "cancelled" if event.code == ErrorCode.CANCELLED else "failed"
            metadata["code"] = event.code
            append(_chunk({"type": "error", "errorText": event.message, "code": event.code}))
            append(_chunk({"type": "finish", "finishReason": "error", "messageMetadata": metadata}))
        self._ended = True

    def _pause(self, append: Callable[[bytes], None]) -> None:
        # The run waits for a person: the SDK sends the answer in its next request.
        self._close_step(append)
        metadata = {"sessionId": self.session_id, "runId": self.run_id, "state": "waiting"}
        append(
            _chunk({"type": "finish", "finishReason": "tool-calls", "messageMetadata": metadata})
        )
        self._ended = True


# -- request bodies --------------------------------------------------------------------
# Only what chatstream reads is declared; every other field of the SDK's UIMessage (and
# whatever an application adds) is allowed and ignored.


class UIApprovalIn(BaseModel):
    """A tool part's approval: the SDK's ``addToolApprovalResponse`` fills it in."""

    model_config = ConfigDict(extra="allow")

    id: str
    approved: bool | None = None
    reason: Text | None = Field(default=None, max_length=2000)


class UIPartIn(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: Text | None = None
    toolCallId: str | None = None
    state: str | None = None
    approval: UIApprovalIn | None = None


class UIMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    role: Literal["system", "user", "assistant"]
    parts: list[UIPartIn]


class UIChatIn(BaseModel):
    """The body ``DefaultChatTransport`` sends."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "id": "user-123",
                    "messages": [
                        {
                            "id": "m1",
                            "role": "user",
                            "parts": [{"type": "text", "text": "What is 6 * 7?"}],
                        }
                    ],
                    "trigger": "submit-message",
                }
            ]
        },
    )

    id: Text = Field(description="The chat id: the session id (1-128 of [A-Za-z0-9._:-]).")
    messages: list[UIMessageIn] = Field(
        min_length=1,
        description="The chat's messages; the server keeps the history and reads the last.",
    )
    trigger: Literal["submit-message", "regenerate-message"]
    messageId: str | None = None


_STREAM: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The run as a UI message stream (`data: {chunk}` lines, then "
        "`data: [DONE]`).",
        "content": {"text/event-stream": {"schema": DATA_EVENT_SCHEMA}},
    },
    400: {"model": ErrorOut, "description": "INVALID_REQUEST or MISSING_MESSAGE"},
    409: {"model": ErrorOut, "description": "SESSION_BUSY"},
    413: {"model": ErrorOut, "description": "MESSAGE_TOO_LONG or REQUEST_TOO_LARGE"},
    429: {"model": ErrorOut, "description": "RATE_LIMITED, or too many open streams"},
}


@router.post(
    "/api/ui/chat",
    response_class=Response,
    response_model=None,
    responses=_STREAM,
    summary="A turn, or an approval's answer, in the Vercel AI SDK's UI message stream",
)
async def ui_chat(request: Request, caller: CallerDep, body: UIChatIn) -> Response:
    runtime = runtime_of(request)
    session_id = validate_session_id(body.id, field="id")
    last = body.messages[-1]
    if body.trigger == "regenerate-message":
        # The new answer replaces the last turn when it is stored, in the same write.
        run, release = await start_turn(request, caller, None, session_id, True, regenerate=True)
        return _response(request, run.log.reader(0), UIEncoder(run.id, session_id), release)
    if last.role == "user":
        text = "\n".join(p.text for p in last.parts if p.type == "text" and p.text)
        return await _new_turn(request, caller, session_id, text)
    answers = [
        (p.toolCallId, p.approval)
        for p in last.parts
        if p.state == "approval-responded"
        and p.toolCallId
        and p.approval is not None
        and p.approval.approved is not None
    ]
    if last.role != "assistant" or not answers:
        raise InvalidRequest(
            "`messages`: the last message must be the user's new message, or the assistant "
            "message whose tool parts answer approvals (state `approval-responded`)."
        )
    run_id = last.id if is_run_id(last.id) else None
    if run_id is not None:
        await require_run_of(request, caller, run_id, session_id)
    else:  # the chat's own active run, if any
        run_id = await runtime.runs.active_run_id(caller.session(session_id))
    if run_id is None:
        raise InvalidRequest(f"Message {last.id!r} names no run that waits for an approval.")
    continued: str | None = None
    for call_id, approval in answers:
        assert call_id is not None and approval is not None and approval.approved is not None
        try:
            outcome = await runtime.runs.answer(
                run_id,
                call_id,
                approved=approval.approved,
                reason=approval.reason,
                caller=caller.id,
            )
        except ApprovalAnswered:
            continue  # answered elsewhere (or expired): the stream shows how it went on
        continued = outcome.continued_run_id or continued
    stream_id = continued or run_id
    reader = await runtime.runs.open(stream_id, 0, caller=caller.id)
    if reader is None:
        return Response(status_code=204)
    encoder = UIEncoder(
        stream_id,
        session_id,
        message_id=last.id,
        answered=frozenset(call_id for call_id, _ in answers if call_id),
        continues=continued is None,
    )
    return _response(request, reader, encoder, acquire_slot(request, caller, reader))


@router.get(
    "/api/ui/chat/{chat_id}/stream",
    response_class=Response,
    response_model=None,
    responses={
        **_STREAM,
        204: {"description": "No run is active in that chat."},
    },
    summary="Resume a chat's active run (the transport's reconnectToStream), from its start",
)
async def ui_resume(
    request: Request,
    caller: CallerDep,
    chat_id: Annotated[str, Path(description="The chat id (the session id).")],
) -> Response:
    runs = runtime_of(request).runs
    session_id = validate_session_id(chat_id, field="id")
    run_id = await runs.active_run_id(caller.session(session_id))
    reader = await runs.open(run_id, 0, caller=caller.id) if run_id is not None else None
    if run_id is None or reader is None:
        return Response(status_code=204)
    release = acquire_slot(request, caller, reader)
    return _response(request, reader, UIEncoder(run_id, session_id), release)


async def _new_turn(request: Request, caller: Caller, session_id: str, text: str) -> EncodedStream:
    """A turn of ``text``, streamed from its start."""
    runtime = runtime_of(request)
    text, _ = validate_turn(text, session_id, runtime.settings.turns.max_message_chars)
    run, release = await start_turn(request, caller, text, session_id, True)
    return _response(request, run.log.reader(0), UIEncoder(run.id, session_id), release)


def _response(
    request: Request, reader: Reader, encoder: UIEncoder, release: Callable[[], None]
) -> EncodedStream:
    settings = runtime_of(request).settings
    return EncodedStream(
        reader,
        encoder,
        heartbeat_s=settings.streams.heartbeat_s,
        headers={
            "x-vercel-ai-ui-message-stream": "v1",
            "X-Session-Id": encoder.session_id,
            "X-Run-Id": encoder.run_id,
        },
        on_close=release,
    )
