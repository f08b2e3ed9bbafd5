"""Provider-neutral conversation messages, as stored in sessions and sent to models."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True, slots=True)
class ToolCallRequest:
    """One call the model asked for: an id, a tool name and parsed JSON arguments.

    ``approval`` is set on a stored call of a tool that needed a person's yes: how that
    ended (``approvals.Verdict``), or ``"pending"`` while the turn waits for it, with the
    ``run_id`` to answer it in.
    """

    id: str
    name: str
    arguments: dict[str, Any]
    approval: str | None = None
    run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id, "tool": self.name, "args": self.arguments}
        if self.approval is not None:
            data["approval"] = self.approval
        if self.run_id is not None:
            data["runId"] = self.run_id
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ToolCallRequest:
        return cls(
            id=data["id"],
            name=data["tool"],
            arguments=dict(data.get("args") or {}),
            approval=data.get("approval"),
            run_id=data.get("runId"),
        )


@dataclass(frozen=True, slots=True)
class Message:
    """A conversation message.

    ``tool_calls`` is set on an assistant message that asked for tools;
    ``tool_call_id``/``tool`` on the tool message that answers one of them;
    ``interrupted`` on an answer cut short (cancel, lost connection, failure);
    ``approval`` on the result of a call that needed approval: how it was answered.
    """

    role: Role
    content: str
    tool_calls: tuple[ToolCallRequest, ...] = ()
    tool_call_id: str | None = None
    tool: str | None = None
    is_error: bool = False
    interrupted: bool = False
    approval: str | None = None
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
        if self.approval is not None:
            data["approval"] = self.approval
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
            approval=data.get("approval"),
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


def tool_result(
    call: ToolCallRequest, content: str, *, is_error: bool = False, approval: str | None = None
) -> Message:
    return Message(
        role="tool",
        content=content,
        tool_call_id=call.id,
        tool=call.name,
        is_error=is_error,
        approval=approval,
    )


PENDING = "pending"


def settle_approvals(messages: Sequence[Message]) -> list[Message]:
    """``messages`` with each call stored as pending showing how it was answered since.

    A turn parked while it waited for approval is stored with its calls ``pending``; the
    run that continues it appends their results, each saying how it was answered.
    """
    answered = {
        msg.tool_call_id: msg.approval
        for msg in messages
        if msg.role == "tool" and msg.approval is not None and msg.approval != PENDING
    }
    if not answered:
        return list(messages)
    settled = []
    for msg in messages:
        if any(c.approval == PENDING and c.id in answered for c in msg.tool_calls):
            calls = tuple(
                replace(c, approval=answered[c.id], run_id=None)
                if c.approval == PENDING and c.id in answered
                else c
                for c in msg.tool_calls
            )
            msg = replace(msg, tool_calls=calls)
        settled.append(msg)
    return settled


def pending_calls(messages: Sequence[Message]) -> list[ToolCallRequest]:
    """The calls of the last tool round still waiting for approval (no result yet)."""
    for index in range(len(messages) - 1, -1, -1):
        msg = messages[index]
        if msg.role == "assistant" and msg.tool_calls:
            results = {m.tool_call_id for m in messages[index + 1 :] if m.role == "tool"}
            return [c for c in msg.tool_calls if c.approval == PENDING and c.id not in results]
        if msg.role != "tool":
            return []
    return []


def encodable(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8, as every store and stream writes it.

    It cannot when it holds a lone surrogate (half of a UTF-16 pair), which JSON may
    carry as an escape ("\\ud800") and Python decodes into a str all the same.
    """
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
