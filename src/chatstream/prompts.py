"""The system prompt every model is given, and the extra help the small local model gets."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chatstream.models.base import ToolSpec

SYSTEM_PROMPT = (
    # "Korean in, Korean out" was here once: the 0.5B local model read it as "answer in
    # Korean" and wrote English questions' answers in Korean. It names no tool: the tools
    # are whatever the server offers (the local model's guide lists what they provide).
    "You are Chatstream, a helpful assistant. Always reply in the language of the user's "
    "latest message. Be concise. Use a tool only when the user asks for something one of "
    "your tools provides; answer small talk and general questions directly. When a tool "
    "fails, say so plainly instead of inventing a result."
)


def system_prompt_from(value: str) -> str:
    """The system prompt a setting names: text, ``@path`` of a UTF-8 file, or "" (the default).

    ``ValueError`` names a file that cannot be read.
    """
    if not value.strip():
        return SYSTEM_PROMPT
    if value.startswith("@"):
        path = value[1:]
        try:
            with open(path, encoding="utf-8") as file:
                text = file.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read the system prompt file {path!r}: {exc}") from None
        if not text.strip():
            raise ValueError(f"the system prompt file {path!r} is empty")
        return text.strip()
    return value


# A 0.5B model follows examples far better than rules, so the local model is shown a few
# (in the call format its grammar enforces), only for the tools it is offered: written by
# hand for the built-in tools, made from the schema for any other. None of them is a
# prompt of bench/tool_accuracy.py, so that figure is not flattered by them.
_EXAMPLES: dict[str, tuple[tuple[str, dict[str, object]], ...]] = {
    "get_weather": (
        ("Is it snowing in Berlin?", {"location": "Berlin"}),
        ("대구 날씨 알려줘", {"location": "Daegu"}),
    ),
    "get_current_time": (
        ("What's the time in London?", {"timezone": "Europe/London"}),
        ("시드니는 지금 몇 시예요?", {"timezone": "Australia/Sydney"}),
    ),
    "calculate": (("What's 48 * 12 - 7?", {"expression": "48 * 12 - 7"}),),
    "convert_temperature": (
        ("How much is 100 F in Celsius?", {"value": 100, "from_unit": "F", "to_unit": "C"}),
    ),
}
# What the built-in tools provide, in the guide's rule; other tools' come from their
# descriptions.
_TOPICS = {
    "get_weather": "live weather",
    "get_current_time": "the current time and date",
    "calculate": "arithmetic (you make mistakes in it)",
    "convert_temperature": "temperature conversions",
}
_SMALL_TALK = (
    # A bare "hello" scored as a call (0.62) until it had an example of its own (0.05).
    ("Hello", "Hello! How can I help you today?"),
    ("Good morning!", "Good morning! How can I help you today?"),
    # It named the built-in tools' topics once; the tools are whatever the server offers.
    ("너는 누구야?", "저는 Chatstream이에요. 무엇을 도와드릴까요?"),
)


def local_tool_guide(tools: Iterable[ToolSpec], *, examples: bool = True) -> str:
    """Rules for calling ``tools``, to append to the system prompt.

    With ``examples``, worked example calls and small talk: the 0.5B follows examples far
    better than rules. Without, a rule that says what to answer directly instead: the 1.5B
    knows its template's call format, and the examples primed it into calling a tool for
    questions that merely named a city (bench/tool_accuracy.py, bench/answers.py).
    """
    tools = list(tools)
    lines = [
        "",
        "# How to use the tools",
        "You cannot look these up or do them yourself, so your tools do them:",
        *(f"- {spec.name}: {_topic(spec)}" for spec in tools),
        "When the user asks for one of these, in any language, you call the tool instead "
        "of guessing."
        + (" For anything else you answer directly in plain text." if examples else _DIRECTLY),
    ]
    if not examples:
        return "\n".join(lines)
    lines += ["", "Examples:"]
    for spec in tools:
        for question, arguments in _EXAMPLES.get(spec.name) or (_example(spec),):
            call = json.dumps({"name": spec.name, "arguments": arguments}, ensure_ascii=False)
            lines += [f"User: {question}", f"Assistant: <tool_call>\n{call}\n</tool_call>"]
    for question, answer in _SMALL_TALK:
        lines += [f"User: {question}", f"Assistant: {answer}"]
    return "\n".join(lines)


# What a guide without examples says of everything else. Naming the kinds of question took
# a Korean question about a train journey between two cities (and questions with numbers)
# from a weather call down to a text answer.
_DIRECTLY = (
    " Answer anything else yourself, in plain text: knowledge, explanations, advice, travel "
    "times and distances, history, small talk, also when the question names a place, a date "
    "or a number."
)


def _topic(spec: ToolSpec) -> str:
    """What ``spec`` provides, in a few words: its description's first clause."""
    if spec.name in _TOPICS:
        return _TOPICS[spec.name]
    clause = re.split(r"(?<=[^.\s]{2})[.;:!?](?:\s|$)|\n", spec.description.strip(), maxsplit=1)[0]
    clause = clause.strip().rstrip(".")
    if not clause:  # no description: the name's words ("files__read-file": "read file")
        return re.sub(r"[_\-\s]+", " ", spec.name.split("__")[-1]).strip()
    return _lowered(clause)[:120]


def _lowered(text: str) -> str:
    """``text`` with its first letter lowered, unless it starts an acronym ("HTTP")."""
    if text[:2].isupper() or not text[:1].isupper():
        return text
    return text[0].lower() + text[1:]


def _example(spec: ToolSpec) -> tuple[str, dict[str, object]]:
    """A request and the call that answers it, made from ``spec``'s description and schema."""
    arguments = example_arguments(spec.parameters)
    if not isinstance(arguments, dict):
        arguments = {}
    request = _topic(spec)
    request = request[:1].upper() + request[1:]
    details = "; ".join(_details(arguments))
    return (f"{request}: {details}" if details else request), arguments


def _details(value: object, key: str = "") -> list[str]:
    """``value``'s leaves as "key value" phrases, as a person might list them."""
    if isinstance(value, dict):
        return [phrase for k, v in value.items() for phrase in _details(v, str(k))]
    if isinstance(value, list):
        if all(not isinstance(item, dict | list) for item in value):
            return [f"{_words(key)} {', '.join(map(str, value))}".strip()]
        return [phrase for item in value for phrase in _details(item, key)]
    return [f"{_words(key)} {value}".strip()]


def _words(key: str) -> str:
    return re.sub(r"[_\-]+", " ", key).strip()


# Plausible values for required strings, by words in their names. A request and its call
# hold the same values, so that the example shows where a call's arguments come from.
_SAMPLE_STRINGS = (
    (("email", "mail"), "alex@example.com"),
    (("url", "uri", "link", "website"), "https://example.com"),
    (("path", "file", "folder", "directory"), "docs/plan.txt"),
    (("datetime", "start", "end", "time", "when", "deadline"), "2025-06-02T10:00"),
    (("date", "day"), "2025-06-02"),
    (("city", "location", "place", "address", "country", "region"), "Lisbon"),
    (("language", "lang", "locale"), "French"),
    (("user", "customer", "owner", "author", "person", "assignee", "recipient"), "Alex"),
    (("title", "subject", "summary", "topic", "name"), "Quarterly report"),
    (("query", "search", "keyword", "term"), "blue shoes"),
    (("text", "body", "message", "content", "note", "comment"), "See you at noon"),
    (("repo", "repository", "project"), "website"),
)
# An example in a property's description: e.g. "kitchen", for example 'Paris'.
_OPENING, _CLOSING = "\"'\u201c\u2018", "\"'\u201d\u2019"
_GIVEN_EXAMPLE = re.compile(
    rf"(?:e\.g\.|for example|such as),?\s*[{_OPENING}]([^{_CLOSING}]{{1,40}})[{_CLOSING}]",
    re.IGNORECASE,
)
_SAMPLE_FORMATS = {
    "date-time": "2025-06-02T10:00:00Z",
    "date": "2025-06-02",
    "time": "10:00:00",
    "email": "alex@example.com",
    "uri": "https://example.com",
    "url": "https://example.com",
    "uuid": "123e4567-e89b-12d3-a456-426614174000",
}


def example_arguments(schema: dict[str, Any]) -> object:
    """A value that fits the JSON ``schema``: its required fields, one enum member, one item."""
    return _sample(schema, schema, "", 0)


def _sample(schema: object, root: dict[str, Any], key: str, depth: int) -> object:
    if not isinstance(schema, dict) or depth > 8:
        return None
    ref = schema.get("$ref")
    if isinstance(ref, str):
        return _sample(_referred(root, ref), root, key, depth + 1)
    for keyword in ("examples", "enum"):
        if isinstance(schema.get(keyword), list) and schema[keyword]:
            return schema[keyword][0]
    if "const" in schema:
        return schema["const"]
    if "default" in schema and schema["default"] is not None:
        return schema["default"]
    branches = schema.get("anyOf") or schema.get("oneOf") or schema.get("allOf")
    if isinstance(branches, list):
        kinds = [b for b in branches if not (isinstance(b, dict) and b.get("type") == "null")]
        return _sample(kinds[0] if kinds else None, root, key, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind == "object" or (kind is None and "properties" in schema):
        properties = schema.get("properties") or {}
        required = [name for name in schema.get("required") or () if name in properties]
        # With nothing required, one field shows what the arguments look like.
        chosen = required or list(properties)[:1]
        return {name: _sample(properties[name], root, name, depth + 1) for name in chosen}
    if kind == "array":
        count = max(1, int(schema.get("minItems") or 1))
        items = schema.get("items")
        items = dict(items) if isinstance(items, dict) else {}
        # The array's description says what its items are ("the recipients' addresses").
        items.setdefault("description", schema.get("description"))
        return [_sample(items, root, key, depth + 1) for _ in range(count)]
    if kind == "integer":
        return int(schema.get("minimum", 3))
    if kind == "number":
        return schema.get("minimum", 2.5)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return _sample_string(schema, key)


def _sample_string(schema: dict[str, Any], key: str) -> str:
    """A plausible string for the property ``key``: by its format, name or description."""
    if schema.get("format") in _SAMPLE_FORMATS:
        return _SAMPLE_FORMATS[str(schema["format"])]
    description = str(schema.get("description") or "")
    given = _GIVEN_EXAMPLE.search(description)
    # The name first, then an example the description gives; the description's words
    # last, as they mislead more often ("the text, as the user gave it" is no user).
    return _named(key) or (given.group(1) if given else None) or _named(description) or "example"


def _named(text: str) -> str | None:
    """The sample string for the first kind of value that a word of ``text`` names."""
    words = [w.lower() for w in re.findall(r"[a-z]+|[A-Z][a-z]*", text)]
    for names, value in _SAMPLE_STRINGS:
        if any(w == n or w.startswith(n) or w.endswith(n) for w in words for n in names):
            return value
    return None


def _referred(root: dict[str, Any], ref: str) -> object:
    """What a local ``$ref`` (``#/$defs/Name``) points at in ``root``; None when nothing."""
    node: object = root
    for part in ref.removeprefix("#").split("/")[1:]:
        if not isinstance(node, dict):
            return None
        node = node.get(part.replace("~1", "/").replace("~0", "~"))
    return node


# How the local model is told what its tools returned: folded into the user's own message,
# with a request to answer. It reads this far better than a tool message (after which it
# called the tool again and again) or a separate user turn (after which it mostly said
# "Sorry, I can't assist with that", or invented the weather when the tool had failed).
_RESULT = "{tool} returned: {content}"
_FAILURE = "{tool} failed: {content}"
_ASK_ANSWER = "Reply by answering my question with this."
_ASK_FAILURE = "Reply by telling me you could not get this, and why."
_ASK_MIXED = "Reply by answering my question with this; where a tool failed, tell me so, and why."


def restate_results(question: str, results: Sequence[tuple[str, str, bool]]) -> str:
    """``question``, the ``(tool, content, is_error)`` results of its calls, and a request."""
    lines = [
        (_FAILURE if is_error else _RESULT).format(tool=tool, content=content)
        for tool, content, is_error in results
    ]
    failures = sum(is_error for _, _, is_error in results)
    ask = _ASK_FAILURE if failures == len(results) else _ASK_MIXED if failures else _ASK_ANSWER
    language = _language(question)
    if language:
        # The model answers in the language of the nearest example unless told otherwise.
        ask += f" Reply in {language}."
    return "\n".join([question, "", *lines, ask])


_SCRIPTS = (
    (re.compile(r"[\uac00-\ud7a3]"), "Korean"),
    (re.compile(r"[\u3040-\u30ff]"), "Japanese"),
    (re.compile(r"[\u4e00-\u9fff]"), "Chinese"),
    (re.compile(r"[\u0400-\u04ff]"), "Russian"),
)


def _language(text: str) -> str | None:
    """The language that ``text``'s script gives away, when it does (not for Latin script)."""
    return next((name for script, name in _SCRIPTS if script.search(text)), None)


# Worked answers from tool results, shown to the local model as earlier turns. Without them
# it relayed a failed weather lookup in 15 of 30 sampled replies (and otherwise made up the
# weather or said "Sorry, I can't assist with that"); with them, in all 8 of 8 tried.
_ANSWER_EXAMPLES = (
    (
        "대구 날씨 알려줘",
        (("get_weather", "Timed out after 20 s.", True),),
        "죄송해요, 날씨 서비스가 응답하지 않아서(20초 시간 초과) 대구 날씨를 확인하지 못했어요.",
    ),
    (
        "What time is it in Lima?",
        (("get_current_time", "Unknown time zone 'Lima'.", True),),
        "Sorry, I could not get the time in Lima: the time zone 'Lima' is unknown.",
    ),
    ("What is 7 * 8?", (("calculate", "56", False),), "7 * 8 = 56."),
)


def local_answer_examples() -> list[tuple[str, str]]:
    """(user, assistant) turns that show answering from tool results, failures included."""
    return [
        (restate_results(question, results), answer)
        for question, results, answer in _ANSWER_EXAMPLES
    ]
