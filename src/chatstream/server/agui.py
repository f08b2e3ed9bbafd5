"""AG-UI: what ``@ag-ui/client``'s ``HttpAgent`` and CopilotKit speak.

``POST /api/agui`` takes a ``RunAgentInput`` (``threadId`` = the session) and streams a
run as ``data: {event}`` lines: ``RUN_STARTED``; per model round a text message
(``TEXT_MESSAGE_START`` / ``_CONTENT`` / ``_END``) and its tool calls (``TOOL_CALL_START``
/ ``_ARGS`` / ``_END``, ``CUSTOM`` ``tool_progress`` events, ``TOOL_CALL_RESULT``); then
``RUN_FINISHED`` or ``RUN_ERROR``. What the input asks for, in this order:

* ``resume`` answers the interrupts of a run that waits for approval (each interrupt is a
  tool call; its id is ``<runId>:<callId>``; the payload ``{"approved": bool, "reason"?}``,
  or ``status: "cancelled"`` for no), and streams that run from where it stopped;
* a ``runId`` of a run that is active or recently finished replays it from its start;
* otherwise the last user message starts a turn (the server keeps the history: earlier
  messages, ``tools``, ``state`` and ``context`` are not read).

Departures from what an AG-UI consumer might expect, on purpose:

* ``RUN_STARTED.runId`` is chatstream's run id, not the input's: it is what the cancel
  endpoint, a replay and the native resume take.
* A stopped run ends with ``RUN_FINISHED`` and the ``cancelled`` outcome; other failures
  with ``RUN_ERROR`` (``code``, ``message``).
* A run that waits for a person ends its stream with the ``interrupt`` outcome while the
  run itself goes on waiting (AG-UI has no event for a pause inside a run); a ``CUSTOM``
  ``approval_required`` event marks the ask where it happened, for a replay.
* ``TOOL_CALL_RESULT`` of a failed call has ``metadata: {"isError": true}``.
* No ``id:`` lines: AG-UI has no cursor; a replay starts from the run's start.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fastapi import APIRouter, Request, Response
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
from chatstream.messages import encodable
from chatstream.runlog import Entry, Reader
from chatstream.runs import is_run_id
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
PROTOCOL_VERSION = "1.0"
# What the answer to an approval's interrupt holds.
APPROVAL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"approved": {"type": "boolean"}, "reason": {"type": "string"}},
    "required": ["approved"],
}


def _event(value: dict[str, Any]) -> bytes:
    return b"data: " + dumps(value) + b"\n\n"


class AguiEncoder:
    """One run's entries as AG-UI events (see the module docstring).

    ``answered`` are the calls whose interrupts the input resumes; with ``continues`` the
    stream picks up where the one that asked for them stopped.
    """

    def __init__(
        self,
        run_id: str,
        thread_id: str,
        *,
        answered: frozenset[str] = frozenset(),
        continues: bool = False,
    ) -> None:
        self.run_id = run_id
        self.thread_id = thread_id
        self.rounds = Rounds(answered)
        self._skipping = continues
        self._round = 0
        self._in_round = False
        # While a text message is open: its id, and the bytes each of its deltas starts with.
        self._text_id: bytes | None = None
        self._delta = b""
        self._ended = False

    @property
    def ended(self) -> bool:
        return self._ended

    def opening(self) -> bytes:
        return _event(
            {
                "type": "RUN_STARTED",
                "threadId": self.thread_id,
                "runId": self.run_id,
                "protocolVersion": PROTOCOL_VERSION,
            }
        )

    def closing(self) -> bytes:
        return b""

    def encode(self, entries: Sequence[Entry]) -> bytes:
        out: list[bytes] = []
        if self._skipping:
            entries = self._skip(entries)
        append = out.append
        rounds = self.rounds
        for entry in entries:
            event = entry.event
            if type(event) is Token:
                if self._text_id is None:
                    self._open_text(append)
                append(self._delta + dumps(event.content) + b"}\n\n")
            elif isinstance(event, ToolCall):
                parent = self._open_round()
                self._close_text(append)
                rounds.take(event)
                start = {"type": "TOOL_CALL_START", "toolCallId": event.id}
                start["toolCallName"] = event.tool
                start["parentMessageId"] = parent
                append(_event(start))
                args = {"type": "TOOL_CALL_ARGS", "toolCallId": event.id}
                args["delta"] = dumps(event.args).decode()
                append(_event(args))
                append(_event({"type": "TOOL_CALL_END", "toolCallId": event.id}))
            elif isinstance(event, ApprovalRequired):
                rounds.take(event)
                custom = {"type": "CUSTOM", "name": "approval_required", "value": event.data()}
                append(_event(custom))
            elif isinstance(event, ToolProgress):
                append(_event({"type": "CUSTOM", "name": "tool_progress", "value": event.data()}))
            elif isinstance(event, ToolResult):
                rounds.take(event)
                result: dict[str, Any] = {
                    "type": "TOOL_CALL_RESULT",
                    "messageId": f"{self.run_id}-{event.id}",
                    "toolCallId": event.id,
                    "content": event.result,
                    "role": "tool",
                }
                if event.is_error:
                    result["metadata"] = {"isError": True}
                append(_event(result))
                if not rounds.open:
                    self._in_round = False
            elif isinstance(event, Done | Error):
                self._end(event, append)
                break
        if not self._ended and rounds.paused:
            self._pause(append)
        return b"".join(out)

    def _skip(self, entries: Sequence[Entry]) -> Sequence[Entry]:
        """Follow the entries that the stream this one continues has sent; the rest."""
        rounds = self.rounds
        for index, entry in enumerate(entries):
            event = entry.event
            if isinstance(event, Done | Error):
                self._skipping = False
                return entries[index:]
            if type(event) is Token or isinstance(event, ToolCall):
                self._open_round()
            rounds.take(event)
            if isinstance(event, ToolResult) and not rounds.open:
                self._in_round = False
            if rounds.resumed_here:
                self._skipping = False
                return entries[index + 1 :]
        return ()

    def _open_round(self) -> str:
        """The id of the model round's assistant message (its text and tool calls)."""
        if not self._in_round:
            self._in_round = True
            self._round += 1
        return f"{self.run_id}-{self._round}"

    def _open_text(self, append: Callable[[bytes], None]) -> None:
        text_id = self._open_round().encode()
        self._text_id = text_id
        self._delta = b'data: {"type":"TEXT_MESSAGE_CONTENT","messageId":"' + text_id
        self._delta += b'","delta":'
        append(
            b'data: {"type":"TEXT_MESSAGE_START","messageId":"'
            + text_id
            + b'","role":"assistant"}\n\n'
        )

    def _close_text(self, append: Callable[[bytes], None]) -> None:
        if self._text_id is not None:
            append(b'data: {"type":"TEXT_MESSAGE_END","messageId":"' + self._text_id + b'"}\n\n')
            self._text_id = None

    def _finished(self, **fields: Any) -> bytes:
        run = {"type": "RUN_FINISHED", "threadId": self.thread_id, "runId": self.run_id}
        return _event({**run, **fields})

    def _end(self, event: Done | Error, append: Callable[[bytes], None]) -> None:
        self._close_text(append)
        if isinstance(event, Done):
            usage = event.usage
            append(
                self._finished(
                    result={"sessionId": event.session_id, "historyLength": event.history_length},
                    outcome={"type": "success"},
                    usage=[
                        {
                            "inputTokens": usage.get("promptTokens", 0),
                            "outputTokens": usage.get("completionTokens", 0),
                            "totalTokens": usage.get("totalTokens", 0),
                        }
                    ],
                )
            )
        elif event.code == ErrorCode.CANCELLED:
            append(self._finished(outcome={"type": "cancelled"}))
        else:
            append(_event({"type": "RUN_ERROR", "message": event.message, "code": event.code}))
        self._ended = True

    def _pause(self, append: Callable[[bytes], None]) -> None:
        # The run waits for a person: the answer comes as the next input's ``resume``.
        self._close_text(append)
        interrupts = [
            {
                "id": f"{self.run_id}:{ask.id}",
                "reason": "tool_approval",
                "message": f"{ask.tool} needs your approval to run.",
                "toolCallId": ask.id,
                "responseSchema": APPROVAL_SCHEMA,
                "expiresAt": ask.expires_at,
                "metadata": {"tool": ask.tool, "args": ask.args},
            }
            for ask in self.rounds.pending()
            if ask.id not in self.rounds.answered
        ]
        append(self._finished(outcome={"type": "interrupt", "interrupts": interrupts}))
        self._ended = True


# -- the request body ------------------------------------------------------------------
# Only what chatstream reads is declared; AG-UI's other fields, and whatever a client
# adds, are allowed and ignored.


class AguiMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    role: str
    content: Text | list[dict[str, Any]] | None = None


class ResumeIn(BaseModel):
    """The answer to one interrupt."""

    model_config = ConfigDict(extra="allow")

    interruptId: str
    status: str = Field(pattern="^(resolved|cancelled)$")
    payload: Any = None


class RunAgentIn(BaseModel):
    """AG-UI's ``RunAgentInput``."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "threadId": "user-123",
                    "runId": "3f1c…",
                    "messages": [{"id": "m1", "role": "user", "content": "What is 6 * 7?"}],
                    "tools": [],
                    "context": [],
                    "state": {},
                    "forwardedProps": {},
                }
            ]
        },
    )

    threadId: Text = Field(description="The session id (1-128 of [A-Za-z0-9._:-]).")
    runId: Text = Field(description="A run to replay, when it names one; else any id.")
    messages: list[AguiMessageIn]
    tools: list[dict[str, Any]] = Field(default_factory=list)
    context: list[dict[str, Any]] = Field(default_factory=list)
    state: Any = None
    forwardedProps: Any = None
    resume: list[ResumeIn] | None = None


_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The run as AG-UI events (`data: {event}` lines).",
        "content": {"text/event-stream": {"schema": DATA_EVENT_SCHEMA}},
    },
    400: {"model": ErrorOut, "description": "INVALID_REQUEST or MISSING_MESSAGE"},
    404: {"model": ErrorOut, "description": "APPROVAL_NOT_FOUND (a resume)"},
    409: {"model": ErrorOut, "description": "SESSION_BUSY"},
    413: {"model": ErrorOut, "description": "MESSAGE_TOO_LONG or REQUEST_TOO_LARGE"},
    429: {"model": ErrorOut, "description": "RATE_LIMITED, or too many open streams"},
}


@router.post(
    "/api/agui",
    response_class=Response,
    response_model=None,
    responses=_RESPONSES,
    summary="A turn, a replay or an interrupt's answer, as AG-UI events",
)
async def agui_run(request: Request, caller: CallerDep, body: RunAgentIn) -> Response:
    runtime = runtime_of(request)
    runs = runtime.runs
    thread_id = validate_session_id(body.threadId, field="threadId")
    if body.resume:
        run_id, answers = _answers(body.resume)
        await require_run_of(request, caller, run_id, thread_id)
        continued: str | None = None
        for call_id, approved, reason in answers:
            try:
                outcome = await runs.answer(
                    run_id, call_id, approved=approved, reason=reason, caller=caller.id
                )
            except ApprovalAnswered:
                continue  # answered elsewhere (or expired): the stream shows how it went on
            continued = outcome.continued_run_id or continued
        stream_id = continued or run_id
        reader = await runs.open(stream_id, 0, caller=caller.id)
        if reader is None:
            return Response(status_code=204)
        encoder = AguiEncoder(
            stream_id,
            thread_id,
            answered=frozenset(call_id for call_id, _, _ in answers),
            continues=continued is None,
        )
        return _response(request, reader, encoder, acquire_slot(request, caller, reader))
    if is_run_id(body.runId):
        reader = await runs.open(body.runId, 0, caller=caller.id)
        if reader is not None:
            encoder = AguiEncoder(body.runId, reader.log.session.id)
            return _response(request, reader, encoder, acquire_slot(request, caller, reader))
    last = body.messages[-1] if body.messages else None
    if last is None or last.role != "user":
        raise InvalidRequest(
            "`messages`: the last message must be the user's new message (or `resume` must "
            "answer the interrupts, or `runId` name a run to replay)."
        )
    text = _text(last.content)
    text, _ = validate_turn(text, thread_id, runtime.settings.turns.max_message_chars)
    run, release = await start_turn(request, caller, text, thread_id, True)
    return _response(request, run.log.reader(0), AguiEncoder(run.id, thread_id), release)


def _text(content: str | list[dict[str, Any]] | None) -> str:
    """The text of a user message: a string, or its text parts joined."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.get("type") == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise InvalidRequest("`messages`: a text part's `text` must be a string.")
            texts.append(text)
    return "\n".join(texts)


def _short_text(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 2000 and encodable(value)


def _answers(resume: list[ResumeIn]) -> tuple[str, list[tuple[str, bool, str | None]]]:
    """The run the interrupts belong to, and each call's answer: approved, and why not."""
    run_ids = set()
    answers = []
    for entry in resume:
        run_id, sep, call_id = entry.interruptId.partition(":")
        if not sep or not call_id or not is_run_id(run_id):
            raise InvalidRequest(
                f"`resume`: interrupt id {entry.interruptId!r} is not one this server sent "
                "(<runId>:<callId>)."
            )
        run_ids.add(run_id)
        payload = entry.payload
        if isinstance(payload, bool):
            approved, reason = payload, None
        elif isinstance(payload, dict) and isinstance(payload.get("approved", False), bool):
            approved = bool(payload.get("approved", False))
            reason = payload.get("reason")
            if reason is not None and not _short_text(reason):
                raise InvalidRequest(
                    "`resume`: a payload's `reason` must be valid text of at most 2000 characters."
                )
        elif payload is None and entry.status == "cancelled":
            approved, reason = False, None
        else:
            raise InvalidRequest(
                '`resume`: a payload must be {"approved": true|false, "reason"?: string}.'
            )
        if entry.status == "cancelled":
            approved = False
        answers.append((call_id, approved, reason))
    if len(run_ids) != 1:
        raise InvalidRequest("`resume`: every interrupt answered must belong to one run.")
    return run_ids.pop(), answers


def _response(
    request: Request, reader: Reader, encoder: AguiEncoder, release: Callable[[], None]
) -> EncodedStream:
    settings = runtime_of(request).settings
    return EncodedStream(
        reader,
        encoder,
        heartbeat_s=settings.streams.heartbeat_s,
        headers={"X-Session-Id": encoder.thread_id, "X-Run-Id": encoder.run_id},
        on_close=release,
    )
