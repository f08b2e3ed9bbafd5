"""What LocalModel adds to llama.cpp: time to first token, prompt and decode speed, side by side.

Both paths run the same prompt tokens with the same greedy sampling in one process, one
after the other, ``--runs`` times each:

- ``llama-cpp-python``: ``Llama.create_completion(tokens, stream=True)``, called directly;
- ``LocalModel.stream``: chatstream's model, with its thread bridge, queue and grammar.

Each run starts with a cold prompt cache (a run number at the head of the system prompt
makes every prompt new), so time to first token includes evaluating the whole prompt;
prompt tokens/s is prompt tokens over that time, decode tokens/s counts the tokens after
the first over the time after the first. Medians are printed. ``--warm`` puts the run
number in the question instead, so the system prompt (and tools) stay cached between
runs, as they do between a server's requests; prompt tokens/s is then not meaningful.

Run: ``.venv/bin/python bench/local_model.py [--runs 5] [--tokens 128] [--threads N]
[--tools] [--warm]``
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp

from chatstream import messages as m
from chatstream.messages import Message
from chatstream.models.base import TextDelta, ToolSpec, Usage
from chatstream.models.local import LocalModel, render
from chatstream.models.weights import default_model_path
from chatstream.prompts import SYSTEM_PROMPT
from chatstream.tools import default_tools

# Answered in text, at length, with or without tools on offer.
QUESTION = "Explain in detail how a bicycle works, part by part."


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


def conversation(run: int, *, warm: bool = False) -> list[Message]:
    """A prompt no earlier run has evaluated; ``warm``: one whose system prompt it has."""
    if warm:
        return [Message("system", SYSTEM_PROMPT), m.user(f"(Run {run}.) {QUESTION}")]
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


def report(name: str, samples: list[Sample]) -> dict[str, float]:
    figures = {
        "ttft_ms": 1000 * statistics.median(s.first_token_s for s in samples),
        "prompt_tps": statistics.median(s.prompt_rate for s in samples),
        "decode_tps": statistics.median(s.decode_rate for s in samples),
    }
    print(
        f"{name:18} {figures['ttft_ms']:9.0f} ms {figures['prompt_tps']:10.1f} tok/s "
        f"{figures['decode_tps']:10.1f} tok/s   ({samples[0].prompt_tokens} prompt tokens, "
        f"{samples[0].decode_tokens + 1} generated)"
    )
    return figures


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a GGUF file (default: the embedded model)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128, help="tokens to generate per run")
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads")
    parser.add_argument(
        "--tools", action="store_true", help="offer the four tools (a longer prompt, as served)"
    )
    parser.add_argument("--warm", action="store_true", help="keep the system prompt cached")
    options = parser.parse_args()

    path = options.model or default_model_path()
    model = LocalModel(
        options.model, max_tokens=options.tokens, n_threads=options.threads, temperature=0.0
    )
    started = time.perf_counter()
    await model.warm_up(())
    print(f"LocalModel.load: {time.perf_counter() - started:.2f} s (weights checked, mapped)")
    started = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=model.n_ctx, n_threads=options.threads, verbose=False
    )
    print(f"Llama(): {time.perf_counter() - started:.2f} s")

    tools = [t.spec for t in default_tools()] if options.tools else []
    paths: dict[str, Measure] = {"llama-cpp-python": direct(llm, model, options.tokens, tools)}
    paths["LocalModel.stream"] = local(model, tools)
    samples: dict[str, list[Sample]] = {name: [] for name in paths}
    try:
        await paths["LocalModel.stream"](conversation(0))  # warm-up: first-use costs aside
        for run in range(1, options.runs + 1):
            # Alternate, so that drift in the machine's load hits both alike.
            for name, measure in paths.items():
                samples[name].append(await measure(conversation(run, warm=options.warm)))
    finally:
        await model.aclose()
        llm.close()

    print(f"\n{'':18} {'first token':>12} {'prompt':>16} {'decode':>16}   (medians)")
    base = report("llama-cpp-python", samples["llama-cpp-python"])
    ours = report("LocalModel.stream", samples["LocalModel.stream"])
    print(
        f"\nLocalModel adds {ours['ttft_ms'] - base['ttft_ms']:+.0f} ms to the first token and "
        f"{100 * (base['decode_tps'] / ours['decode_tps'] - 1):+.1f}% to decode time per token."
    )
    same = sum(
        a.text == b.text
        for a, b in zip(samples["llama-cpp-python"], samples["LocalModel.stream"], strict=True)
    )
    # Greedy decoding, yet a cached prefix evaluated in other batches can tip a close call.
    print(f"same text from both in {same} of {options.runs} runs")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory of this process (two models mapped): {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
