"""A deterministic model for tests and demos; never the default.

It reads the latest user message and, when tools are offered, asks for them
the way a real model would:

* weather (``weather``, ``날씨``) -> ``get_weather`` for each city named (several
  cities -> parallel calls); with a Celsius-to-Fahrenheit request too
  (``fahrenheit``, ``화씨``) it converts the temperature it got in a second round;
* time (``time``, ``시간``, ``몇 시``) -> ``get_current_time``;
* an arithmetic expression -> ``calculate``;
* ``convert 20 C to F`` / ``섭씨 20도를 화씨로`` -> ``convert_temperature``;
* ``call <tool> {json}`` -> exactly that call of any tool offered, your own and MCP
  servers' too (several joined by ``;`` run in parallel; the arguments default to ``{}``).

Once the tools have answered, it answers from their results. Anything else gets
a friendly answer in several tokens. Two phrases exist for tests and demos:
``count to N`` answers ``1 2 … N`` one token each, and ``simulate a model error``
streams two tokens and then fails with ``ModelError``. ``delay_s`` paces the
tokens like a real model.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from chatstream.errors import ModelError
from chatstream.messages import Message, ToolCallRequest
from chatstream.models.base import ModelEvent, TextDelta, ToolSpec, Usage
from chatstream.models.http import RAW_ARGUMENTS

_CITIES = {
    "서울": "Seoul",
    "부산": "Busan",
    "도쿄": "Tokyo",
    "뉴욕": "New York",
    "런던": "London",
    "파리": "Paris",
}
_CITY_ZONES = {
    "seoul": "Asia/Seoul",
    "서울": "Asia/Seoul",
    "tokyo": "Asia/Tokyo",
    "도쿄": "Asia/Tokyo",
    "new york": "America/New_York",
    "london": "Europe/London",
    "paris": "Europe/Paris",
}
_HANGUL = re.compile(r"[\uac00-\ud7a3]")
_ZONE = re.compile(r"\b([A-Z][a-z]+(?:/[A-Z][A-Za-z_]+)+|UTC)\b")
_EXPRESSION = re.compile(r"[-(]*\d[\d.\s]*(?:(?:\*\*|[-+*/%^])[-(\s]*\d[\d.\s)]*)+")
_EN_CITY = re.compile(r"\b(?:in|for|at)\s+([A-Z][a-zA-Z]+(?:\s+[A-Z][a-zA-Z]+)?)")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_COUNT_TO = re.compile(r"count to (\d+)", re.I)
# "call <tool> {json}", several joined by ";": exactly those calls, in one round.
_CALL = re.compile(r"\s*call\s+([A-Za-z0-9_.:-]+)\s*(.*)", re.S)
_TEMPERATURE_IN_RESULT = re.compile(r"(-?\d+(?:\.\d+)?)\s*°C")


class ScriptedModel:
    """Deterministic tool-calling model; see the module docstring for what it does."""

    def __init__(self, *, delay_s: float = 0.0) -> None:
        self.name = "scripted"
        self.delay_s = delay_s

    async def warm_up(self, tools: Sequence[ToolSpec], *, system_prompt: str = "") -> None:
        """Nothing to load."""

    async def aclose(self) -> None:
        """Nothing to release."""

    async def stream(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec]
    ) -> AsyncGenerator[ModelEvent, None]:
        """Answer the latest user message; see the module docstring."""
        last_user = max(i for i, m in enumerate(messages) if m.role == "user")
        prompt = messages[last_user].content
        results = [m for m in messages[last_user + 1 :] if m.role == "tool"]
        rounds = sum(1 for m in messages[last_user + 1 :] if m.tool_calls)
        offered = {t.name for t in tools}
        korean = bool(_HANGUL.search(prompt))
        prompt_tokens = sum(len(m.content.split()) + 1 for m in messages)

        calls = _plan_calls(prompt, results, rounds, offered)
        if calls:
            for index, (name, args) in enumerate(calls):
                yield ToolCallRequest(
                    id=f"call_{rounds + 1}_{index + 1}", name=name, arguments=args
                )
            yield Usage(prompt_tokens=prompt_tokens, completion_tokens=len(calls) * 8)
            return

        if "simulate a model error" in prompt.lower():
            for piece in ("Starting ", "to answer"):
                yield TextDelta(piece)
                await self._pace()
            raise ModelError("scripted model failure (as requested by the prompt)")

        pieces = _answer(prompt, results, korean, tools_offered=bool(offered))
        for piece in pieces:
            await self._pace()
            yield TextDelta(piece)
        yield Usage(prompt_tokens=prompt_tokens, completion_tokens=len(pieces))

    async def _pace(self) -> None:
        if self.delay_s > 0:
            await asyncio.sleep(self.delay_s)


def _explicit_calls(prompt: str) -> list[tuple[str, dict[str, Any]]]:
    """``call <tool> {json}; call <tool> {json}`` as those calls (arguments default to {})."""
    calls: list[tuple[str, dict[str, Any]]] = []
    for part in _split_calls(prompt):
        match = _CALL.fullmatch(part)
        if match is None:
            continue
        raw = match.group(2).strip()
        try:
            arguments = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            arguments = None
        if not isinstance(arguments, dict):
            arguments = {RAW_ARGUMENTS: raw}  # the agent tells the model they were not JSON
        calls.append((match.group(1), arguments))
    return calls


def _split_calls(prompt: str) -> list[str]:
    """The prompt cut at each ``;`` that is outside a JSON string or object."""
    parts, depth, quoted, escaped, start = [], 0, False, False, 0
    for index, char in enumerate(prompt):
        if quoted:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
        elif char == ";" and depth == 0:
            parts.append(prompt[start:index])
            start = index + 1
    parts.append(prompt[start:])
    return [p for p in parts if p.strip()]


def _plan_calls(
    prompt: str, results: list[Message], rounds: int, offered: set[str]
) -> list[tuple[str, dict[str, Any]]]:
    if rounds == 0 and offered and _CALL.match(prompt):
        return _explicit_calls(prompt)
    lowered = prompt.lower()
    wants_weather = "weather" in lowered or "날씨" in prompt
    wants_fahrenheit = "fahrenheit" in lowered or "화씨" in prompt
    if rounds == 0:
        if wants_weather and "get_weather" in offered:
            return [("get_weather", {"location": city}) for city in _cities(prompt)]
        if ("time" in lowered or "시간" in prompt or "몇 시" in prompt) and (
            "get_current_time" in offered
        ):
            return [("get_current_time", {"timezone": _zone(prompt)})]
        conversion = _conversion(prompt)
        if conversion and "convert_temperature" in offered:
            return [("convert_temperature", conversion)]
        expression = _EXPRESSION.search(prompt)
        if expression and "calculate" in offered:
            return [("calculate", {"expression": expression.group(0).strip().replace("^", "**")})]
    elif rounds == 1 and wants_weather and wants_fahrenheit and "convert_temperature" in offered:
        for result in results:
            match = _TEMPERATURE_IN_RESULT.search(result.content)
            if match and not result.is_error:
                value = float(match.group(1))
                return [("convert_temperature", {"value": value, "from_unit": "C", "to_unit": "F"})]
    return []


def _cities(prompt: str) -> list[str]:
    found = [english for korean, english in _CITIES.items() if korean in prompt]
    found += [m.group(1) for m in _EN_CITY.finditer(prompt)]
    # "Seoul and Tokyo": the second name has no preposition of its own.
    found += re.findall(r"\band\s+([A-Z][a-zA-Z]+)", prompt)
    unique = list(dict.fromkeys(found))
    return unique or ["Seoul"]


def _zone(prompt: str) -> str:
    match = _ZONE.search(prompt)
    if match:
        return match.group(1)
    lowered = prompt.lower()
    for city, zone in _CITY_ZONES.items():
        if city in lowered:
            return zone
    return "UTC"


def _conversion(prompt: str) -> dict[str, Any] | None:
    lowered = prompt.lower()
    if not any(
        w in lowered for w in ("convert", "celsius", "fahrenheit", "kelvin", "섭씨", "화씨")
    ):
        return None
    match = _NUMBER.search(prompt)
    if not match:
        return None
    units = []
    for word, unit in (
        ("섭씨", "C"),
        ("화씨", "F"),
        ("celsius", "C"),
        ("fahrenheit", "F"),
        ("kelvin", "K"),
    ):
        position = lowered.find(word)
        if position >= 0:
            units.append((position, unit))
    for unit_match in re.finditer(r"(?<![A-Za-z])([CFK])\b", prompt):
        units.append((unit_match.start(), unit_match.group(1)))
    ordered = [u for _, u in sorted(units)]
    from_unit = ordered[0] if ordered else "C"
    to_unit = next((u for u in ordered[1:] if u != from_unit), "F" if from_unit != "F" else "C")
    return {"value": float(match.group(0)), "from_unit": from_unit, "to_unit": to_unit}


def _answer(prompt: str, results: list[Message], korean: bool, *, tools_offered: bool) -> list[str]:
    count = _COUNT_TO.search(prompt)
    if count:
        n = min(int(count.group(1)), 100_000)
        return [f"{i} " if i < n else f"{i}" for i in range(1, n + 1)]
    if results:
        lines = [
            (f"{m.tool} 실패: {m.content}" if korean else f"{m.tool} failed: {m.content}")
            if m.is_error
            else m.content
            for m in results
        ]
        lead = "결과입니다: " if korean else "Here is what I found: "
        text = lead + " / ".join(lines)
    elif korean:
        text = "안녕하세요! 저는 스크립트 모델입니다. 무엇을 도와드릴까요?"
    else:
        text = (
            "Hello! I am the scripted model. Ask me about the weather, the time or some arithmetic."
        )
    if not tools_offered and not results and not korean and "weather" in prompt.lower():
        text = "Tools are turned off, so I cannot look up the weather right now."
    return _split(text)


def _split(text: str) -> list[str]:
    """Split into word-sized tokens that join back to ``text`` exactly."""
    return re.findall(r"\S+\s*|\s+", text)
