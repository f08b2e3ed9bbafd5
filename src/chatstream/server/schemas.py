"""Request and response bodies, as the OpenAPI document shows them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from chatstream.messages import encodable

SESSION_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"


def _encodable(text: str) -> str:
    # No store or stream could write it: refuse it before the turn starts.
    if not encodable(text):
        raise ValueError("is not valid Unicode text (it holds a lone surrogate)")
    return text


Text = Annotated[str, AfterValidator(_encodable)]
"""A string from a request body that can be stored and streamed as UTF-8."""


class ChatRequest(BaseModel):
    """A turn: the user's message, the session to continue, whether tools may run."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "message": "서울의 날씨를 알려주고 섭씨를 화씨로 변환해줘",
                    "sessionId": "user-123",
                    "enableTools": True,
                }
            ]
        },
    )

    message: Text | None = Field(
        default=None, description="The user's message. Required, unless the request resumes a run."
    )
    sessionId: Text | None = Field(
        default=None,
        description="1-128 characters of [A-Za-z0-9._:-]; the server makes one when absent.",
    )
    enableTools: bool = Field(default=True, description="Let the model call tools.")


class ToolCallOut(BaseModel):
    id: str
    tool: str
    args: dict[str, Any]
    result: str | None = None
    isError: bool = False


class ChatResponse(BaseModel):
    """The outcome of a non-streaming turn."""

    sessionId: str
    runId: str
    message: str
    toolCalls: list[ToolCallOut]
    historyLength: int
    usage: dict[str, int]


class MessageOut(BaseModel):
    role: str
    content: str
    toolCalls: list[dict[str, Any]] | None = None
    toolCallId: str | None = None
    tool: str | None = None
    isError: bool | None = None
    interrupted: bool | None = None
    approval: str | None = Field(
        default=None,
        description="On a tool result of a call that needed approval: approved, declined, "
        "expired or cancelled (each tool call in toolCalls says the same, or pending).",
    )
    createdAt: str | None = None


class SessionOut(BaseModel):
    sessionId: str
    messages: list[MessageOut]
    createdAt: str
    lastActivity: str
    messageCount: int
    historyLength: int
    activeRunId: str | None = None


class SessionSummaryOut(BaseModel):
    sessionId: str
    title: str
    createdAt: str
    lastActivity: str
    messageCount: int


class SessionListOut(BaseModel):
    sessions: list[SessionSummaryOut]
    count: int


class DeletedOut(BaseModel):
    sessionId: str
    deleted: bool


class PendingApprovalOut(BaseModel):
    id: str = Field(description="The tool call's id.")
    tool: str
    args: dict[str, Any]
    expiresAt: str = Field(description="When it is declined unanswered (ISO 8601).")


class RunOut(BaseModel):
    runId: str
    sessionId: str
    state: str = Field(
        description='"running", "waiting" (for approval), "done", "failed", "cancelled"'
    )
    lastSeq: int
    cancelled: bool = Field(
        default=False,
        description="Whether the run was stopped; on a cancel, whether this request stopped it.",
    )
    pendingApprovals: list[PendingApprovalOut] = Field(
        default_factory=list, description="The tool calls waiting for a person's answer."
    )


class ApprovalIn(BaseModel):
    """A person's answer to a tool call waiting for approval."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"approved": False, "reason": "Not that file."}]},
    )

    approved: bool
    reason: (
        Annotated[str, StringConstraints(max_length=2000), AfterValidator(_encodable)] | None
    ) = Field(
        default=None, description="Told to the model when declined (at most 2,000 characters)."
    )


class ApprovalOut(BaseModel):
    runId: str
    callId: str
    approved: bool
    state: str = Field(description="The run's state after the answer.")
    continuedRunId: str | None = Field(
        default=None,
        description="Set when the answer continued a turn parked by a restart: stream it "
        "with lastEventId=<continuedRunId>:0.",
    )


class ToolOut(BaseModel):
    name: str
    description: str
    parameters: dict[str, Any]
    source: str = Field(description='"builtin", "python" or "mcp:<server>"')
    approval: bool = Field(description="Whether a person must say yes before it runs.")


class ToolListOut(BaseModel):
    tools: list[ToolOut]
    count: int


class WarmUpOut(BaseModel):
    status: Literal["warming up", "ready", "failed"]
    seconds: float = Field(description="How long the warm-up took, or has taken so far")
    error: str | None = None


class HealthOut(BaseModel):
    status: str
    version: str
    uptimeSeconds: float
    model: str
    warmUp: WarmUpOut = Field(
        description='The model\'s warm-up: "warming up" while the weights load (turns wait '
        'for it), then "ready", or "failed" with the error (health is then "degraded")'
    )
    store: dict[str, Any]
    runs: dict[str, Any] = Field(
        default_factory=dict,
        description='Where runs live: {"shared": true when on Redis (--runs), "ok"}',
    )
    activeRuns: int
    accepting: bool
    mcp: dict[str, dict[str, Any]] | None = Field(
        default=None,
        description='Each MCP server: {"status": "ready"|"starting"|"failed", "tools", "error"?}',
    )


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorOut(BaseModel):
    """Every refusal has this shape."""

    error: ErrorBody
