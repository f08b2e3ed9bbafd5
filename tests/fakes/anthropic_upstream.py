"""A fake Anthropic Messages API server that speaks the real streaming wire format.

Same transport and ideas as ``openai_upstream`` (see there)::

    with FakeAnthropic() as fake:
        fake.enqueue(Message(text=["Hel", "lo"], usage=(12, 2)))
        model = AnthropicModel("claude-test", base_url=fake.url)
        ...
        fake.requests[-1].body["messages"]

Replies: ``Message`` (text tokens, tool_use blocks whose JSON input arrives in several
``input_json_delta`` pieces, usage, ``ping``, delays, a hold, a drop, a mid-stream
``error`` event under HTTP 200, malformed events slipped in with ``inject``),
``HTTPError`` (Anthropic error body) or ``Raw``.
``python -m tests.fakes.anthropic_upstream --port 8002`` runs an echo server
(``ANTHROPIC_BASE_URL=http://127.0.0.1:8002``).
"""

from __future__ import annotations

import argparse
import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from .openai_upstream import (
    HTTPError,
    LoopbackServer,
    Raw,
    RecordedRequest,
    _Exchange,
    _pieces,
    sse,
)

__all__ = ["FakeAnthropic", "HTTPError", "Message", "Raw", "RecordedRequest", "ToolUse"]


@dataclass(frozen=True)
class ToolUse:
    """A tool_use block to stream; ``input`` as a dict (JSON-encoded) or a raw string."""

    name: str
    input: dict[str, Any] | str = field(default_factory=dict)
    id: str | None = None  # generated when None
    fragments: int = 3  # how many input_json_delta pieces


@dataclass(frozen=True)
class Message:
    """A scripted streamed message.

    Events are counted from 1 after ``message_start`` (each text delta, each tool_use
    start and input piece): ``hold_after``, ``drop_after`` and ``delay`` work as in
    ``openai_upstream.Completion``. ``error`` sends an ``error`` event after the events
    (as Anthropic does when overloaded mid-stream) and ends the body. ``inject`` sends these
    payloads as events, as they are (JSON-encoded unless bytes or str), after the content
    blocks and before the end: malformed events, say a ``text_delta`` whose ``text`` is 5.
    """

    text: Sequence[str] = ()
    tool_uses: Sequence[ToolUse] = ()
    usage: tuple[int, int] | None = None  # (input, output); counted when None
    delay: float = 0.0
    hold_after: int | None = None
    drop_after: int | None = None
    error: tuple[str, str] | None = None  # (type, message), e.g. ("overloaded_error", ...)
    stop: bool = True  # send message_delta + message_stop
    model: str | None = None
    inject: Sequence[Any] = ()


class FakeAnthropic(LoopbackServer):
    """A scriptable Anthropic Messages API server on loopback."""

    def __init__(
        self, *, port: int = 0, default: Message | Raw | HTTPError | None = None, delay: float = 0
    ) -> None:
        super().__init__(port=port)
        self.default = default
        self.delay = delay
        self._ids = itertools.count(1)

    @property
    def url(self) -> str:
        """The base URL a client is given (no ``/v1``: the client adds it)."""
        return self.base

    def default_reply(self, request: RecordedRequest) -> Any:
        if self.default is not None:
            return self.default
        messages = (request.body or {}).get("messages") or [{}]
        content = messages[-1].get("content") or ""
        if isinstance(content, list):
            content = " ".join(
                str(block.get("text") or block.get("content") or "") for block in content
            )
        words = f"Echo: {content}".split(" ")
        return Message(
            text=[w if i == 0 else " " + w for i, w in enumerate(words)], delay=self.delay
        )

    async def handle(self, exchange: _Exchange) -> None:
        request = exchange.record
        if request.method != "POST" or request.path.rstrip("/") != "/v1/messages":
            await exchange.json(404, _error_body("not_found_error", f"no route {request.path}"))
            return
        reply = self.next_reply(request)
        if isinstance(reply, HTTPError):
            body = _error_body(
                reply.type or _ERROR_TYPES.get(reply.status, "api_error"), reply.message
            )
            await exchange.json(reply.status, body, reply.headers)
        elif isinstance(reply, Raw):
            await self.send_raw(exchange, reply)
        else:
            await self._stream(exchange, reply, request)

    async def _stream(self, exchange: _Exchange, reply: Message, request: RecordedRequest) -> None:
        body = request.body or {}
        prompt, _ = reply.usage or (len(orjson.dumps(body.get("messages", []))) // 4 + 1, 0)
        start = {
            "type": "message_start",
            "message": {
                "id": f"msg_fake{next(self._ids)}",
                "type": "message",
                "role": "assistant",
                "model": reply.model or body.get("model", "fake"),
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {
                    "input_tokens": prompt,
                    "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 0,
                    "output_tokens": 1,
                },
            },
        }
        await exchange.start(200, "text/event-stream", {"request-id": "req_fake"})
        await exchange.chunk(sse(start, "message_start"))
        events = self._events(reply)
        for number, (name, data) in enumerate(events, 1):
            if name != "ping":
                await exchange.sleep(reply.delay)
            await exchange.chunk(sse(data, name))
            if number == reply.drop_after:
                exchange.drop()
                return
            if number == reply.hold_after:
                await exchange.hold()
        for payload in reply.inject:
            name = payload.get("type") if isinstance(payload, dict) else None
            await exchange.chunk(sse(payload, name if isinstance(name, str) else None))
        if reply.error is not None:
            kind, message = reply.error
            await exchange.chunk(sse(_error_body(kind, message), "error"))
            await exchange.end()
            return
        if reply.stop:
            output = reply.usage[1] if reply.usage else len(events)
            delta = {
                "type": "message_delta",
                "delta": {
                    "stop_reason": "tool_use" if reply.tool_uses else "end_turn",
                    "stop_sequence": None,
                },
                "usage": {"output_tokens": output},
            }
            await exchange.chunk(sse(delta, "message_delta"))
            await exchange.chunk(sse({"type": "message_stop"}, "message_stop"))
        await exchange.end()

    def _events(self, reply: Message) -> list[tuple[str, dict[str, Any]]]:
        """The content-block events of a reply; block starts, deltas and stops are counted."""
        events: list[tuple[str, dict[str, Any]]] = []
        index = 0
        if reply.text:
            events.append(_block_start(index, {"type": "text", "text": ""}))
            events.append(("ping", {"type": "ping"}))
            for token in reply.text:
                events.append(_block_delta(index, {"type": "text_delta", "text": token}))
            events.append(_block_stop(index))
            index += 1
        for use in reply.tool_uses:
            block = {
                "type": "tool_use",
                "id": use.id or f"toolu_fake{next(self._ids)}",
                "name": use.name,
                "input": {},
            }
            events.append(_block_start(index, block))
            raw = use.input if isinstance(use.input, str) else orjson.dumps(use.input).decode()
            # Anthropic opens with an empty piece, then the JSON in several.
            for piece in ["", *_pieces(raw, use.fragments)]:
                delta = {"type": "input_json_delta", "partial_json": piece}
                events.append(_block_delta(index, delta))
            events.append(_block_stop(index))
            index += 1
        return events


def _block_start(index: int, block: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    data = {"type": "content_block_start", "index": index, "content_block": block}
    return "content_block_start", data


def _block_delta(index: int, delta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}


def _block_stop(index: int) -> tuple[str, dict[str, Any]]:
    return "content_block_stop", {"type": "content_block_stop", "index": index}


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def _error_body(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_fake"}


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the echo fake until interrupted."""
    parser = argparse.ArgumentParser(description="A fake Anthropic Messages API server.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.05, help="seconds between tokens")
    args = parser.parse_args(argv)
    with FakeAnthropic(port=args.port, delay=args.delay) as fake:
        print(f"ANTHROPIC_BASE_URL={fake.url}", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
