"""How often the local model picks the right tool (or none) for a fixed set of prompts.

Each prompt goes to ``LocalModel.stream`` once with the four real tools offered, as the
agent's first round does; a case is right when the model calls the expected tool with
plausible arguments, or answers in text when no tool is expected.

Run: ``.venv/bin/python bench/tool_accuracy.py [--model PATH.gguf] [--repeat N] [-v]``
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatstream.messages import Message, ToolCallRequest
from chatstream.models.base import TextDelta, ToolSpec
from chatstream.models.local import LocalModel
from chatstream.prompts import SYSTEM_PROMPT
from chatstream.tools import default_tools

Check = Callable[[dict[str, Any]], bool]


def _mentions(*names: str) -> Check:
    return lambda args: any(n.lower() in str(args).lower() for n in names)


def _anything(args: dict[str, Any]) -> bool:
    return True


@dataclass(frozen=True)
class Case:
    prompt: str
    tool: str | None
    arguments: Check = _anything


CASES = (
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


def tool_specs() -> list[ToolSpec]:
    """What the server offers the model: the four real tools."""
    return [t.spec for t in default_tools()]


async def run_case(model: LocalModel, case: Case, tools: list[ToolSpec]) -> tuple[bool, str]:
    """Whether the model got ``case`` right, and what it did."""
    messages = [Message("system", SYSTEM_PROMPT), Message("user", case.prompt)]
    calls: list[ToolCallRequest] = []
    text: list[str] = []
    async for event in model.stream(messages, tools):
        if isinstance(event, ToolCallRequest):
            calls.append(event)
        elif isinstance(event, TextDelta):
            text.append(event.text)
    if calls:
        call = calls[0]
        did = f"{call.name}({call.arguments})"
        right = case.tool == call.name and case.arguments(call.arguments)
    else:
        did = "text: " + "".join(text)[:70].replace("\n", " ")
        right = case.tool is None
    return right, did


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a GGUF file (default: the embedded model)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of the whole set")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every case")
    options = parser.parse_args()
    if options.verbose:
        logging.basicConfig(format="    %(message)s")
        logging.getLogger("chatstream.models.local").setLevel(logging.DEBUG)

    model = LocalModel(options.model, max_tokens=64)
    tools = tool_specs()
    started = time.perf_counter()
    await model.warm_up(())
    print(f"model {model.name} loaded in {time.perf_counter() - started:.2f} s")
    right = total = 0
    try:
        for _ in range(options.repeat):
            for case in CASES:
                ok, did = await run_case(model, case, tools)
                right += ok
                total += 1
                if options.verbose or not ok:
                    mark = "ok  " if ok else "MISS"
                    print(f"{mark} {case.prompt!r:48} expected {case.tool or 'text'}; got {did}")
    finally:
        await model.aclose()
    print(f"tool choice right: {right}/{total} ({100 * right / total:.0f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
