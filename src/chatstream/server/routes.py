"""HTTP endpoints: stream, resume, cancel or answer a turn; sessions, tools, health, the page."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import FileResponse

from chatstream import __version__
from chatstream.coordinator import MemoryCoordinator
from chatstream.errors import (
    ClientGone,
    ErrorCode,
    InvalidRequest,
    NotFound,
    SessionBusy,
)
from chatstream.events import Done, Error, Transcript
from chatstream.messages import Message, settle_approvals
from chatstream.metrics import CONTENT_TYPE
from chatstream.runlog import Reader
from chatstream.runs import Run, RunState, RunStatus, wire_state
from chatstream.server.auth import Caller
from chatstream.server.errors import TURN_FAILURE_STATUS, error_response
from chatstream.server.runtime import runtime_of
from chatstream.server.schemas import (
    ApprovalIn,
    ApprovalOut,
    ChatRequest,
    ChatResponse,
    DeletedOut,
    ErrorOut,
    HealthOut,
    MessageOut,
    PendingApprovalOut,
    RunOut,
    SessionListOut,
    SessionOut,
    SessionSummaryOut,
    ToolCallOut,
    ToolListOut,
    ToolOut,
    WarmUpOut,
)
from chatstream.server.sse import EventStream
from chatstream.server.turns import CallerDep, acquire_slot, start_turn, validate_turn

router = APIRouter()
STATIC = Path(__file__).parent / "static"
# ``<runId>:<seq>``. Any id of that shape is looked up (an unknown run answers 204, as the
# contract says); the seq is bounded so that parsing it costs nothing.
EVENT_ID = re.compile(r"([A-Za-z0-9._-]{1,128}):(\d{1,18})")

# One event of the stream, as an SSE parser sees it; ``data`` is compact JSON whose shape
# depends on ``event`` (see the README and the contract).
SSE_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "A frame. The first of each connection has only `retry` and `id` (the "
    "point it starts from, `<runId>:0` for a new turn); `: ping` comments come between.",
    "required": ["id"],
    "properties": {
        "event": {
            "enum": [
                "token",
                "tool_call",
                "approval_required",
                "tool_progress",
                "tool_result",
                "done",
                "error",
            ],
        },
        "data": {"type": "string", "contentMediaType": "application/json"},
        "id": {"type": "string", "pattern": r"^run_[0-9a-f]+:[0-9]+$"},
        "retry": {"type": "integer", "minimum": 0},
    },
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "MISSING_MESSAGE or INVALID_REQUEST"},
    409: {"model": ErrorOut, "description": "SESSION_BUSY: a turn is already running there"},
    413: {"model": ErrorOut, "description": "MESSAGE_TOO_LONG or REQUEST_TOO_LARGE"},
    429: {"model": ErrorOut, "description": "RATE_LIMITED (see Retry-After)"},
    503: {"model": ErrorOut, "description": "STORE_UNAVAILABLE or SHUTTING_DOWN"},
}
_STREAM_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "An event stream: token, tool_call, tool_progress, tool_result, then "
        "done or error. Each frame has `id: <runId>:<seq>`.",
        "content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
    },
    204: {"description": "Resume of a run that is unknown, expired or fully delivered."},
    **_ERRORS,
}


# -- streaming -----------------------------------------------------------------------


@router.get(
    "/api/chat/stream",
    response_class=Response,
    response_model=None,
    responses=_STREAM_RESPONSES,
    summary="Stream a turn (or resume a run) as Server-Sent Events",
    tags=["chat"],
)
async def stream_get(
    request: Request,
    caller: CallerDep,
    message: Annotated[str | None, Query(description="The user's message.")] = None,
    sessionId: Annotated[str | None, Query(description="Session to continue.")] = None,
    enableTools: Annotated[bool, Query(description="true/false/1/0")] = True,
    lastEventId: Annotated[
        str | None, Query(description="Resume after this event id (`<runId>:<seq>`).")
    ] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> Response | EventStream:
    return await _stream(
        request, caller, message, sessionId, enableTools, last_event_id or lastEventId
    )


@router.post(
    "/api/chat/stream",
    response_class=Response,
    response_model=None,
    responses=_STREAM_RESPONSES,
    summary="Stream a turn (or resume a run) as Server-Sent Events, from a JSON body",
    tags=["chat"],
)
async def stream_post(
    request: Request,
    caller: CallerDep,
    body: ChatRequest | None = None,
    lastEventId: Annotated[str | None, Query()] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> Response | EventStream:
    body = body or ChatRequest()
    return await _stream(
        request,
        caller,
        body.message,
        body.sessionId,
        body.enableTools,
        last_event_id or lastEventId,
    )


async def _stream(
    request: Request,
    caller: Caller,
    message: str | None,
    session_id: str | None,
    enable_tools: bool,
    last_event_id: str | None,
) -> Response | EventStream:
    runtime = runtime_of(request)
    settings = runtime.settings
    if last_event_id:
        reader = await _resumable(request, caller, last_event_id)
        if reader is None:
            return Response(status_code=204)
        release = acquire_slot(request, caller, reader)
    else:
        text, session_id = validate_turn(message, session_id, settings.turns.max_message_chars)
        run, release = await start_turn(request, caller, text, session_id, enable_tools)
        reader = run.log.reader(0)
    log = reader.log
    return EventStream(
        reader,
        heartbeat_s=settings.streams.heartbeat_s,
        retry_ms=settings.streams.retry_ms,
        headers={"X-Session-Id": log.session.id, "X-Run-Id": log.run_id},
        on_close=release,
    )


async def _finished_unless_gone(request: Request, run: Run) -> bool:
    """Wait for the run to finish: True, or False as soon as the client hangs up."""
    finished = asyncio.ensure_future(run.wait_finished())
    gone = asyncio.ensure_future(_hang_up(request))
    try:
        await asyncio.wait((finished, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        finished.cancel()
        gone.cancel()
    return run.finished


async def _hang_up(request: Request) -> None:
    # The body has been read, so the server's next message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _resumable(request: Request, caller: Caller, last_event_id: str) -> Reader | None:
    """A reader of the run to resume, after the seq asked for; None when nothing is left."""
    match = EVENT_ID.fullmatch(last_event_id.strip())
    if match is None:
        raise InvalidRequest(
            "`Last-Event-ID` must look like <runId>:<seq> (a seq of at most 18 digits), as sent."
        )
    seq = int(match.group(2))
    return await runtime_of(request).runs.open(match.group(1), seq, caller=caller.id)


# -- runs --------------------------------------------------------------------------


@router.post(
    "/api/chat/runs/{run_id}/cancel",
    response_model=RunOut,
    responses={404: {"model": ErrorOut, "description": "RUN_NOT_FOUND"}},
    summary="Stop a run now (the stop button)",
    tags=["chat"],
)
async def cancel_run(request: Request, caller: CallerDep, run_id: str) -> RunOut:
    outcome = await runtime_of(request).runs.cancel(run_id, caller=caller.id)
    if outcome is None:
        return _run_out(run_id, None)
    status, cancelled = outcome
    return _run_out(run_id, status, cancelled=cancelled)


@router.get(
    "/api/chat/runs/{run_id}",
    response_model=RunOut,
    responses={404: {"model": ErrorOut, "description": "RUN_NOT_FOUND"}},
    summary="A run's state",
    tags=["chat"],
)
async def get_run(request: Request, caller: CallerDep, run_id: str) -> RunOut:
    return _run_out(run_id, await runtime_of(request).runs.status(run_id, caller=caller.id))


def _run_out(run_id: str, status: RunStatus | None, *, cancelled: bool | None = None) -> RunOut:
    """The run's state; 404 when it is unknown, expired, or another caller's."""
    if status is None:
        raise NotFound(f"No run {run_id!r} is known (or it expired).", code=ErrorCode.RUN_NOT_FOUND)
    return RunOut(
        runId=status.run_id,
        sessionId=status.session.id,
        state=wire_state(status),
        lastSeq=status.last_seq,
        # A cancel says whether it stopped the run; a look says whether it was stopped.
        cancelled=status.state is RunState.CANCELLED if cancelled is None else cancelled,
        pendingApprovals=[PendingApprovalOut(**call.data()) for call in status.pending],
    )


@router.post(
    "/api/chat/runs/{run_id}/approvals/{call_id}",
    response_model=ApprovalOut,
    response_model_exclude_none=True,
    responses={
        404: {"model": ErrorOut, "description": "APPROVAL_NOT_FOUND"},
        409: {"model": ErrorOut, "description": "APPROVAL_ANSWERED (or expired)"},
    },
    summary="Approve or decline a tool call that waits for a person",
    tags=["chat"],
)
async def answer_approval(
    request: Request, caller: CallerDep, run_id: str, call_id: str, body: ApprovalIn
) -> ApprovalOut:
    outcome = await runtime_of(request).runs.answer(
        run_id, call_id, approved=body.approved, reason=body.reason, caller=caller.id
    )
    return ApprovalOut(
        runId=outcome.run_id,
        callId=outcome.call_id,
        approved=outcome.approved,
        state=outcome.state,
        continuedRunId=outcome.continued_run_id,
    )


# -- one turn without streaming -------------------------------------------------


@router.post(
    "/api/chat",
    response_model=ChatResponse,
    responses={**_ERRORS, 502: {"model": ErrorOut, "description": "The turn failed"}},
    summary="Run a turn and answer when it is over (no streaming)",
    tags=["chat"],
)
async def chat(request: Request, caller: CallerDep, body: ChatRequest) -> ChatResponse | Response:
    runtime = runtime_of(request)
    text, session_id = validate_turn(
        body.message, body.sessionId, runtime.settings.turns.max_message_chars
    )
    run, release = await start_turn(request, caller, text, session_id, body.enableTools)
    # The caller is a reader of the run while it waits, as a stream's is: one that hangs
    # up leaves the run to the resume grace period, then it is cancelled.
    reader = run.log.reader(0)
    try:
        if not await _finished_unless_gone(request, run):
            # Nobody reads this answer; the request log shows it as the client's hang-up.
            raise ClientGone("The client went away before the answer.")
        entries = reader.read()
    finally:
        reader.close()
        release()
    transcript = Transcript()
    end = None
    for entry in entries:
        end = transcript.add(entry.event) or end
    if isinstance(end, Done):
        results = {r.id: r for r in transcript.results}
        calls = [
            ToolCallOut(
                id=call.id,
                tool=call.tool,
                args=call.args,
                result=results[call.id].result if call.id in results else None,
                isError=results[call.id].is_error if call.id in results else False,
            )
            for call in transcript.calls
        ]
        return ChatResponse(
            sessionId=end.session_id,
            runId=end.run_id,
            message=transcript.text,
            toolCalls=calls,
            historyLength=end.history_length,
            usage=end.usage,
        )
    if end is None:
        end = Error(ErrorCode.INTERNAL_ERROR, "The turn ended without an outcome.")
    return error_response(TURN_FAILURE_STATUS.get(end.code, 500), end.code, end.message)


# -- sessions ----------------------------------------------------------------------


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="milliseconds")


def _message_out(message: Message) -> MessageOut:
    data = message.to_dict()
    if message.created_at is not None:
        data["createdAt"] = _iso(message.created_at)
    return MessageOut(**data)


@router.get(
    "/api/chat/sessions",
    response_model=SessionListOut,
    summary="Recent sessions, most recently active first",
    tags=["sessions"],
)
async def list_sessions(
    request: Request, caller: CallerDep, limit: Annotated[int, Query(ge=1, le=500)] = 50
) -> SessionListOut:
    summaries = await runtime_of(request).store.list(limit=limit, owner=caller.id)
    sessions = [
        SessionSummaryOut(
            sessionId=s.id,
            title=s.title,
            createdAt=_iso(s.created_at),
            lastActivity=_iso(s.last_activity),
            messageCount=s.message_count,
        )
        for s in summaries
    ]
    return SessionListOut(sessions=sessions, count=len(sessions))


@router.get(
    "/api/chat/sessions/{session_id}",
    response_model=SessionOut,
    response_model_exclude_none=True,
    responses={404: {"model": ErrorOut, "description": "SESSION_NOT_FOUND"}},
    summary="A session's messages",
    tags=["sessions"],
)
async def get_session(request: Request, caller: CallerDep, session_id: str) -> SessionOut:
    runtime = runtime_of(request)
    ref = caller.session(session_id)
    session = await runtime.store.load(ref)
    active = await runtime.runs.active_run_id(ref)
    if session is None:
        if active is None:
            raise NotFound(f"No session {session_id!r}.")
        # The first turn is still running: the session exists but holds nothing yet.
        now = _iso(time.time())
        return SessionOut(
            sessionId=session_id,
            messages=[],
            createdAt=now,
            lastActivity=now,
            messageCount=0,
            historyLength=0,
            activeRunId=active,
        )
    return SessionOut(
        sessionId=session_id,
        messages=[_message_out(msg) for msg in settle_approvals(session.messages)],
        createdAt=_iso(session.created_at),
        lastActivity=_iso(session.last_activity),
        messageCount=len(session.messages),
        historyLength=session.history_length,
        activeRunId=active,
    )


@router.delete(
    "/api/chat/sessions/{session_id}",
    response_model=DeletedOut,
    responses={
        404: {"model": ErrorOut, "description": "SESSION_NOT_FOUND"},
        409: {"model": ErrorOut, "description": "SESSION_BUSY"},
    },
    summary="Clear a session",
    tags=["sessions"],
)
async def delete_session(request: Request, caller: CallerDep, session_id: str) -> DeletedOut:
    runtime = runtime_of(request)
    ref = caller.session(session_id)
    active = await runtime.runs.active_run_id(ref)
    if active is not None:
        raise SessionBusy(f"Session {session_id!r} has a turn running (run {active}).")
    if not await runtime.store.delete(ref):
        raise NotFound(f"No session {session_id!r}.")
    return DeletedOut(sessionId=session_id, deleted=True)


# -- tools, health, page -------------------------------------------------------------


@router.get("/api/tools", response_model=ToolListOut, summary="The tools", tags=["meta"])
async def list_tools(request: Request, caller: CallerDep) -> ToolListOut:
    tools = [
        ToolOut(
            name=t.name,
            description=t.description,
            parameters=t.parameters,
            source=t.source,
            approval=t.approval,
        )
        for t in runtime_of(request).agent.tools
    ]
    return ToolListOut(tools=tools, count=len(tools))


@router.get(
    "/api/health",
    response_model=HealthOut,
    response_model_exclude_none=True,
    responses={
        503: {
            "model": HealthOut,
            "description": "degraded: the store or shared runs are down, or the warm-up failed",
        }
    },
    summary="Liveness and set-up",
    tags=["meta"],
)
async def health(request: Request, response: Response) -> HealthOut:
    runtime = runtime_of(request)
    coordinator = runtime.runs.coordinator
    # Where runs are shared (--runs) is needed as much as the store: without it no turn starts.
    store_ok, runs_ok = await asyncio.gather(runtime.store.ping(), coordinator.ping())
    # Warming up is no failure (a turn waits for the model); a warm-up that failed is.
    warm = runtime.warm_up
    model_ok = warm.status != "failed"
    if not (store_ok and runs_ok and model_ok):
        response.status_code = 503
    return HealthOut(
        status="ok" if store_ok and runs_ok and model_ok else "degraded",
        version=__version__,
        uptimeSeconds=round(time.monotonic() - runtime.started_at, 3),
        model=runtime.model.name,
        warmUp=WarmUpOut(status=warm.status, seconds=round(warm.seconds, 3), error=warm.error),
        store={"kind": runtime.store.name, "ok": store_ok},
        runs={"shared": not isinstance(coordinator, MemoryCoordinator), "ok": runs_ok},
        activeRuns=runtime.runs.active_count,
        accepting=runtime.runs.accepting,
        # A server that is down is not chatstream failing: health stays ok, and says which.
        mcp=runtime.mcp.status() if runtime.mcp is not None else None,
    )


@router.get(
    "/metrics",
    response_class=Response,
    summary="Prometheus metrics",
    tags=["meta"],
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request, caller: CallerDep) -> Response:
    return Response(runtime_of(request).metrics.render(), media_type=CONTENT_TYPE)


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")
