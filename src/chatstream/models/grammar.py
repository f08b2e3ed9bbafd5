"""GBNF grammars that hold a local model to a plain answer or one well-formed tool call.

A reply is either plain text, which may not begin with a call-shaped character
(``CALL_SHAPED``: the opening of a call, bare JSON, a JSON list or a code fence, which is
how small models write mis-formatted calls) or with blank space beyond one space, or
exactly one call::

    <tool_call>
    {"name": "get_weather", "arguments": {"location": "Seoul"}}
    </tool_call>

naming an offered tool, with arguments that match its JSON schema. This is the call format
the Qwen2.5 family was trained on; the grammar makes any other model follow it too. The
two shapes part at the first character, so which one a reply is gets settled by its first
token, and a text reply can be streamed from that token on. They are two grammars, not
one with two branches, because the local model picks the branch itself (see
``LocalModel._call_intent``) before it samples under either.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from chatstream.models.base import ToolSpec

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
CALL_SHAPED = "<{[`"

# One leading space is allowed: SentencePiece vocabularies start words with it ("▁Hello").
_TEXT_START = '" "? [^' + CALL_SHAPED.replace("[", "\\[") + "\\x00 \\t\\r\\n]"
TEXT_GRAMMAR = f"root ::= {_TEXT_START} [^\\x00]*"


def call_grammar(tools: Sequence[ToolSpec]) -> str:
    """A grammar for exactly one call of one of ``tools`` (at least one)."""
    if not tools:
        raise ValueError("a call grammar needs at least one tool")
    # Imported here: llama_cpp is an optional dependency. Its converter is untyped, hence Any.
    from llama_cpp import llama_grammar

    converter_class: Any = llama_grammar.SchemaConverter
    converter = converter_class(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    alternatives = []
    for index, spec in enumerate(tools):
        schema = converter.resolve_refs(spec.parameters, spec.name)
        arguments = converter.visit(schema, f"args-{index}")
        name = _literal(json.dumps(spec.name) + ', "arguments": ')
        alternatives.append(f"{name} {arguments}")
    opening = _literal(CALL_OPEN + '\n{"name": ')
    closing = _literal("}\n" + CALL_CLOSE)
    call = f"{opening} ( {' | '.join(alternatives)} ) {closing}"
    return f'root ::= " "? {call}\n{converter.format_grammar()}'


def parse_call(text: str) -> tuple[str, dict[str, Any]] | None:
    """The tool name and arguments of a complete call, or None when ``text`` is not one."""
    body = text.strip()
    if not (body.startswith(CALL_OPEN) and body.endswith(CALL_CLOSE)):
        return None
    try:
        # strict=False: the schema converter's strings admit raw control characters.
        data = json.loads(body[len(CALL_OPEN) : -len(CALL_CLOSE)], strict=False)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    name, arguments = data.get("name"), data.get("arguments")
    if not isinstance(name, str) or not isinstance(arguments, dict):
        return None
    return name, arguments


def format_call(name: str, arguments: dict[str, Any]) -> str:
    """A call as the model writes it (to show the model its own earlier calls)."""
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}"


def _literal(text: str) -> str:
    """A GBNF string literal for ``text`` (GBNF takes JSON's escapes)."""
    return json.dumps(text, ensure_ascii=False)
