"""The stream events (the six of the seed, and ``approval_required``), and their SSE wire form.

Events are small frozen values tagged by ``type``. ``encode`` turns one into an
SSE frame; ``FrameDecoder`` and ``parse_event`` turn a byte stream back into
events, so the server, the client and the tests share one definition.

Departures from a generic SSE library, on purpose:

* ``data`` is always a single line of compact JSON, so a value can never inject
  an SSE field: JSON escapes ``\\n`` and ``\\r``, and U+2028/U+2029 are harmless
  to SSE parsers, which split only on CR and LF.
* Non-ASCII text is written as raw UTF-8 (``서울`` stays ``서울``).
* ``retry:`` is not part of an event; the server adds it once per connection.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson


@dataclass(slots=True)
class Token:
    """A text delta of the model's answer.

    Not frozen, unlike the other events, on purpose: one is made per token, and a frozen
    dataclass sets each field through ``object.__setattr__`` (0.40 µs against 0.14, of
    the ~8 a relayed token costs). Nothing changes a token once made.
    """

    content: str
    type: Literal["token"] = field(default="token", init=False)

    def data(self) -> dict[str, Any]:
        return {"content": self.content}


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A tool call about to run."""

    id: str
    tool: str
    args: dict[str, Any]
    type: Literal["tool_call"] = field(default="tool_call", init=False)

    def data(self) -> dict[str, Any]:
        return {"id": self.id, "tool": self.tool, "args": self.args}


@dataclass(frozen=True, slots=True)
class ApprovalRequired:
    """A tool call waits for a person's yes or no until ``expires_at`` (ISO 8601)."""

    id: str
    tool: str
    args: dict[str, Any]
    expires_at: str
    type: Literal["approval_required"] = field(default="approval_required", init=False)

    def data(self) -> dict[str, Any]:
        return {"id": self.id, "tool": self.tool, "args": self.args, "expiresAt": self.expires_at}


@dataclass(frozen=True, slots=True)
class ToolProgress:
    """A step reported by a running tool; ``progress`` in 0..1 when known."""

    id: str
    tool: str
    message: str
    progress: float | None = None
    type: Literal["tool_progress"] = field(default="tool_progress", init=False)

    def data(self) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id, "tool": self.tool, "message": self.message}
        if self.progress is not None:
            data["progress"] = self.progress
        return data


@dataclass(frozen=True, slots=True)
class ToolResult:
    """A tool finished, failed (``is_error``) or timed out."""

    id: str
    tool: str
    result: str
    is_error: bool = False
    # For a call that needed approval: how it was answered (approved, declined, …).
    approval: str | None = None
    type: Literal["tool_result"] = field(default="tool_result", init=False)

    def data(self) -> dict[str, Any]:
        data = {"id": self.id, "tool": self.tool, "result": self.result, "isError": self.is_error}
        if self.approval is not None:
            data["approval"] = self.approval
        return data


@dataclass(frozen=True, slots=True)
class Done:
    """The turn finished and is stored."""

    session_id: str
    history_length: int
    run_id: str
    usage: dict[str, int] = field(default_factory=dict)
    message: str = "complete"
    type: Literal["done"] = field(default="done", init=False)

    def data(self) -> dict[str, Any]:
        return {
            "message": self.message,
            "sessionId": self.session_id,
            "historyLength": self.history_length,
            "runId": self.run_id,
            "usage": self.usage,
        }


@dataclass(frozen=True, slots=True)
class Error:
    """The turn failed after the stream began."""

    code: str
    message: str
    type: Literal["error"] = field(default="error", init=False)

    def data(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}


Event = Token | ToolCall | ApprovalRequired | ToolProgress | ToolResult | Done | Error


class Transcript:
    """A turn's events folded into what a caller that does not stream gets.

    The answer is the text after the last tool call (text the model wrote before a call
    is a step, not the answer). ``POST /api/chat`` and the Python client fold the same way.
    """

    __slots__ = ("answer", "calls", "results")

    def __init__(self) -> None:
        self.answer: list[str] = []
        self.calls: list[ToolCall] = []
        self.results: list[ToolResult] = []

    @property
    def text(self) -> str:
        return "".join(self.answer)

    def add(self, event: Event) -> Done | Error | None:
        """Take the next event; the terminal one (``done`` or ``error``) is returned."""
        if isinstance(event, Token):
            self.answer.append(event.content)
        elif isinstance(event, ToolCall):
            self.calls.append(event)
            self.answer.clear()
        elif isinstance(event, ToolResult):
            self.results.append(event)
        elif isinstance(event, Done | Error):
            return event
        return None


def dumps(value: Any) -> bytes:
    """Compact JSON as UTF-8 bytes, non-ASCII kept raw.

    orjson refuses a few values a model or a tool can still produce (integers
    past 64 bits, lone surrogates); those take the slower standard library
    path rather than failing the run.
    """
    try:
        return orjson.dumps(value)
    except TypeError:
        text = json.dumps(_clean(value), ensure_ascii=False, separators=(",", ":"), default=str)
        return text.encode()


def _clean(value: Any) -> Any:
    """``value`` with lone surrogates (not encodable as UTF-8) replaced by U+FFFD."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def encode(event: Event, *, event_id: str) -> bytes:
    """Encode one event as an SSE frame: ``id``, ``event`` and one ``data`` line."""
    if "\n" in event_id or "\r" in event_id:
        raise ValueError("an event id cannot contain a line break")
    return b"".join(
        (
            b"id: ",
            event_id.encode(),
            b"\nevent: ",
            event.type.encode(),
            b"\ndata: ",
            dumps(event.data()),
            b"\n\n",
        )
    )


def encode_token(content: str, *, event_id: str) -> bytes:
    """``encode(Token(content))`` without building the Token."""
    return b"id: %b\nevent: token\ndata: %b\n\n" % (event_id.encode(), _token_data(content))


def id_prefix(run_id: str) -> bytes:
    """What every frame's id line in run ``run_id`` starts with, up to its seq."""
    if "\n" in run_id or "\r" in run_id:
        raise ValueError("an event id cannot contain a line break")
    return b"id: %b:" % run_id.encode()


def token_frame(prefix: bytes, seq: int, content: str) -> bytes:
    """A token's frame, its id ``prefix`` (``id_prefix``) and seq: the per-token hot path."""
    return b"%b%d\nevent: token\ndata: %b\n\n" % (prefix, seq, _token_data(content))


def _token_data(content: str) -> bytes:
    try:
        return orjson.dumps({"content": content})
    except TypeError:
        return dumps({"content": content})


def encode_around_seq(event: Event, run_id: str) -> tuple[bytes, bytes]:
    """``event``'s frame in run ``run_id`` split where its seq goes: ``before + seq + after``.

    For a writer that learns the seq only where the frame is stored (a Redis script
    appending after whatever the log holds), so the frame's bytes are still made here.
    """
    marker = "\x00seq\x00"
    before, _, after = encode(event, event_id=f"{run_id}:{marker}").partition(marker.encode())
    return before, after


def decode_frame(frame: bytes) -> Event:
    """The event of one encoded frame (as ``encode`` wrote it)."""
    frames = FrameDecoder().feed(frame)
    if len(frames) != 1:
        raise ValueError("not exactly one SSE frame")
    return parse_event(frames[0])


def encode_retry(retry_ms: int) -> bytes:
    return b"retry: %d\n" % retry_ms


def encode_cursor(run_id: str, seq: int) -> bytes:
    """A frame with only an id: where a connection starts, so that a client that loses it
    before the first event resumes from there (``Last-Event-ID``) instead of starting over."""
    return b"id: %s:%d\n\n" % (run_id.encode(), seq)


HEARTBEAT = b": ping\n\n"


@dataclass(frozen=True, slots=True)
class Frame:
    """One dispatched SSE frame as a browser's EventSource would see it."""

    event: str
    data: str
    id: str | None = None
    retry: int | None = None


class FrameDecoder:
    """Incremental SSE parser following the HTML spec's rules (CR, LF or CRLF lines)."""

    def __init__(self) -> None:
        self._buffer = ""
        self._pending_cr = False
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None
        self._retry: int | None = None
        self.last_event_id: str | None = None
        self._decoder = _utf8_decoder()

    def feed(self, chunk: bytes) -> list[Frame]:
        """Feed raw bytes; return the frames completed by them."""
        text = self._decoder.decode(chunk)
        if self._pending_cr and text.startswith("\n"):
            text = text[1:]
        self._pending_cr = False
        self._buffer += text
        frames: list[Frame] = []
        while True:
            cut = _line_end(self._buffer)
            if cut is None:
                break
            index, width = cut
            if width == 1 and self._buffer[index] == "\r" and index == len(self._buffer) - 1:
                # A CR at the end of the buffer may be the first half of a CRLF.
                self._pending_cr = True
            line = self._buffer[:index]
            self._buffer = self._buffer[index + width :]
            frame = self._line(line)
            if frame is not None:
                frames.append(frame)
        return frames

    def _line(self, line: str) -> Frame | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            if "\0" not in value:
                self._id = value
                self.last_event_id = value
        elif name == "retry" and value.isdigit():
            self._retry = int(value)
        return None

    def _dispatch(self) -> Frame | None:
        if not self._data:
            self._event = ""
            return None
        frame = Frame(
            event=self._event or "message",
            data="\n".join(self._data),
            id=self._id,
            retry=self._retry,
        )
        self._event, self._data, self._id, self._retry = "", [], None, None
        return frame


def _utf8_decoder() -> Any:
    import codecs

    return codecs.getincrementaldecoder("utf-8")(errors="replace")


def _line_end(buffer: str) -> tuple[int, int] | None:
    cr = buffer.find("\r")
    lf = buffer.find("\n")
    if cr == -1 and lf == -1:
        return None
    if cr == -1 or (lf != -1 and lf < cr):
        return lf, 1
    if cr + 1 < len(buffer) and buffer[cr + 1] == "\n":
        return cr, 2
    return cr, 1


def parse_event(frame: Frame) -> Event:
    """Turn a decoded frame back into its typed event."""
    data = orjson.loads(frame.data)
    match frame.event:
        case "token":
            return Token(content=data["content"])
        case "tool_call":
            return ToolCall(id=data["id"], tool=data["tool"], args=data["args"])
        case "approval_required":
            return ApprovalRequired(
                id=data["id"], tool=data["tool"], args=data["args"], expires_at=data["expiresAt"]
            )
        case "tool_progress":
            return ToolProgress(
                id=data["id"],
                tool=data["tool"],
                message=data["message"],
                progress=data.get("progress"),
            )
        case "tool_result":
            return ToolResult(
                id=data["id"],
                tool=data["tool"],
                result=data["result"],
                is_error=data["isError"],
                approval=data.get("approval"),
            )
        case "done":
            return Done(
                session_id=data["sessionId"],
                history_length=data["historyLength"],
                run_id=data["runId"],
                usage=data.get("usage") or {},
                message=data.get("message", "complete"),
            )
        case "error":
            return Error(code=data["code"], message=data["message"])
    raise ValueError(f"unknown event type {frame.event!r}")
