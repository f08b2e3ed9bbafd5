"""What an MCP tool's result and progress become for the model and the stream.

A result is text for the model: text content joined by newlines, every other kind of
content a short placeholder (``[image: image/png, 1.2 kB]``: the model cannot see the
bytes, and a base64 blob would only fill its context), and ``structuredContent`` as
compact JSON when there is no text. ``isError`` becomes a ``ToolError``, which the agent
turns into an ``isError`` tool result.
"""

from __future__ import annotations

import json

import mcp_types as types

from chatstream.errors import ToolError


def result_text(result: types.CallToolResult) -> str:
    """The model's text of ``result``; raise ``ToolError`` with that text if it is an error."""
    parts: list[str] = []
    has_text = False
    for block in result.content:
        if isinstance(block, types.TextContent):
            parts.append(block.text)
            has_text = True
        else:
            parts.append(placeholder(block))
    if not has_text and result.structured_content is not None:
        compact = json.dumps(result.structured_content, separators=(",", ":"), ensure_ascii=False)
        parts.insert(0, compact)
    text = "\n".join(parts)
    if result.is_error:
        raise ToolError(text or "the tool reported an error and said nothing more")
    return text


def placeholder(block: types.ContentBlock) -> str:
    """A short description of content that is not text."""
    match block:
        case types.ImageContent(mime_type=mime, data=data):
            return f"[image: {mime}, {size(_base64_bytes(data))}]"
        case types.AudioContent(mime_type=mime, data=data):
            return f"[audio: {mime}, {size(_base64_bytes(data))}]"
        case types.EmbeddedResource(resource=types.TextResourceContents() as res):
            kind = res.mime_type or "text"
            return f"[resource: {res.uri}, {kind}, {size(len(res.text.encode()))}]"
        case types.EmbeddedResource(resource=types.BlobResourceContents() as blob):
            kind = blob.mime_type or "binary"
            return f"[resource: {blob.uri}, {kind}, {size(_base64_bytes(blob.blob))}]"
        case types.ResourceLink(uri=uri, name=name, mime_type=mime):
            described = ", ".join(p for p in (name, mime) if p)
            return f"[resource link: {uri}{', ' + described if described else ''}]"
        case _:
            return f"[{getattr(block, 'type', 'content')}]"


def progress_message(progress: float, total: float | None, message: str | None) -> str:
    """The notification's message, or the step when it has none (``step 3 of 10``)."""
    if message:
        return message
    if total:
        return f"step {progress:g} of {total:g}"
    return f"step {progress:g}"


def progress_fraction(progress: float, total: float | None) -> float | None:
    """progress/total in 0..1 when the server gives a total; None otherwise."""
    if not total or total <= 0:
        return None
    return min(1.0, max(0.0, progress / total))


def size(count: int) -> str:
    """A byte count as people read it: ``512 B``, ``1.2 kB``, ``3.4 MB``."""
    if count < 1000:
        return f"{count} B"
    if count < 1_000_000:
        return f"{count / 1000:.1f} kB"
    return f"{count / 1_000_000:.1f} MB"


def _base64_bytes(data: str) -> int:
    """The decoded length of base64 ``data``, without decoding it."""
    data = data.strip()
    return max(0, len(data) * 3 // 4 - data[-2:].count("="))
