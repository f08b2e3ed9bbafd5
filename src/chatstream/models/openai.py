"""OpenAI-compatible Chat Completions over streaming HTTP (OpenAI, vLLM, Ollama, llama.cpp...).

The response is read by a lean reader (``SSEDecoder`` over raw bytes, ``orjson`` per
event, plain dict lookups) rather than the openai SDK: this is the per-token hot path,
and the SDK builds a pydantic object per chunk (``bench/openai_reader.py`` measures it).

Decisions worth knowing:

- Tool-call arguments that are not a JSON object (invalid or truncated JSON, a bare
  list) are passed on as ``{"_raw": "<the string>"}`` (``RAW_ARGUMENTS``) rather than
  failing the turn: the tool then refuses them and the model can try again, while the
  ``tool_call`` event still shows what it sent. Empty arguments mean ``{}``.
- Tool calls are yielded when the choice finishes (``finish_reason``), before the usage
  chunk, so the agent can start them while the usage chunk is still on its way.
- After ``[DONE]`` the rest of the body is drained so the connection goes back to the pool.
- A tool message with ``is_error`` is sent as ``"Error: <content>"``: Chat Completions has
  no error flag on tool results.
- A missing tool-call id (some local servers) is replaced by a generated ``call_<hex>``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import orjson

from chatstream.errors import ModelError
from chatstream.messages import Message, ToolCallRequest, model_text
from chatstream.models.base import ModelEvent, TextDelta, ToolSpec, Usage
from chatstream.models.http import (
    RAW_ARGUMENTS,
    SSEDecoder,
    UpstreamClient,
    error_detail,
    parse_arguments,
    stream_events,
)

__all__ = ["RAW_ARGUMENTS", "ChatCompletionsReader", "OpenAIModel", "openai_messages"]

DEFAULT_BASE_URL = "https://api.openai.com/v1"


def _tool_call_dict(call: ToolCallRequest) -> dict[str, Any]:
    arguments = orjson.dumps(call.arguments).decode()
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": arguments},
    }


def openai_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Our messages in the Chat Completions shape."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "tool":
            content = f"Error: {m.content}" if m.is_error else m.content
            out.append({"role": "tool", "tool_call_id": m.tool_call_id or "", "content": content})
        elif m.role == "assistant" and m.tool_calls:
            out.append(
                {
                    "role": "assistant",
                    # null, not "", is the documented content of a tools-only message.
                    "content": model_text(m) or None,
                    "tool_calls": [_tool_call_dict(call) for call in m.tool_calls],
                }
            )
        else:
            out.append({"role": m.role, "content": model_text(m)})
    return out


def openai_tools(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
    """Tool specs in the Chat Completions ``function`` shape."""
    return [
        {
            "type": "function",
            "function": {"name": t.name, "description": t.description, "parameters": t.parameters},
        }
        for t in tools
    ]


def _load_event(name: str, data: bytes) -> dict[str, Any]:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ModelError(f"{name}: malformed event from the provider: {data[:200]!r}") from None
    if not isinstance(obj, dict):
        raise ModelError(f"{name}: unexpected event from the provider: {data[:200]!r}")
    if (error := obj.get("error")) is not None:
        detail = error_detail(orjson.dumps({"error": error}), "unknown error")
        raise ModelError(f"{name}: the provider failed mid-stream: {detail}")
    return obj


class _PartialCall:
    """A tool call being assembled from its fragments."""

    __slots__ = ("arguments", "id", "name")

    def __init__(self) -> None:
        self.id = ""
        self.name = ""
        self.arguments: list[str] = []


class ChatCompletionsReader:
    """Reads a Chat Completions stream: content deltas, tool-call fragments, usage, [DONE]."""

    __slots__ = ("_calls", "_decoder", "_finished", "_name", "_usage", "done", "error")

    def __init__(self, name: str) -> None:
        self._name = name
        self._decoder = SSEDecoder()
        self._calls: dict[int, _PartialCall] = {}
        self._usage: Usage | None = None
        self._finished = False
        self.done = False
        self.error: ModelError | None = None

    def feed(self, chunk: bytes) -> list[ModelEvent]:
        """Take the next bytes of the body; return the events they complete."""
        events: list[ModelEvent] = []
        try:
            self._read(chunk, events)
        except ModelError as exc:
            self.error = exc
        return events

    def _read(self, chunk: bytes, events: list[ModelEvent]) -> None:
        for data in self._decoder.feed(chunk):
            if data == b"[DONE]":
                self.done = True
                events.extend(self._rest())
                break
            obj = _load_event(self._name, data)
            for choice in obj.get("choices") or ():
                delta = choice.get("delta")
                if delta:
                    if content := delta.get("content"):
                        events.append(TextDelta(content))
                    elif refusal := delta.get("refusal"):
                        events.append(TextDelta(refusal))
                    if fragments := delta.get("tool_calls"):
                        self._add_fragments(fragments)
                if choice.get("finish_reason"):
                    # Hand the calls over now; the usage chunk is still to come.
                    self._finished = True
                    events.extend(self._complete_calls())
            if reported := obj.get("usage"):
                self._usage = Usage(
                    prompt_tokens=reported.get("prompt_tokens") or 0,
                    completion_tokens=reported.get("completion_tokens") or 0,
                )

    def finish(self) -> list[ModelEvent]:
        """The body ended: return what is left, or raise ``ModelError`` if it ended early."""
        if self.done:
            return []
        if not self._finished:
            raise ModelError(f"{self._name}: the stream ended before the answer finished")
        # Some servers close the body after the finish chunk without sending [DONE].
        return self._rest()

    def _rest(self) -> list[ModelEvent]:
        events: list[ModelEvent] = list(self._complete_calls())
        if self._usage is not None:
            events.append(self._usage)
        return events

    def _add_fragments(self, fragments: list[dict[str, Any]]) -> None:
        calls = self._calls
        for fragment in fragments:
            # Servers that send each call whole, in one fragment, may leave out ``index``.
            index = fragment.get("index", len(calls))
            call = calls.get(index)
            if call is None:
                call = calls[index] = _PartialCall()
            if not call.id and (call_id := fragment.get("id")):
                call.id = call_id
            function = fragment.get("function")
            if function:
                if not call.name and (name := function.get("name")):
                    call.name = name
                if arguments := function.get("arguments"):
                    call.arguments.append(arguments)

    def _complete_calls(self) -> list[ToolCallRequest]:
        done: list[ToolCallRequest] = []
        for index in sorted(self._calls):
            call = self._calls[index]
            if not call.name:
                raise ModelError(f"{self._name}: the model sent a tool call without a name")
            done.append(
                ToolCallRequest(
                    id=call.id or f"call_{uuid.uuid4().hex[:24]}",
                    name=call.name,
                    arguments=parse_arguments("".join(call.arguments)),
                )
            )
        self._calls.clear()
        return done


class OpenAIModel:
    """A model behind an OpenAI-compatible ``/chat/completions`` endpoint, streamed."""

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 120.0,
    ) -> None:
        self.model = model
        self.name = f"openai:{model}"
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip(
            "/"
        )
        api_key = api_key or os.environ.get("OPENAI_API_KEY")
        headers = {"accept": "text/event-stream", "content-type": "application/json"}
        # Local servers (Ollama, vLLM, llama.cpp) need no key: then send no header at all.
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        url = f"{self.base_url}/chat/completions"
        self._client = UpstreamClient(url, headers=headers, timeout=timeout)

    def request_body(self, messages: Sequence[Message], tools: Sequence[ToolSpec]) -> bytes:
        """The JSON body of one streaming request."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": openai_messages(messages),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if tools:
            body["tools"] = openai_tools(tools)
        return orjson.dumps(body)

    def stream(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec]
    ) -> AsyncGenerator[ModelEvent, None]:
        """Stream one model turn: text deltas, then tool calls, then usage."""
        body = self.request_body(messages, tools)
        reader = ChatCompletionsReader(self.name)
        return stream_events(self._client, body, reader, self.name)

    async def aclose(self) -> None:
        """Close the HTTP client and its pooled connections."""
        await self._client.aclose()
