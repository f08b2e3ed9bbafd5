"""The local models' speed and footprint: ready time, memory, prompt and decode speed, TTFT.

Every model named in ``--models`` (the pinned ``local`` and ``local:small``, or
``local:PATH.gguf``) is measured in one process, one after the other:

- ready: ``LocalModel.warm_up`` with the four tools and the server's system prompt, as the
  server runs it at start: the weights checked (and assembled, on a machine's very first
  run), loaded, and the prompt every chat opens with read;
- resident memory once ready (this process, after the models before it were closed);
- prompt and decode tokens/s: ``--runs`` generations on a cold prompt (a run number at
  the head of the system prompt makes every prompt new), medians; time to first token
  there includes reading the whole prompt;
- time to first token of a chat's first turn (the system prompt cached, as on a server),
  of its follow-up turn (``READING_S`` after the answer, as a person reads it), and of
  a follow-up after another chat's turn came between (whose cache the local model keeps
  aside and puts back), and that last one again with the model's chat snapshots turned
  off, as before they existed.

``--direct`` adds the comparison with llama-cpp-python on its own on the same prompt
tokens, greedy both: what ``LocalModel.stream`` (thread bridge, queue, grammar) costs.

Run: ``.venv/bin/python bench/local_model.py [--models local,local:small] [--runs 3]
[--tokens 128] [--threads N] [--direct]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # ``python bench/local_model.py`` as well as ``-m``

from bench.tool_accuracy import local_model  # noqa: E402

from chatstream import messages as m  # noqa: E402
from chatstream.messages import Message  # noqa: E402
from chatstream.models.base import TextDelta, ToolSpec, Usage  # noqa: E402
from chatstream.models.local import LocalModel, render  # noqa: E402
from chatstream.models.weights import model_path  # noqa: E402
from chatstream.prompts import SYSTEM_PROMPT  # noqa: E402
from chatstream.tools import default_tools  # noqa: E402

# Answered in text, at length, with the tools on offer.
QUESTION = "Explain in detail how a bicycle works, part by part."
# A chat of three turns, and another chat whose one turn comes between its second and third.
CHAT = (
    "Explain in detail how a bicycle works, part by part.",
    "And how do its gears work?",
    "What about its brakes?",
)
OTHER_CHAT = "Describe how a refrigerator keeps food cold."
# Between a chat's turns a person reads the answer; the default model uses that time to
# read the answer into its tool prompt's cache (``LocalModel._catch_up``).
READING_S = 3.0


@dataclass(frozen=True)
class Sample:
    """One timed generation."""

    first_token_s: float
    prompt_tokens: int
    decode_tokens: int
    decode_s: float
    text: str

    @property
    def prompt_rate(self) -> float:
        return self.prompt_tokens / self.first_token_s

    @property
    def decode_rate(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


Measure = Callable[[list[Message]], Awaitable[Sample]]


def conversation(run: int) -> list[Message]:
    """A prompt no earlier run has evaluated."""
    return [Message("system", f"(Run {run}.) {SYSTEM_PROMPT}"), m.user(QUESTION)]


def direct(llm: llama_cpp.Llama, model: LocalModel, tokens: int, tools: list[ToolSpec]) -> Measure:
    """llama-cpp-python on its own, on the tokens LocalModel would send."""

    async def measure(messages: list[Message]) -> Sample:
        assert model._formatter is not None  # the bench reads the model's own prompt
        prompt = llm.tokenize(render(model._formatter, messages, tools).encode(), special=True)
        started = time.perf_counter()
        first = last = 0.0
        pieces: list[str] = []
        chunks: Any = llm.create_completion(
            prompt, max_tokens=tokens, temperature=0.0, repeat_penalty=1.05, stream=True
        )
        for chunk in chunks:
            last = time.perf_counter()
            first = first or last
            pieces.append(chunk["choices"][0]["text"])
        count = len(llm.tokenize("".join(pieces).encode(), add_bos=False))
        return Sample(first - started, len(prompt), count - 1, last - first, "".join(pieces))

    return measure


def local(model: LocalModel, tools: list[ToolSpec]) -> Measure:
    """chatstream's LocalModel.stream, as the agent drives it."""

    async def measure(messages: list[Message]) -> Sample:
        started = time.perf_counter()
        first = last = 0.0
        pieces: list[str] = []
        usage = Usage()
        async for event in model.stream(messages, tools):
            if isinstance(event, TextDelta):
                last = time.perf_counter()
                first = first or last
                pieces.append(event.text)
            elif isinstance(event, Usage):
                usage = event
        return Sample(
            first - started,
            usage.prompt_tokens,
            usage.completion_tokens - 1,
            last - first,
            "".join(pieces),
        )

    return measure


def resident_mib() -> float:
    """This process's resident memory now."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def speeds(name: str, samples: list[Sample]) -> dict[str, float]:
    figures = {
        "ttft_ms": 1000 * statistics.median(s.first_token_s for s in samples),
        "prompt_tps": statistics.median(s.prompt_rate for s in samples),
        "decode_tps": statistics.median(s.decode_rate for s in samples),
    }
    print(
        f"  {name:18} {figures['ttft_ms']:7.0f} ms first token, prompt "
        f"{figures['prompt_tps']:6.1f} tok/s, decode {figures['decode_tps']:5.1f} tok/s "
        f"({samples[0].prompt_tokens} prompt tokens, {samples[0].decode_tokens + 1} generated)"
    )
    return figures


async def turns(measure: Measure, tag: str) -> dict[str, Sample]:
    """Time to first token of a chat's turns, with another chat's turn before the third."""
    chat: list[Message] = [Message("system", SYSTEM_PROMPT)]
    found: dict[str, Sample] = {}
    for index, question in enumerate(CHAT):
        if index:
            await asyncio.sleep(READING_S)
        if index == 2:
            other = [Message("system", SYSTEM_PROMPT), m.user(f"{OTHER_CHAT} ({tag})")]
            found["other chat"] = await measure(other)
        chat.append(m.user(f"{question} ({tag})" if index == 0 else question))
        sample = await measure(chat)
        chat.append(m.assistant(sample.text))
        found[("first turn", "follow-up", "follow-up after another chat")[index]] = sample
    return found


async def bench(spec: str, options: argparse.Namespace) -> None:
    base = resident_mib()
    model = local_model(spec, max_tokens=options.tokens, n_threads=options.threads)
    model.temperature = 0.0  # greedy: the runs generate the same tokens
    tools = [t.spec for t in default_tools()]
    started = time.perf_counter()
    await model.warm_up(tools, system_prompt=SYSTEM_PROMPT)
    ready = time.perf_counter() - started
    print(f"{model.name}: ready in {ready:.1f} s (load {model.load_seconds:.1f} s)")
    print(f"  resident memory {resident_mib():.0f} MiB ({resident_mib() - base:+.0f} MiB)")
    ours = local(model, tools)
    try:
        samples = [await ours(conversation(run)) for run in range(1, options.runs + 1)]
        figures = speeds("LocalModel.stream", samples)
        for name, sample in (await turns(ours, "a")).items():
            print(
                f"  {name:29} {1000 * sample.first_token_s:6.0f} ms to first token "
                f"({sample.prompt_tokens} prompt tokens)"
            )
        model._snapshots.capacity = 0
        cut = (await turns(ours, "b"))["follow-up after another chat"]
        print(
            f"  {'  the same, no snapshots':29} {1000 * cut.first_token_s:6.0f} ms to first "
            f"token ({cut.prompt_tokens} prompt tokens)"
        )
        if options.direct:
            path = model.path or model_path(model.weights)
            llm = llama_cpp.Llama(
                model_path=str(path), n_ctx=model.n_ctx, n_threads=options.threads, verbose=False
            )
            try:
                theirs = direct(llm, model, options.tokens, tools)
                runs = range(options.runs + 1, 2 * options.runs + 1)
                base_figures = speeds(
                    "llama-cpp-python", [await theirs(conversation(r)) for r in runs]
                )
            finally:
                llm.close()
            added = 100 * (base_figures["decode_tps"] / figures["decode_tps"] - 1)
            print(
                f"  LocalModel adds {figures['ttft_ms'] - base_figures['ttft_ms']:+.0f} ms to "
                f"the first token and {added:+.1f}% to decode time per token"
            )
    finally:
        await model.aclose()


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="local,local:small", help="local models, by commas")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128, help="tokens to generate per run")
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads")
    parser.add_argument(
        "--direct", action="store_true", help="also llama-cpp-python alone, side by side"
    )
    options = parser.parse_args()
    for spec in options.models.split(","):
        await bench(spec, options)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
