"""Read an event stream the way a client would, with the package's own decoder."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from chatstream.events import Event, Frame, FrameDecoder, parse_event


@dataclass
class Streamed:
    """A finished (or cut) stream: its response, frames and typed events."""

    response: httpx.Response
    frames: list[Frame] = field(default_factory=list)
    raw: bytes = b""

    @property
    def events(self) -> list[Event]:
        return [parse_event(f) for f in self.frames]

    @property
    def types(self) -> list[str]:
        return [f.event for f in self.frames]

    @property
    def data(self) -> list[dict[str, Any]]:
        return [orjson.loads(f.data) for f in self.frames]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [orjson.loads(f.data) for f in self.frames if f.event == kind]

    @property
    def text(self) -> str:
        return "".join(d["content"] for d in self.of("token"))

    @property
    def ids(self) -> list[str]:
        return [f.id or "" for f in self.frames]


async def stream(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    max_events: int | None = None,
    **kwargs: Any,
) -> Streamed:
    """Read a stream to its end, or stop (dropping the connection) after ``max_events``."""
    decoder = FrameDecoder()
    async with client.stream(method, url, **kwargs) as response:
        result = Streamed(response)
        if response.status_code != 200:
            await response.aread()
            return result
        raw = bytearray()
        async for chunk in response.aiter_raw():
            raw.extend(chunk)
            result.frames.extend(decoder.feed(chunk))
            if max_events is not None and len(result.frames) >= max_events:
                break
        result.raw = bytes(raw)
    return result
