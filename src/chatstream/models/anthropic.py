"""Anthropic's Messages API over streaming HTTP, read by the same lean reader as OpenAI's.

Decisions worth knowing:

- System messages are joined (blank line between) into the top-level ``system`` field.
- Messages of the same role in a row are merged into one message of several content
  blocks: consecutive tool results become one user message, as the API requires, and
  an answer that failed without text leaves no empty message behind.
- Empty text blocks are left out (the API refuses them).
- A tool call is yielded at its ``content_block_stop``; its input is parsed as in
  ``openai.parse_arguments`` (``{"_raw": ...}`` when it is not a JSON object).
- ``prompt_tokens`` counts cached input too (``cache_creation_input_tokens`` and
  ``cache_read_input_tokens``), so it is the whole prompt, as in OpenAI's usage.
- Thinking blocks and server tools are ignored, and so are event types added later.
- A field of the wrong type (a ``text_delta`` whose ``text`` is 5, an event that is a
  JSON list, a token count that is a string) fails the turn with a ``ModelError`` (a
  malformed chunk, see ``http.malformed_chunk``) after the events before it; a null
  field counts as missing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import orjson

from chatstream.errors import ModelError
from chatstream.messages import Message, ToolCallRequest, model_text
from chatstream.models.base import ModelEvent, TextDelta, ToolSpec, Usage
from chatstream.models.http import (
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

__all__ = ["AnthropicModel", "MessagesReader", "anthropic_messages"]

DEFAULT_BASE_URL = "https://api.anthropic.com"
API_VERSION = "2023-06-01"


def anthropic_messages(
    messages: Sequence[Message], *, tool_blocks: bool = True
) -> tuple[str, list[dict[str, Any]]]:
    """Our messages as Anthropic's ``system`` text and ``messages`` list.

    Anthropic refuses ``tool_use``/``tool_result`` blocks in a request that defines no
    tools (a turn with tools off, or the last round of a turn, which offers none), so
    with ``tool_blocks=False`` earlier tool rounds are written out as plain text.
    """
    system: list[str] = []
    out: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:
            return
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})

    for m in messages:
        if m.role == "system":
            if m.content:
                system.append(m.content)
        elif m.role == "tool" and not tool_blocks:
            outcome = "failed" if m.is_error else "returned"
            add("user", [{"type": "text", "text": f"[{m.tool} {outcome}: {m.content}]"}])
        elif m.role == "tool":
            block: dict[str, Any] = {"type": "tool_result", "tool_use_id": m.tool_call_id or ""}
            if m.content:
                block["content"] = m.content
            if m.is_error:
                block["is_error"] = True
            add("user", [block])
        else:
            text = model_text(m)
            blocks: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
            if tool_blocks:
                blocks += [
                    {"type": "tool_use", "id": call.id, "name": call.name, "input": call.arguments}
                    for call in m.tool_calls
                ]
            else:
                blocks += [{"type": "text", "text": _call_text(call)} for call in m.tool_calls]
            add(m.role, blocks)
    return "\n\n".join(system), out


def _call_text(call: ToolCallRequest) -> str:
    return f"[called {call.name} with {orjson.dumps(call.arguments).decode()}]"


def anthropic_tools(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
    """Tool specs in the Messages API shape."""
    return [
        {"name": t.name, "description": t.description, "input_schema": t.parameters} for t in tools
    ]


class _Block:
    """A tool_use block being assembled from its input_json_delta pieces."""

    __slots__ = ("id", "input", "name", "pieces")

    def __init__(self, block: dict[str, Any]) -> None:
        self.id = text_field(block, "id")
        self.name = text_field(block, "name")
        self.input = object_field(block, "input")
        self.pieces: list[str] = []


class MessagesReader(StreamReader):
    """Reads a Messages API stream: typed events from message_start to message_stop."""

    __slots__ = ("_blocks", "_input", "_output")

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._blocks: dict[int, _Block] = {}
        self._input = 0
        self._output = 0

    def finish(self) -> list[ModelEvent]:
        """The body ended: nothing is left, or it ended before ``message_stop``."""
        if not self.done:
            raise ModelError(f"{self._name}: the stream ended before the answer finished")
        return []

    def _read(self, chunk: bytes, events: list[ModelEvent]) -> None:
        data = b""
        try:
            for data in self._decoder.feed(chunk):
                event = load_object(data)
                kind = event.get("type")
                if kind == "content_block_delta":
                    # The per-token path: plain lookups; the checking helpers only off it.
                    delta = event.get("delta")
                    if type(delta) is not dict:
                        delta = object_field(event, "delta")  # {} for null, or raises
                    delta_kind = delta.get("type")
                    if delta_kind == "text_delta":
                        text = delta.get("text")
                        if text and type(text) is str:
                            events.append(TextDelta(text))
                        else:
                            text_field(delta, "text")  # "" or null; any other type raises
                    elif delta_kind == "input_json_delta":
                        piece = text_field(delta, "partial_json")
                        block = self._blocks.get(_index(event))
                        if block is not None and piece:
                            block.pieces.append(piece)
                elif kind == "content_block_start":
                    block_data = object_field(event, "content_block")
                    block_kind = block_data.get("type")
                    if block_kind == "tool_use":
                        self._blocks[_index(event)] = _Block(block_data)
                    elif block_kind == "text" and (text := text_field(block_data, "text")):
                        events.append(TextDelta(text))
                elif kind == "content_block_stop":
                    done_block = self._blocks.pop(_index(event), None)
                    if done_block is not None:
                        events.append(self._tool_call(done_block))
                elif kind == "message_start":
                    self._count(object_field(object_field(event, "message"), "usage"))
                elif kind == "message_delta":
                    self._count(object_field(event, "usage"))
                elif kind == "message_stop":
                    self.done = True
                    events.append(Usage(prompt_tokens=self._input, completion_tokens=self._output))
                    return
                elif kind == "error":
                    detail = error_detail(data, "unknown error")
                    raise ModelError(f"{self._name}: the provider failed mid-stream: {detail}")
                # ping, and event types added later, need nothing.
        except Malformed as exc:
            raise malformed_chunk(self._name, exc, data) from None

    def _count(self, usage: dict[str, Any]) -> None:
        # message_start carries the input; message_delta the final (cumulative) output
        # and, in newer API versions, the input again.
        created = count_field(usage, "cache_creation_input_tokens") or 0
        read = count_field(usage, "cache_read_input_tokens") or 0
        if (prompt := count_field(usage, "input_tokens")) is not None:
            self._input = prompt + created + read
        if (output := count_field(usage, "output_tokens")) is not None:
            self._output = output

    def _tool_call(self, block: _Block) -> ToolCallRequest:
        if not block.name:
            raise ModelError(f"{self._name}: the model sent a tool call without a name")
        if block.pieces:
            arguments = parse_arguments("".join(block.pieces))
        else:
            # No deltas: the whole input (usually {}) came with content_block_start.
            arguments = block.input
        return ToolCallRequest(id=block.id, name=block.name, arguments=arguments)


def _index(event: dict[str, Any]) -> int:
    index = index_field(event)
    return -1 if index is None else index


class AnthropicModel(HTTPModel):
    """A Claude model behind Anthropic's ``/v1/messages`` endpoint, streamed."""

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        max_tokens: int = 4096,
        timeout: float = 120.0,
    ) -> None:
        self.model = model
        self.max_tokens = max_tokens
        base = base_url or os.environ.get("ANTHROPIC_BASE_URL") or DEFAULT_BASE_URL
        self.base_url = base.rstrip("/")
        api_key = api_key or os.environ.get("ANTHROPIC_API_KEY")
        headers = {
            "accept": "text/event-stream",
            "content-type": "application/json",
            "anthropic-version": API_VERSION,
        }
        # A gateway in front of the API may hold the key itself: then send none.
        if api_key:
            headers["x-api-key"] = api_key
        url = f"{self.base_url}/v1/messages"
        super().__init__(f"anthropic:{model}", url, headers=headers, timeout=timeout)

    def request_body(self, messages: Sequence[Message], tools: Sequence[ToolSpec]) -> bytes:
        """The JSON body of one streaming request."""
        system, converted = anthropic_messages(messages, tool_blocks=bool(tools))
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "messages": converted,
            "stream": True,
        }
        if system:
            body["system"] = system
        if tools:
            body["tools"] = anthropic_tools(tools)
        return orjson.dumps(body)

    def reader(self) -> MessagesReader:
        """A reader for one answer: text deltas, tool calls as their blocks end, then usage."""
        return MessagesReader(self.name)
