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
- A field of the wrong type (``"content": 5``, a chunk that is a JSON list, a token
  count that is a string) fails the turn with a ``ModelError`` (a malformed chunk, see
  ``http.malformed_chunk``) after the events before it; a null field counts as missing.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from typing import Any

import orjson

from chatstream.errors import ModelError
from chatstream.messages import Message, ToolCallRequest, model_text
from chatstream.models.base import ModelEvent, TextDelta, ToolSpec, Usage
from chatstream.models.http import (
    RAW_ARGUMENTS,
    HTTPModel,
    Malformed,
    StreamReader,
    count_field,
    error_detail,
    index_field,
    load_object,
    malformed_chunk,
    object_field,
    parse_arguments,
    text_field,
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


def _refusal(delta: dict[str, Any]) -> str:
    """The refusal of a delta whose content is not a non-empty string, if it has one."""
    text_field(delta, "content")  # here "" or null; any other type is malformed
    return text_field(delta, "refusal")


def _usage(reported: object) -> Usage | None:
    """The usage a chunk reports; ``None`` for an empty object."""
    if type(reported) is not dict:
        raise Malformed(f"usage is {type(reported).__name__}, not an object")
    if not reported:
        return None
    return Usage(
        prompt_tokens=count_field(reported, "prompt_tokens") or 0,
        completion_tokens=count_field(reported, "completion_tokens") or 0,
    )


class _PartialCall:
    """A tool call being assembled from its fragments."""

    __slots__ = ("arguments", "id", "name")

    def __init__(self) -> None:
        self.id = ""
        self.name = ""
        self.arguments: list[str] = []


class ChatCompletionsReader(StreamReader):
    """Reads a Chat Completions stream: content deltas, tool-call fragments, usage, [DONE]."""

    __slots__ = ("_calls", "_finished", "_usage")

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._calls: dict[int, _PartialCall] = {}
        self._usage: Usage | None = None
        self._finished = False

    def _read(self, chunk: bytes, events: list[ModelEvent]) -> None:
        # The per-token hot path: plain lookups and ``type(x) is`` checks, no model per chunk.
        data = b""
        try:
            for data in self._decoder.feed(chunk):
                if data == b"[DONE]":
                    self.done = True
                    events.extend(self._rest())
                    break
                obj = load_object(data)
                if (error := obj.get("error")) is not None:
                    detail = error_detail(orjson.dumps({"error": error}), "unknown error")
                    raise ModelError(f"{self._name}: the provider failed mid-stream: {detail}")
                choices = obj.get("choices")
                if type(choices) is list:
                    for choice in choices:
                        if type(choice) is not dict:
                            raise Malformed(f"a choice is {type(choice).__name__}, not an object")
                        delta = choice.get("delta")
                        if type(delta) is dict:
                            content = delta.get("content")
                            if content and type(content) is str:
                                events.append(TextDelta(content))
                            elif text := _refusal(delta):
                                events.append(TextDelta(text))
                            if (fragments := delta.get("tool_calls")) is not None:
                                self._add_fragments(fragments)
                        elif delta is not None:
                            raise Malformed(f"delta is {type(delta).__name__}, not an object")
                        if (finish := choice.get("finish_reason")) is not None:
                            if type(finish) is not str:
                                raise Malformed(f"finish_reason is {type(finish).__name__}")
                            if finish:
                                # Hand the calls over now; the usage chunk is still to come.
                                self._finished = True
                                events.extend(self._complete_calls())
                elif choices is not None:
                    raise Malformed(f"choices is {type(choices).__name__}, not a list")
                if (reported := obj.get("usage")) is not None:
                    self._usage = _usage(reported) or self._usage
        except Malformed as exc:
            raise malformed_chunk(self._name, exc, data) from None

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

    def _add_fragments(self, fragments: object) -> None:
        if type(fragments) is not list:
            raise Malformed(f"tool_calls is {type(fragments).__name__}, not a list")
        calls = self._calls
        for fragment in fragments:
            if type(fragment) is not dict:
                raise Malformed(f"a tool call is {type(fragment).__name__}, not an object")
            # Servers that send each call whole, in one fragment, may leave out ``index``.
            index = index_field(fragment)
            if index is None:
                index = len(calls)
            call = calls.get(index)
            if call is None:
                call = calls[index] = _PartialCall()
            call_id = text_field(fragment, "id")
            if not call.id:
                call.id = call_id
            function = object_field(fragment, "function")
            name = text_field(function, "name")
            if not call.name:
                call.name = name
            if arguments := text_field(function, "arguments"):
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


class OpenAIModel(HTTPModel):
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
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip(
            "/"
        )
        api_key = api_key or os.environ.get("OPENAI_API_KEY")
        headers = {"accept": "text/event-stream", "content-type": "application/json"}
        # Local servers (Ollama, vLLM, llama.cpp) need no key: then send no header at all.
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        url = f"{self.base_url}/chat/completions"
        super().__init__(f"openai:{model}", url, headers=headers, timeout=timeout)

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

    def reader(self) -> ChatCompletionsReader:
        """A reader for one answer: text deltas, then tool calls, then usage."""
        return ChatCompletionsReader(self.name)
