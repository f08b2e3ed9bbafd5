"""What a tool hands back, made into the text that a model reads and a store keeps.

A tool is declared to return ``str``, but nothing holds a Python function to that: a
dict, None or bytes went into the stream as they were and then failed the turn's write
(or, a dict, broke the stored session for good). Here a string stays as it is; any other
value JSON can write (a dict, a list, a number, None, a dataclass, a pydantic model) is
written as JSON; anything else is the tool's error. Every result, an error's included,
then has its lone surrogates replaced (no UTF-8 writer takes them) and is cut to the
server's bound, since the model reads all of it on every later turn of the session.
"""

from __future__ import annotations

import re

import orjson
from pydantic import BaseModel

from chatstream.errors import ToolError
from chatstream.messages import encodable

__all__ = ["as_text", "bounded", "clean"]

_SURROGATE = re.compile("[\ud800-\udfff]")


def as_text(value: object, tool: str) -> str:
    """``value`` as text; ``ToolError`` naming ``tool`` when it has none to give."""
    if isinstance(value, str):
        return value
    if isinstance(value, BaseModel):
        return value.model_dump_json()
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:  # orjson's JSONEncodeError is one
        raise ToolError(
            f"{tool} returned {type(value).__name__}, which is not text: a tool returns a "
            "str, or a value JSON can write."
        ) from None


def clean(text: str) -> str:
    """``text`` with each lone surrogate (half of a UTF-16 pair) replaced by U+FFFD."""
    return text if encodable(text) else _SURROGATE.sub("\ufffd", text)


def bounded(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, saying so."""
    if len(text) <= limit:
        return text
    note = f"[cut: the result had {len(text):,} characters; these are the first {limit:,}]"
    return f"{text[:limit]}\n{note}"
