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

Any tool's schema goes through llama.cpp's JSON-schema converter, after ``_prepared``
mends what the converter gets wrong (references, a few keywords); a schema it still cannot
convert holds that tool's arguments to a JSON object only, rather than failing the reply.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Sequence
from typing import Any

from chatstream.models.base import ToolSpec

log = logging.getLogger("chatstream.models.grammar")

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
    converter = _converter()
    alternatives = []
    for index, spec in enumerate(tools):
        schema = _arguments_schema(spec, f"def{index}")
        arguments = converter.visit(converter.resolve_refs(schema, ""), f"args-{index}")
        name = _literal(json.dumps(spec.name, ensure_ascii=False) + ', "arguments": ')
        alternatives.append(f"{name} {arguments}")
    opening = _literal(CALL_OPEN + '\n{"name": ')
    closing = _literal("}\n" + CALL_CLOSE)
    call = f"{opening} ( {' | '.join(alternatives)} ) {closing}"
    return f'root ::= " "? {call}\n{converter.format_grammar()}'


def _converter() -> Any:
    """llama.cpp's JSON-schema-to-GBNF converter (untyped, hence Any)."""
    # Imported here: llama_cpp is an optional dependency.
    from llama_cpp import llama_grammar

    converter_class: Any = llama_grammar.SchemaConverter
    converter = converter_class(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    # Its own literals leave a backslash unescaped, so an enum value or property name with
    # a backslash or a quote in it made a grammar that llama.cpp cannot parse.
    converter._format_literal = _json_literal
    return converter


def _arguments_schema(spec: ToolSpec, scope: str) -> dict[str, Any]:
    """The schema to hold ``spec``'s arguments to: its own, prepared, when it converts."""
    try:
        schema = _prepared(spec.parameters, scope)
    except ValueError as exc:  # a reference that points nowhere
        log.warning("tool %s: %s; its arguments may be any object", spec.name, exc)
        return {"type": "object"}
    if not _convertible(schema):
        # One tool's odd schema must not take the others down: its arguments are held to
        # a JSON object only, and the tool's own validation has the last word.
        log.warning(
            "tool %s: its schema makes no grammar; its arguments may be any object", spec.name
        )
        return {"type": "object"}
    return schema


def _convertible(schema: dict[str, Any]) -> bool:
    """Whether the converter makes a grammar of ``schema`` (tried on a scratch converter)."""
    converter = _converter()
    try:
        converter.visit(converter.resolve_refs(copy.deepcopy(schema), ""), "args")
    except (AssertionError, KeyError, TypeError, ValueError, RecursionError) as exc:
        log.debug("schema %s does not convert: %r", schema, exc)
        return False
    return True


def _prepared(schema: dict[str, Any], scope: str) -> dict[str, Any]:
    """A copy of ``schema`` that the converter reads as the schema means.

    * Each local ``$ref`` points at a copy of its target under ``$defs``, named within
      ``scope``: the converter names a referenced rule by the last part of the reference
      only, so two tools' ``#/$defs/Address`` of different shapes became one, and it
      rewrites references in place, so a second grammar of the same schema failed.
    * ``additionalProperties`` that admit anything are dropped where there are declared
      properties (the converter held extra values to objects): the call names declared
      properties only.
    * ``items: {}`` is dropped (the converter failed on it; any item is what it means) and
      so is a ``pattern`` that is not anchored at both ends (the converter takes only
      those; the tool still checks its arguments).
    """
    names: dict[str, str] = {}
    defs: dict[str, Any] = {}

    def rewrite(node: Any) -> Any:
        """A schema node, rewritten; its keywords' values by what they hold."""
        if not isinstance(node, dict):
            return node
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in _DATA or key in ("$defs", "definitions"):
                if key in _DATA:
                    out[key] = value
            elif key in _SCHEMA_MAPS and isinstance(value, dict):
                out[key] = {name: rewrite(sub) for name, sub in value.items()}
            elif isinstance(value, list):
                out[key] = [rewrite(item) for item in value]
            else:
                out[key] = rewrite(value)
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            if ref not in names:
                last = _RULE_UNSAFE.sub("-", ref.rsplit("/", 1)[-1]).strip("-")
                names[ref] = f"{scope}-{len(names)}" + (f"-{last}" if last else "")
                defs[names[ref]] = {}  # claimed before its target, which may refer back
                defs[names[ref]] = rewrite(_pointed(schema, ref))
            out["$ref"] = f"#/$defs/{names[ref]}"
        if "properties" in out and out.get("additionalProperties") in (True, {}):
            del out["additionalProperties"]
        if out.get("items") == {}:
            del out["items"]
        pattern = out.get("pattern")
        if isinstance(pattern, str) and not (pattern.startswith("^") and pattern.endswith("$")):
            del out["pattern"]
        return out

    prepared: dict[str, Any] = rewrite(schema)
    if defs:
        prepared["$defs"] = defs
    return prepared


_RULE_UNSAFE = re.compile(r"[^a-zA-Z0-9-]+")
# Keywords whose values are data, not schemas, and those whose values map names to schemas.
_DATA = frozenset({"const", "default", "enum", "examples", "required"})
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "dependentSchemas"})


def _pointed(schema: dict[str, Any], ref: str) -> Any:
    """What the local reference ``ref`` (``#``, ``#/$defs/Name``…) points at in ``schema``."""
    node: Any = schema
    for part in ref.removeprefix("#").split("/")[1:]:
        key = part.replace("~1", "/").replace("~0", "~")
        try:
            node = node[int(key)] if isinstance(node, list) else node[key]
        except (KeyError, IndexError, ValueError, TypeError):
            raise ValueError(f"the schema has no {ref!r}") from None
    return node


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


def _json_literal(text: str) -> str:
    """A GBNF literal for the JSON text ``text``, which may hold its non-ASCII characters raw.

    The converter writes names and constants with ``json.dumps``, which escapes them; the
    model is let write them as they are (``"서울"``, not ``"\\uc11c\\uc6b8"``).
    """
    return _literal(_JSON_ESCAPE.sub(_unescaped, text))


# A JSON escape: ``\uXXXX`` or a backslash and one character (``\\`` must not start a ``\u``).
_JSON_ESCAPE = re.compile(r"\\(u[0-9a-fA-F]{4}|.)")


def _unescaped(match: re.Match[str]) -> str:
    escape = match.group(1)
    if escape[0] != "u":
        return match.group(0)
    code = int(escape[1:], 16)
    # Control characters stay escaped, and so do surrogates: half an emoji is not text.
    return chr(code) if code >= 0x80 and not 0xD800 <= code <= 0xDFFF else match.group(0)


def _literal(text: str) -> str:
    """A GBNF string literal for ``text`` (GBNF takes JSON's escapes)."""
    return json.dumps(text, ensure_ascii=False)
