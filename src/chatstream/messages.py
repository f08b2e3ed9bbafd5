"""Provider-neutral conversation messages, as stored in sessions and sent to models."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True, slots=True)
class ToolCallRequest:
    """One call the model asked for: an id, a tool name and parsed JSON arguments."""

    id: str
    name: str
    arguments: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "tool": self.name, "args": self.arguments}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ToolCallRequest:
        return cls(id=data["id"], name=data["tool"], arguments=dict(data.get("args") or {}))


@dataclass(frozen=True, slots=True)
class Message:
    """A conversation message.

    ``tool_calls`` is set on an assistant message that asked for tools;
    ``tool_call_id``/``tool`` on the tool message that answers one of them;
    ``interrupted`` on an answer cut short (cancel, lost connection, failure).
    """

    role: Role
    content: str
    tool_calls: tuple[ToolCallRequest, ...] = ()
    tool_call_id: str | None = None
    tool: str | None = None
    is_error: bool = False
    interrupted: bool = False
    created_at: float | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The wire and storage form (camelCase keys, optional keys left out)."""
        data: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            data["toolCalls"] = [call.to_dict() for call in self.tool_calls]
        if self.tool_call_id is not None:
            data["toolCallId"] = self.tool_call_id
        if self.tool is not None:
            data["tool"] = self.tool
        if self.is_error:
            data["isError"] = True
        if self.interrupted:
            data["interrupted"] = True
        if self.created_at is not None:
            data["createdAt"] = self.created_at
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Message:
        return cls(
            role=data["role"],
            content=data.get("content") or "",
            tool_calls=tuple(ToolCallRequest.from_dict(c) for c in data.get("toolCalls", ())),
            tool_call_id=data.get("toolCallId"),
            tool=data.get("tool"),
            is_error=bool(data.get("isError", False)),
            interrupted=bool(data.get("interrupted", False)),
            created_at=data.get("createdAt"),
        )


def user(content: str) -> Message:
    return Message(role="user", content=content)


def assistant(
    content: str, *, tool_calls: tuple[ToolCallRequest, ...] = (), interrupted: bool = False
) -> Message:
    return Message(
        role="assistant", content=content, tool_calls=tool_calls, interrupted=interrupted
    )


def tool_result(call: ToolCallRequest, content: str, *, is_error: bool = False) -> Message:
    return Message(
        role="tool", content=content, tool_call_id=call.id, tool=call.name, is_error=is_error
    )


def history_length(messages: list[Message] | tuple[Message, ...]) -> int:
    """User and assistant messages, as the contract counts them (tool messages aside)."""
    # An assistant message that only asked for tools is a step of the turn, not an
    # answer; the contract counts 2 per finished turn, so count only answers.
    return sum(
        1 for m in messages if m.role == "user" or (m.role == "assistant" and not m.tool_calls)
    )


INTERRUPTED_NOTE = "[This answer was interrupted before it finished.]"


def model_text(message: Message) -> str:
    """The text a model should read for ``message``: an interrupted answer says so."""
    if message.interrupted:
        return f"{message.content}\n{INTERRUPTED_NOTE}" if message.content else INTERRUPTED_NOTE
    return message.content
