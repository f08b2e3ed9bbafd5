"""The system prompt every model is given, and the extra help the small local model gets."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence

SYSTEM_PROMPT = (
    # "Korean in, Korean out" was here once: the 0.5B local model read it as "answer in
    # Korean" and wrote English questions' answers in Korean.
    "You are Chatstream, a helpful assistant. Always reply in the language of the user's "
    "latest message. Be concise. Use a tool only when the user asks "
    "for something a tool provides (current weather, the current time, arithmetic, a "
    "temperature conversion); answer small talk and general questions directly. When a tool "
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
# (in the call format its grammar enforces), only for the tools it is offered. None of
# them is a prompt of bench/tool_accuracy.py, so that figure is not flattered by them.
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
_SMALL_TALK = (
    # A bare "hello" scored as a call (0.62) until it had an example of its own (0.05).
    ("Hello", "Hello! How can I help you today?"),
    ("Good morning!", "Good morning! How can I help you today?"),
    ("너는 누구야?", "저는 Chatstream이에요. 날씨, 시간, 계산 같은 것을 도와드릴 수 있어요."),
)


def local_tool_guide(tools: Iterable[str]) -> str:
    """Rules and worked examples for calling ``tools``, to append to the system prompt."""
    lines = [
        "",
        "# How to use the tools",
        "You cannot know live weather or the current time, and you make mistakes in "
        "arithmetic, so for those you call a tool, in any language, instead of guessing. "
        "For anything else you answer directly in plain text.",
        "",
        "Examples:",
    ]
    for name in tools:
        for question, arguments in _EXAMPLES.get(name, ()):
            call = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
            lines += [f"User: {question}", f"Assistant: <tool_call>\n{call}\n</tool_call>"]
    for question, answer in _SMALL_TALK:
        lines += [f"User: {question}", f"Assistant: {answer}"]
    return "\n".join(lines)


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
