"""How often the local model picks the right tool (or none), with the right arguments.

Two tool sets, each with its own prompts:

- ``builtin``: the four real tools (weather, time, arithmetic, temperature conversion);
- ``custom``: seven tools of other shapes, as a team's own code or an MCP server offers
  them: nested objects in an array, enums, optional filters, lists of strings, and
  MCP-style names such as ``files__read-file``. Their schemas come from ``@tool`` (so
  pydantic's ``$defs``/``$ref``), or are written as an MCP server sends them.

Each prompt goes to ``LocalModel.stream`` once with its set's tools offered, as the agent's
first round does; a case is right when the model calls the expected tool with arguments of
the expected shape (the right enum member, the nested fields present), or answers in text
when no tool is expected. Only the first words of a text answer are read (the choice is
made before its first token), so a text case costs a few tokens.

Then, unless ``--no-answers``, the question set of ``bench/answers.py`` goes through the
agent with the built-in tools: whether the answers are right, and whether a general
question that names a place or holds a number drew a call. Every model named in
``--models`` (the pinned ``local`` and ``local:small``, or ``local:PATH.gguf``) runs all of
it, one after the other, in one process.

Run: ``.venv/bin/python bench/tool_accuracy.py [--models local,local:small] [--tools
builtin|custom|both] [--repeat N] [--no-answers] [-v]``
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # ``python bench/tool_accuracy.py`` as well as ``-m``

from bench.answers import run_questions  # noqa: E402

from chatstream.errors import ModelError  # noqa: E402
from chatstream.messages import Message, ToolCallRequest  # noqa: E402
from chatstream.models.base import TextDelta, ToolSpec  # noqa: E402
from chatstream.models.local import LocalModel  # noqa: E402
from chatstream.models.weights import WEIGHTS  # noqa: E402
from chatstream.prompts import SYSTEM_PROMPT  # noqa: E402
from chatstream.tools import ToolContext, default_tools, tool  # noqa: E402

Check = Callable[[dict[str, Any]], bool]

# A text answer is read this far: enough to show what it was.
_TEXT_SHOWN = 70


def _mentions(*names: str) -> Check:
    return lambda args: any(n.lower() in str(args).lower() for n in names)


def _anything(args: dict[str, Any]) -> bool:
    return True


def _says(value: Any, *names: str) -> bool:
    """Whether ``value`` (any JSON) mentions one of ``names``, ignoring case."""
    return any(n.lower() in str(value).lower() for n in names)


def _emails(value: Any) -> list[str]:
    """The e-mail addresses in a list of attendees or recipients (objects or strings)."""
    if not isinstance(value, list):
        return []
    found = []
    for item in value:
        address = item.get("email") if isinstance(item, dict) else item
        if isinstance(address, str):
            found.append(address.lower())
    return found


@dataclass(frozen=True)
class Case:
    prompt: str
    tool: str | None
    arguments: Check = _anything


BUILTIN_CASES = (
    # Weather, in several cities and languages.
    Case("What's the weather in Seoul?", "get_weather", _mentions("Seoul", "서울")),
    Case("서울 날씨 어때?", "get_weather", _mentions("Seoul", "서울")),
    Case("부산은 지금 비가 와?", "get_weather", _mentions("Busan", "부산")),
    Case("오늘 도쿄 날씨 알려줘", "get_weather", _mentions("Tokyo", "도쿄", "東京")),
    Case("Quel temps fait-il à Paris aujourd'hui ?", "get_weather", _mentions("Paris")),
    Case("東京の天気はどうですか？", "get_weather", _mentions("Tokyo", "東京")),  # noqa: RUF001
    Case("How hot is it in New York right now?", "get_weather", _mentions("New York")),
    # The time in a zone.
    Case("What time is it in Tokyo right now?", "get_current_time", _mentions("Tokyo")),
    Case("지금 뉴욕은 몇 시야?", "get_current_time", _mentions("New_York", "New York")),
    Case("What's today's date in UTC?", "get_current_time", _mentions("UTC", "Etc")),
    # Arithmetic.
    Case("What is 1234 * 5678?", "calculate", _mentions("1234")),
    Case("Calculate (17 + 25) / 3 for me.", "calculate", _mentions("17")),
    Case("240의 15%는 얼마야?", "calculate", _mentions("240")),
    # Temperature conversion.
    Case("Convert 30 degrees Celsius to Fahrenheit.", "convert_temperature", _mentions("30")),
    Case("섭씨 25도는 화씨로 몇 도야?", "convert_temperature", _mentions("25")),
    # Small talk and general questions: no tool.
    Case("Hi! How are you today?", None),
    Case("안녕하세요! 자기소개 해 주세요.", None),
    Case("Tell me a short joke about programmers.", None),
    Case("Thanks, that's all for now!", None),
    Case("What is the capital of France?", None),
    Case("Write a haiku about spring.", None),
    Case("파이썬에서 리스트를 정렬하는 방법을 알려줘.", None),
    # Bare acknowledgements: nothing for a tool to use.
    Case("ok", None),
    Case("yes", None),
    Case("응", None),
)


# The custom set. The tools never run: the bench reads the calls the model makes.


class Attendee(BaseModel):
    email: str
    role: Literal["required", "optional"] = "required"


class Mode(StrEnum):
    heat = "heat"
    cool = "cool"
    auto = "auto"
    off = "off"


@tool
async def create_calendar_event(
    ctx: ToolContext,
    title: str,
    start: str,
    attendees: list[Attendee],
    duration_minutes: int = 30,
    visibility: Literal["public", "private"] = "private",
) -> str:
    """Create an event in the user's calendar and invite people to it.

    Args:
        title: What the event is called.
        start: When it starts, ISO 8601 (2025-03-14T15:00).
        attendees: Who is invited, each by e-mail address.
        duration_minutes: How long it lasts.
        visibility: Who can see it.
    """
    return ""


@tool
async def search_orders(
    ctx: ToolContext,
    customer: str | None = None,
    status: Literal["pending", "shipped", "delivered", "cancelled"] | None = None,
    placed_after: str | None = None,
    limit: int = 10,
) -> str:
    """Search the shop's orders; every filter is optional.

    Args:
        customer: The customer's name.
        status: Only orders in this state.
        placed_after: Only orders placed after this date (YYYY-MM-DD).
        limit: At most this many orders.
    """
    return ""


@tool
async def set_thermostat(
    ctx: ToolContext, room: str, mode: Mode, target_celsius: float | None = None
) -> str:
    """Set a room's thermostat: its mode and, optionally, the temperature to keep.

    Args:
        room: The room, e.g. "kitchen".
        mode: heat, cool, auto, or off.
        target_celsius: The temperature to keep, in °C.
    """
    return ""


@tool
async def translate_text(
    ctx: ToolContext,
    text: str,
    target_language: str,
    formality: Literal["formal", "informal"] | None = None,
) -> str:
    """Translate a text into another language.

    Args:
        text: The text to translate, as the user gave it.
        target_language: The language to translate into, e.g. "German".
        formality: The register of the translation, when the user asks for one.
    """
    return ""


@tool
async def send_email(
    ctx: ToolContext, to: list[str], subject: str, body: str, cc: list[str] | None = None
) -> str:
    """Send an e-mail on the user's behalf.

    Args:
        to: The recipients' e-mail addresses.
        subject: The subject line.
        body: The message.
        cc: Addresses to copy in.
    """
    return ""


# As MCP servers send them: <server>__<tool>, a hand-written JSON schema.
READ_FILE = ToolSpec(
    name="files__read-file",
    description="Read the contents of a file on the user's disk, or only its first lines.",
    parameters={
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object",
        "properties": {
            "path": {"type": "string", "description": "The file's path."},
            "head": {"type": "integer", "description": "Read only this many first lines."},
        },
        "required": ["path"],
        "additionalProperties": False,
    },
)
CREATE_ISSUE = ToolSpec(
    name="github__create-issue",
    description="Open a new issue in a GitHub repository.",
    parameters={
        "type": "object",
        "properties": {
            "owner": {"type": "string", "description": "The repository's owner."},
            "repo": {"type": "string", "description": "The repository's name."},
            "title": {"type": "string"},
            "body": {"type": "string"},
            "labels": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["owner", "repo", "title"],
    },
)


def _event(*emails: str, visibility: str | None = None) -> Check:
    def check(args: dict[str, Any]) -> bool:
        invited = _emails(args.get("attendees"))
        attendees = args.get("attendees")
        nested = isinstance(attendees, list) and all(isinstance(a, dict) for a in attendees)
        return (
            nested
            and all(any(e in address for address in invited) for e in emails)
            and (visibility is None or args.get("visibility") == visibility)
            and bool(args.get("title"))
        )

    return check


def _thermostat(room: str, mode: str, target: float | None = None) -> Check:
    return lambda args: (
        _says(args.get("room"), room)
        and args.get("mode") == mode
        and (target is None or args.get("target_celsius") == target)
    )


CUSTOM_CASES = (
    # A nested array of objects, and an enum with a default.
    Case(
        "Schedule a budget review on 2025-05-20 at 15:00 with dana@example.com.",
        "create_calendar_event",
        _event("dana@example.com"),
    ),
    Case(
        "Put a public event 'Company picnic' in my calendar for July 4th 2025 at noon and "
        "invite sam@corp.com and lee@corp.com.",
        "create_calendar_event",
        _event("sam@corp.com", "lee@corp.com", visibility="public"),
    ),
    Case(
        "다음 주 월요일 오전 10시에 팀 회의 일정 잡아줘. 참석자는 minsu@example.com이야.",
        "create_calendar_event",
        _event("minsu@example.com"),
    ),
    # Optional filters only.
    Case(
        "Show me all the orders that have shipped.",
        "search_orders",
        lambda args: args.get("status") == "shipped",
    ),
    Case(
        "Find the orders placed by Alice Kim.",
        "search_orders",
        lambda args: _says(args.get("customer"), "Alice"),
    ),
    Case(
        "취소된 주문 5개만 보여줘.",
        "search_orders",
        lambda args: args.get("status") == "cancelled" and args.get("limit") == 5,
    ),
    # An MCP-style name with "__" and "-".
    Case(
        "Read the file /etc/hosts for me.",
        "files__read-file",
        lambda args: args.get("path") == "/etc/hosts",
    ),
    Case(
        "Show me the first 20 lines of notes/todo.md.",
        "files__read-file",
        lambda args: _says(args.get("path"), "todo.md") and args.get("head") == 20,
    ),
    Case(
        "Open an issue in octocat/hello-world titled 'Crash on start' with the label bug.",
        "github__create-issue",
        lambda args: (
            args.get("owner") == "octocat"
            and args.get("repo") == "hello-world"
            and _says(args.get("title"), "crash")
            and "bug" in [str(label).lower() for label in args.get("labels") or []]
        ),
    ),
    # An enum behind a $ref.
    Case(
        "Heat the living room to 22 degrees.",
        "set_thermostat",
        _thermostat("living", "heat", 22),
    ),
    Case("Turn the bedroom thermostat off.", "set_thermostat", _thermostat("bedroom", "off")),
    Case("Cool the office down to 19°C, please.", "set_thermostat", _thermostat("office", "cool")),
    Case("거실 온도 조절기를 자동 모드로 해줘.", "set_thermostat", _thermostat("거실", "auto")),
    # Strings, one optional enum.
    Case(
        "Translate 'good morning' into Spanish.",
        "translate_text",
        lambda args: (
            _says(args.get("text"), "good morning")
            and _says(args.get("target_language"), "spanish", "es", "español")
        ),
    ),
    Case(
        "이 문장을 영어로 번역해줘: 오늘 날씨가 좋네요",
        "translate_text",
        lambda args: (
            _says(args.get("text"), "날씨")
            and _says(args.get("target_language"), "english", "en", "영어")
        ),
    ),
    Case(
        "Translate 'see you tomorrow' into formal German.",
        "translate_text",
        lambda args: (
            _says(args.get("target_language"), "german", "de", "deutsch")
            and args.get("formality") == "formal"
        ),
    ),
    # A list of strings.
    Case(
        "Email bob@example.com and carol@example.com with the subject 'Release update' "
        "saying the release moves to Friday.",
        "send_email",
        lambda args: (
            {"bob@example.com", "carol@example.com"} <= set(_emails(args.get("to")))
            and _says(args.get("subject"), "release")
        ),
    ),
    Case(
        "Send an email to jane@corp.com telling her I'll be late today.",
        "send_email",
        lambda args: _emails(args.get("to")) == ["jane@corp.com"] and bool(args.get("body")),
    ),
    # No tool: small talk, general questions, and questions about what a tool handles.
    Case("Hi there! What can you do?", None),
    Case("What is the capital of Italy?", None),
    Case("Write a two-line poem about the sea.", None),
    Case("What does a thermostat do?", None),
    Case("고마워요, 오늘은 여기까지 할게요.", None),
    Case("ok", None),
)


def tool_specs(tools: str) -> list[ToolSpec]:
    """What the server offers the model for a set: the four real tools, or the custom ones."""
    if tools == "builtin":
        return [t.spec for t in default_tools()]
    made = (create_calendar_event, search_orders, set_thermostat, translate_text, send_email)
    return [*(t.spec for t in made), READ_FILE, CREATE_ISSUE]


SETS = {"builtin": BUILTIN_CASES, "custom": CUSTOM_CASES}


async def run_case(model: LocalModel, case: Case, tools: list[ToolSpec]) -> tuple[bool, str]:
    """Whether the model got ``case`` right, and what it did."""
    messages = [Message("system", SYSTEM_PROMPT), Message("user", case.prompt)]
    calls: list[ToolCallRequest] = []
    text = ""
    try:
        async with aclosing(model.stream(messages, tools)) as events:
            async for event in events:
                if isinstance(event, ToolCallRequest):
                    calls.append(event)
                elif isinstance(event, TextDelta):
                    text += event.text
                    if len(text) >= _TEXT_SHOWN:
                        break  # the choice was made before the first token
    except ModelError as exc:
        return False, f"error: {exc}"
    if calls:
        call = calls[0]
        did = f"{call.name}({call.arguments})"
        right = case.tool == call.name and case.arguments(call.arguments)
    else:
        did = "text: " + text[:_TEXT_SHOWN].replace("\n", " ")
        right = case.tool is None
    return right, did


async def run_set(
    model: LocalModel, name: str, repeat: int, verbose: bool
) -> tuple[int, int, float]:
    """Right answers, cases and seconds for one tool set."""
    tools = tool_specs(name)
    right = total = 0
    started = time.perf_counter()
    for _ in range(repeat):
        for case in SETS[name]:
            ok, did = await run_case(model, case, tools)
            right += ok
            total += 1
            if verbose or not ok:
                mark = "ok  " if ok else "MISS"
                print(f"{mark} [{name}] {case.prompt[:46]!r:48} expected {case.tool or 'text'}")
                print(f"       got {did}")
    return right, total, time.perf_counter() - started


def local_model(spec: str, **options: Any) -> LocalModel:
    """The local model a spec names: a pinned set of weights, or ``local:PATH.gguf``."""
    if spec in WEIGHTS:
        return LocalModel(weights=WEIGHTS[spec], **options)
    return LocalModel(Path(spec.removeprefix("local:")), **options)


async def run_model(spec: str, names: Sequence[str], options: argparse.Namespace) -> list[str]:
    """Every set, then the answers, on one model; the lines to report."""
    # A call of the custom set takes up to about 100 tokens; text is cut short anyway.
    model = local_model(spec, max_tokens=256)
    started = time.perf_counter()
    await model.warm_up(())
    figures = [f"loaded in {time.perf_counter() - started:.1f} s"]
    try:
        for name in names:
            right, total, seconds = await run_set(model, name, options.repeat, options.verbose)
            count = len(tool_specs(name))
            figures.append(
                f"{name + ':':9} {right}/{total} right ({100 * right / total:.0f}%), "
                f"{count} tools, {seconds:.0f} s"
            )
        if options.answers:
            summary = await run_questions(model, verbose=options.verbose)
            figures += summary.lines()
    finally:
        await model.aclose()
    return figures


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tools", choices=("builtin", "custom", "both"), default="both", help="tool sets"
    )
    parser.add_argument(
        "--models", default="local,local:small", help="local models, by commas (local:PATH.gguf)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of each set")
    parser.add_argument(
        "--no-answers", dest="answers", action="store_false", help="skip bench/answers.py"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="print every case")
    options = parser.parse_args()
    if options.verbose:
        logging.basicConfig(format="    %(message)s")
        logging.getLogger("chatstream.models.local").setLevel(logging.DEBUG)

    names = ["builtin", "custom"] if options.tools == "both" else [options.tools]
    report = {spec: await run_model(spec, names, options) for spec in options.models.split(",")}
    print("tool choice and arguments right; answers right")
    for spec, figures in report.items():
        print(spec)
        for line in figures:
            print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
