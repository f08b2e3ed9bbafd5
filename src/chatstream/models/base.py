"""The Model protocol: one method that streams a model turn as ``ModelEvent`` values."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from chatstream.messages import Message, ToolCallRequest


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """What a model is told about a tool: its name, description and JSON schema."""

    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of answer text, to be streamed as a token event."""

    text: str


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens spent by one model request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0


ModelEvent = TextDelta | ToolCallRequest | Usage


class Model(Protocol):
    """An LLM behind one streaming method, warmed up before the first request.

    ``stream`` yields text deltas as they arrive, then each complete tool call
    the model asked for, then (when the provider reports it) usage. It raises
    ``ModelError`` when the provider fails. Closing the iterator early (the run
    was cancelled) must release the provider request at once: close the HTTP
    response, stop local generation.
    """

    name: str

    def stream(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec]
    ) -> AsyncGenerator[ModelEvent, None]: ...

    async def warm_up(self, tools: Sequence[ToolSpec], *, system_prompt: str) -> None:
        """Pay at start-up what the first request would: the weights, and the prompt that
        ``system_prompt`` and ``tools`` open every conversation with.

        Called once, before the server takes requests; a hosted model has nothing to do.
        """
        ...

    async def aclose(self) -> None:
        """Release clients, threads or weights held by the model."""
        ...
