"""Whether the local model answers plain questions right, through the agent and its tools.

Each question goes to ``Agent.run`` as a first turn, with the four built-in tools offered
and the server's system prompt, as a new chat on the server does; a tool the model calls
runs (arithmetic, time and temperature work offline; the weather service is pointed at a
closed port, so a stray weather call fails fast). An answer is right when its text
matches the question's pattern and not its known wrong answer. A question marked
``direct`` is a general one, to be answered without a tool, even when it names a place or
holds a number; a call there is counted as a stray call, whatever the answer.

The set was written before the prompting was tuned for the 1.5B default, and is not
shown to the model in any form: at least 20 questions with checkable answers, a third of
them in Korean, a few in Japanese.

Run: ``.venv/bin/python bench/answers.py [--models local,local:small] [-v]``
(``bench/tool_accuracy.py`` runs it too, after the tool choice).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # ``python bench/answers.py`` as well as ``-m bench.answers``

from chatstream import messages as m  # noqa: E402
from chatstream.agent import Agent, Turn  # noqa: E402
from chatstream.config import ToolSettings  # noqa: E402
from chatstream.events import ToolCall  # noqa: E402
from chatstream.models import Model, resolve  # noqa: E402
from chatstream.prompts import SYSTEM_PROMPT  # noqa: E402
from chatstream.tools import default_tools  # noqa: E402


@dataclass(frozen=True)
class Question:
    """A question, what a right answer says (a regex), and a known wrong one."""

    prompt: str
    language: str
    right: str
    wrong: str | None = None
    # A general question: a tool call is a mistake even when the answer comes out right.
    direct: bool = True


QUESTIONS = (
    # English
    Question("What's 15% of 240?", "en", r"\b36\b", r"0\.0625", direct=False),
    Question("What is 12 squared?", "en", r"\b144\b", direct=False),
    Question("Who wrote the play Romeo and Juliet?", "en", r"shakespeare"),
    Question("What is the capital of Australia?", "en", r"canberra"),
    Question("Explain in one sentence why the sky is blue.", "en", r"scatter"),
    Question("How many legs does a spider have?", "en", r"\b8\b|\beight\b"),
    Question("In which year did the Second World War end?", "en", r"\b1945\b"),
    Question(
        "What is the boiling point of water at sea level, in Celsius?", "en", r"\b100\s*°?\s*c?"
    ),
    Question(
        "I'm flying from London to New York. Roughly how long is the flight?",
        "en",
        r"\b(6|7|8|six|seven|eight)\b[^.]*hours?",
    ),
    Question("What is the chemical symbol for gold?", "en", r"\bAu\b"),
    Question("Which planet is known as the Red Planet?", "en", r"\bmars\b"),
    # Korean
    Question("3시간은 몇 분이야?", "ko", r"180", direct=False),
    Question(
        "서울에서 부산까지 KTX로 얼마나 걸려?",
        "ko",
        r"(2|두|3|세)\s*시간|2\s*[~-]\s*3|2\.5|150\s*분",
    ),
    Question("대한민국의 수도는 어디야?", "ko", r"서울"),
    Question("한글을 만든 조선의 왕은 누구야?", "ko", r"세종"),
    Question("물의 화학식은 뭐야?", "ko", r"H\s*2\s*O|H₂O"),
    Question("부산에서 가장 유명한 해수욕장은 어디야?", "ko", r"해운대"),
    Question("지구에서 가장 큰 바다는 뭐야?", "ko", r"태평양"),
    Question("1년은 며칠이야?", "ko", r"365"),
    Question("김치의 주재료는 뭐야?", "ko", r"배추|cabbage"),
    Question("한국 전쟁은 몇 년에 시작됐어?", "ko", r"1950"),
    # Japanese
    Question("日本で一番高い山は何ですか？", "ja", r"富士山"),  # noqa: RUF001
    Question(
        "東京から大阪まで新幹線でどれくらいかかりますか？",  # noqa: RUF001
        "ja",
        r"(2|\uff12|3|\uff13|二|三)\s*時間|2\s*[~〜-]\s*3|150\s*分",
    ),
    Question("『吾輩は猫である』の作者は誰ですか？", "ja", r"夏目\s*漱石|漱石"),  # noqa: RUF001
)


@dataclass
class Outcome:
    """What the agent did with one question."""

    question: Question
    answer: str
    calls: list[str]
    seconds: float

    @property
    def right(self) -> bool:
        q = self.question
        if not re.search(q.right, self.answer, re.IGNORECASE):
            return False
        return q.wrong is None or not re.search(q.wrong, self.answer, re.IGNORECASE)

    @property
    def stray_call(self) -> bool:
        return self.question.direct and bool(self.calls)


@dataclass
class Summary:
    """The outcomes of one model on the whole set."""

    model: str
    outcomes: list[Outcome] = field(default_factory=list)

    def lines(self) -> list[str]:
        right = sum(o.right for o in self.outcomes)
        total = len(self.outcomes)
        by_language = Counter(o.question.language for o in self.outcomes)
        right_by = Counter(o.question.language for o in self.outcomes if o.right)
        languages = ", ".join(f"{lang} {right_by[lang]}/{n}" for lang, n in by_language.items())
        direct = [o for o in self.outcomes if o.question.direct]
        stray = [o for o in direct if o.stray_call]
        seconds = sum(o.seconds for o in self.outcomes)
        return [
            f"answers:  {right}/{total} right ({100 * right / total:.0f}%; {languages}), "
            f"{seconds:.0f} s",
            f"          stray calls on general questions: {len(stray)} of {len(direct)}"
            + (f" ({', '.join(repr(o.question.prompt[:30]) for o in stray)})" if stray else ""),
        ]


def agent_for(model: Model) -> Agent:
    """The agent as a server runs it, the weather service pointed at a closed port."""
    settings = ToolSettings(
        tool_timeout_s=5.0,
        weather_geocoding_url="http://127.0.0.1:9/v1/search",
        weather_forecast_url="http://127.0.0.1:9/v1/forecast",
    )
    return Agent(model, default_tools(), tool_settings=settings, system_prompt=SYSTEM_PROMPT)


async def ask(agent: Agent, question: Question) -> Outcome:
    """One first turn of a new chat."""
    turn = Turn(m.user(question.prompt))
    calls: list[str] = []
    started = time.perf_counter()
    async for event in agent.run([], turn):
        if isinstance(event, ToolCall):
            calls.append(f"{event.tool}({event.args})")
    return Outcome(question, "".join(turn.answer), calls, time.perf_counter() - started)


async def run_questions(model: Model, *, verbose: bool = False) -> Summary:
    """Every question of the set, one after the other, on ``model``."""
    agent = agent_for(model)
    summary = Summary(model.name)
    for question in QUESTIONS:
        outcome = await ask(agent, question)
        summary.outcomes.append(outcome)
        if verbose or not outcome.right or outcome.stray_call:
            mark = "ok  " if outcome.right and not outcome.stray_call else "MISS"
            print(f"{mark} [answers] {question.prompt[:50]!r}")
            for call in outcome.calls:
                print(f"       called {call}")
            print(f"       said {outcome.answer[:160]!r}")
    return summary


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="local,local:small", help="model specs, by commas")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every answer")
    options = parser.parse_args()
    results = []
    for spec in options.models.split(","):
        model = resolve(spec)
        started = time.perf_counter()
        await model.warm_up(default_tools().specs(), system_prompt=SYSTEM_PROMPT)
        print(f"model {model.name} ready in {time.perf_counter() - started:.1f} s")
        try:
            results.append(await run_questions(model, verbose=options.verbose))
        finally:
            await model.aclose()
    for summary in results:
        print(summary.model)
        for line in summary.lines():
            print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
