"""OpenAIModel against a fake Chat Completions server over real loopback HTTP."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from chatstream.config import Settings
from chatstream.errors import ModelTimeout
from chatstream.messages import Message, ToolCallRequest, assistant, tool_result, user
from chatstream.models.base import ModelEvent, TextDelta, Usage
from chatstream.models.openai import ChatCompletionsReader, OpenAIModel
from tests.fakes.openai_upstream import Call, Completion, FakeOpenAI, HTTPError, Raw, sse
from tests.support.models import (
    WEATHER,
    assert_a_malformed_chunk_fails_the_turn_and_keeps_its_text,
    assert_cancelling_the_consumer_closes_the_upstream_connection,
    assert_closing_the_stream_closes_the_upstream_connection,
    assert_no_wrong_type_gets_past_the_reader,
    assert_tokens_are_yielded_while_the_upstream_is_still_sending,
    collect,
    collect_until_error,
)


@pytest.fixture
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake
    assert fake.errors == []


@pytest.fixture
async def model(upstream: FakeOpenAI) -> AsyncIterator[OpenAIModel]:
    model = OpenAIModel("gpt-test", base_url=upstream.url, api_key="sk-test")
    yield model
    await model.aclose()


async def test_text_streams_as_deltas_in_order_then_usage(
    upstream: FakeOpenAI, model: OpenAIModel
) -> None:
    upstream.enqueue(Completion(text=["Hel", "lo", ", wor", "ld 🌍"], usage=(12, 4)))

    assert await collect(model) == [
        TextDelta("Hel"),
        TextDelta("lo"),
        TextDelta(", wor"),
        TextDelta("ld 🌍"),
        Usage(prompt_tokens=12, completion_tokens=4),
    ]


@pytest.mark.parametrize("interleave", [False, True], ids=["sequential", "interleaved"])
async def test_parallel_fragmented_tool_calls_are_assembled_by_index(
    upstream: FakeOpenAI, model: OpenAIModel, interleave: bool
) -> None:
    upstream.enqueue(
        Completion(
            text=["Let me check."],
            tool_calls=[
                Call("get_weather", {"location": "Seoul, KR"}, id="call_a", fragments=5),
                Call("get_weather", {"location": "Busan"}, id="call_b", fragments=4),
            ],
            interleave=interleave,
            usage=(30, 20),
        )
    )

    assert await collect(model, tools=[WEATHER]) == [
        TextDelta("Let me check."),
        ToolCallRequest("call_a", "get_weather", {"location": "Seoul, KR"}),
        ToolCallRequest("call_b", "get_weather", {"location": "Busan"}),
        Usage(prompt_tokens=30, completion_tokens=20),
    ]


async def test_tool_arguments_that_are_not_a_json_object_are_passed_raw(
    upstream: FakeOpenAI, model: OpenAIModel
) -> None:
    upstream.enqueue(
        Completion(
            tool_calls=[
                Call("calculate", '{"expression": "1+', id="call_1"),
                Call("get_current_time", "", id="call_2"),
                Call("calculate", "[1, 2]", id="call_3"),
            ]
        )
    )

    calls = [e for e in await collect(model) if isinstance(e, ToolCallRequest)]

    assert [c.arguments for c in calls] == [
        {"_raw": '{"expression": "1+'},
        {},
        {"_raw": "[1, 2]"},
    ]


async def test_request_body_carries_converted_history_tools_and_stream_options(
    upstream: FakeOpenAI, model: OpenAIModel
) -> None:
    call = ToolCallRequest("call_1", "get_weather", {"location": "Seoul"})
    history = [
        Message(role="system", content="Be brief."),
        user("Weather in Seoul?"),
        assistant("", tool_calls=(call,)),
        tool_result(call, "unknown place", is_error=True),
        assistant("It is sunny and", interrupted=True),
        user("Go on"),
    ]
    upstream.enqueue(Completion(text=["ok"]))

    await collect(model, history, [WEATHER])

    request = upstream.requests[-1]
    assert (request.method, request.path) == ("POST", "/v1/chat/completions")
    assert request.headers["authorization"] == "Bearer sk-test"
    assert request.headers["content-type"] == "application/json"
    assert request.body == {
        "model": "gpt-test",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Seoul?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"location":"Seoul"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "Error: unknown place"},
            {
                "role": "assistant",
                "content": "It is sunny and\n[This answer was interrupted before it finished.]",
            },
            {"role": "user", "content": "Go on"},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Current weather for a place.",
                    "parameters": WEATHER.parameters,
                },
            }
        ],
    }


async def test_without_key_or_tools_no_authorization_and_no_tools_are_sent(
    upstream: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_BASE_URL", upstream.url)
    model = OpenAIModel("llama3")
    try:
        events = await collect(model, tools=[])
    finally:
        await model.aclose()

    assert model.name == "openai:llama3"
    assert events[0] == TextDelta("Echo:")  # the fake's default reply, reached through the env
    request = upstream.requests[-1]
    assert "authorization" not in request.headers
    assert "tools" not in request.body


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (401, "Incorrect API key provided: sk-test."),
        (429, "Rate limit reached for gpt-test."),
        (500, "The server had an error while processing your request."),
    ],
)
async def test_http_errors_become_model_errors_with_the_upstream_message(
    upstream: FakeOpenAI, model: OpenAIModel, status: int, message: str
) -> None:
    upstream.enqueue(HTTPError(status, message, headers={"retry-after": "7"}))

    seen, error = await collect_until_error(model)

    assert seen == []
    assert f"HTTP {status}" in str(error)
    assert message in str(error)
    assert "retry after 7 s" in str(error)
    assert error.code == "MODEL_ERROR"


async def test_connection_dropped_mid_stream_is_a_model_error_after_the_tokens_so_far(
    upstream: FakeOpenAI, model: OpenAIModel
) -> None:
    upstream.enqueue(Completion(text=["one", " two", " three"], drop_after=2))

    seen, error = await collect_until_error(model)

    assert seen == [TextDelta("one"), TextDelta(" two")]
    assert "connection lost mid-stream" in str(error)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (Raw([sse({"choices": [{"index": 0, "delta": {"content": "a"}}]})]), "ended before"),
        (Raw([b"data: {not json\n\n"]), "malformed stream chunk"),
        (Completion(text=["a"], error="The model is overloaded."), "The model is overloaded."),
        (Raw([b'{"error": {"message": "nope"}}'], content_type="application/json"), "nope"),
    ],
    ids=["closed-without-finish", "malformed-json", "error-in-stream", "not-an-event-stream"],
)
async def test_broken_streams_are_model_errors(
    upstream: FakeOpenAI, model: OpenAIModel, reply: Any, expected: str
) -> None:
    upstream.enqueue(reply)

    _, error = await collect_until_error(model)

    assert expected in str(error)


LONG_MESSAGE = "This model's maximum context length is 128000 tokens. " * 100


@pytest.mark.parametrize(
    "reply",
    [HTTPError(400, LONG_MESSAGE), Completion(text=["a"], error=LONG_MESSAGE)],
    ids=["http-error", "error-in-stream"],
)
async def test_a_long_provider_message_is_cut_to_an_excerpt(
    upstream: FakeOpenAI, model: OpenAIModel, reply: Any
) -> None:
    upstream.enqueue(reply)

    _, error = await collect_until_error(model)

    assert len(error.message) < 400
    assert "This model's maximum context length is 128000 tokens." in error.message
    assert error.message.endswith("...")
    assert error.code == "MODEL_ERROR"


async def test_unreachable_server_is_a_model_error() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    model = OpenAIModel("gpt-test", base_url=f"http://127.0.0.1:{port}/v1", api_key="k")
    try:
        _, error = await collect_until_error(model)
    finally:
        await model.aclose()

    assert str(error) == "openai:gpt-test: the provider could not be reached"
    assert str(port) not in str(error)


def _proxy_env(
    monkeypatch: pytest.MonkeyPatch, proxy: str, no_proxy: str = "", scheme: str = "http"
) -> None:
    # Every variable a machine may have, cleared, then the one the test names in both
    # spellings: Python lets the lower-case one win when both are set.
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    for name in (f"{scheme}_proxy", f"{scheme.upper()}_PROXY"):
        monkeypatch.setenv(name, proxy)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, no_proxy)


@pytest.mark.parametrize(
    ("scheme", "written"),
    [("http", "url"), ("http", "host:port"), ("all", "url")],
    ids=["HTTP_PROXY", "HTTP_PROXY without a scheme", "ALL_PROXY"],
)
async def test_requests_go_through_the_proxy_the_environment_names(
    upstream: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, scheme: str, written: str
) -> None:
    proxy = upstream.base if written == "url" else upstream.base.removeprefix("http://")
    _proxy_env(monkeypatch, proxy, scheme=scheme)  # the fake answers absolute-form requests
    model = OpenAIModel("gpt-test", base_url="http://api.example.invalid/v1", api_key="k")
    upstream.enqueue(Completion(text=["via the proxy"]))
    try:
        events = await collect(model)
    finally:
        await model.aclose()

    assert events[0] == TextDelta("via the proxy")
    assert upstream.requests[-1].path == "http://api.example.invalid/v1/chat/completions"


async def test_a_proxy_that_never_answers_times_out_within_the_connect_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def accept_and_say_nothing(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    silent = await asyncio.start_server(accept_and_say_nothing, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    _proxy_env(monkeypatch, f"http://127.0.0.1:{port}", scheme="https")
    model = OpenAIModel("gpt-test", base_url="https://api.example.invalid/v1", timeout=1.0)
    try:
        async with asyncio.timeout(5):
            _, error = await collect_until_error(model)
    finally:
        await model.aclose()
        silent.close()
        for writer in accepted:
            writer.close()
            await writer.wait_closed()

    assert isinstance(error, ModelTimeout)
    assert accepted, "the proxy was never asked"


async def test_redirects_are_reported_not_followed(
    upstream: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    elsewhere = "http://elsewhere.example.invalid/v1/chat/completions"
    upstream.enqueue(HTTPError(307, "Moved", headers={"location": elsewhere}))
    model = OpenAIModel("gpt-test", base_url=upstream.url, api_key="sk-secret")
    try:
        _, error = await collect_until_error(model)
    finally:
        await model.aclose()

    assert "HTTP 307" in str(error)
    assert "a redirect, not followed" in str(error)
    assert "elsewhere" not in str(error)  # the target is for the log, not the chat client
    assert f"redirected to {elsewhere}" in caplog.text
    assert len(upstream.requests) == 1


async def test_hosts_in_no_proxy_are_reached_directly(
    upstream: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    _proxy_env(monkeypatch, "http://127.0.0.1:9", no_proxy="127.0.0.1,localhost")
    model = OpenAIModel("gpt-test", base_url=upstream.url, api_key="k")
    upstream.enqueue(Completion(text=["direct"]))
    try:
        events = await collect(model)
    finally:
        await model.aclose()

    assert events[0] == TextDelta("direct")
    assert upstream.requests[-1].path == "/v1/chat/completions"


async def test_an_https_provider_is_verified_against_the_cas_the_environment_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    authority = trustme.CA()
    serving = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(serving)
    ca_file = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(ca_file))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    with FakeOpenAI(tls=serving) as fake:
        fake.enqueue(Completion(text=["private"]))
        untrusted = OpenAIModel("gpt-test", base_url=fake.url, api_key="k")
        try:
            _, error = await collect_until_error(untrusted)
        finally:
            await untrusted.aclose()
        assert str(error) == "openai:gpt-test: the provider's TLS certificate was not trusted"

        monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
        trusted = OpenAIModel("gpt-test", base_url=fake.url, api_key="k")
        try:
            events = await collect(trusted)
        finally:
            await trusted.aclose()

    assert events[0] == TextDelta("private")


async def test_a_provider_that_goes_silent_mid_stream_times_out(upstream: FakeOpenAI) -> None:
    upstream.enqueue(Completion(text=["first", " second"], hold_after=1))
    model = OpenAIModel("gpt-test", base_url=upstream.url, api_key="k", timeout=0.5)
    try:
        seen, error = await collect_until_error(model)
    finally:
        await model.aclose()
        upstream.release()

    assert seen == [TextDelta("first")]
    assert isinstance(error, ModelTimeout)
    assert error.code == "TIMEOUT"


async def test_finish_without_done_marker_is_accepted(
    upstream: FakeOpenAI, model: OpenAIModel
) -> None:
    upstream.enqueue(Completion(text=["fine"], usage=(1, 1), done=False))

    assert await collect(model) == [TextDelta("fine"), Usage(1, 1)]


async def test_tokens_are_yielded_while_the_upstream_is_still_sending(
    upstream: FakeOpenAI, model: OpenAIModel
) -> None:
    upstream.enqueue(Completion(text=["first", " second"], hold_after=1, usage=(1, 2)))

    rest: list[ModelEvent] = [TextDelta(" second"), Usage(1, 2)]
    await assert_tokens_are_yielded_while_the_upstream_is_still_sending(model, upstream, rest)


async def test_closing_the_stream_closes_the_upstream_connection(
    upstream: FakeOpenAI, model: OpenAIModel
) -> None:
    upstream.enqueue(Completion(text=["first", " second"], hold_after=1))

    await assert_closing_the_stream_closes_the_upstream_connection(model, upstream)


async def test_cancelling_the_consumer_task_closes_the_upstream_connection(
    upstream: FakeOpenAI, model: OpenAIModel
) -> None:
    upstream.enqueue(Completion(text=["first", " second"], hold_after=1))

    await assert_cancelling_the_consumer_closes_the_upstream_connection(model, upstream)


async def test_connection_is_reused_across_turns(upstream: FakeOpenAI, model: OpenAIModel) -> None:
    upstream.enqueue(Completion(text=["a"]), Completion(text=["b"]), Completion(text=["c"]))

    for _ in range(3):
        await collect(model)

    assert upstream.connections == 1


async def test_the_fake_speaks_what_the_official_sdk_reads(upstream: FakeOpenAI) -> None:
    import openai  # the official SDK, a dev dependency: it must read our fake as OpenAI

    upstream.enqueue(
        Completion(
            text=["Hi"],
            tool_calls=[Call("get_weather", {"location": "Seoul"}, id="call_x")],
            usage=(5, 3),
        )
    )
    client = openai.AsyncOpenAI(base_url=upstream.url, api_key="sk-test", max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    finally:
        await client.close()

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    fragments = [f for c in chunks if c.choices for f in (c.choices[0].delta.tool_calls or [])]
    assert text == "Hi"
    assert fragments[0].id == "call_x"
    assert all(f.function is not None for f in fragments)
    arguments = "".join(f.function.arguments or "" for f in fragments if f.function)
    assert arguments == '{"location":"Seoul"}'
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens == 5


async def test_events_cut_at_any_byte_and_crlf_line_ends_are_read_alike(
    upstream: FakeOpenAI, model: OpenAIModel
) -> None:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return sse({"choices": [choice]}).replace(b"\n", b"\r\n")

    body = b"".join(
        [
            b": keep-alive comment\r\n\r\n",
            chunk({"role": "assistant", "content": ""}),
            chunk({"content": "Grüße "}),
            chunk({"content": "🌍"}),
            chunk({"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "f"}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a": "é"}'}}]}),
            chunk({}, "tool_calls"),
            b"data: [DONE]\r\n\r\n",
        ]
    )
    expected = [TextDelta("Grüße "), TextDelta("🌍"), ToolCallRequest("call_1", "f", {"a": "é"})]
    # Over the wire, in three-byte chunks (TCP may join some of them again)...
    upstream.enqueue(Raw([body[i : i + 3] for i in range(0, len(body), 3)]))
    assert await collect(model) == expected
    # ...and straight into the reader one byte at a time: lines, events and UTF-8
    # characters all fall across reads.
    reader = ChatCompletionsReader("openai:test")
    events = [event for i in range(len(body)) for event in reader.feed(body[i : i + 1])]
    assert (events, reader.done, reader.error) == (expected, True, None)


# -- a provider that breaks its wire format --------------------------------------------


def _delta(delta: Any, **choice: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": None, **choice}]}


def _fragment(**fields: Any) -> dict[str, Any]:
    call: dict[str, Any] = {"index": 0, "id": "call_1", "type": "function"}
    call["function"] = {"name": "calculate", "arguments": '{"expression": "1+1"}'}
    for key, value in fields.items():
        if key in ("name", "arguments"):
            call["function"][key] = value
        else:
            call[key] = value
    return _delta({"tool_calls": [call]})


def _usage(**fields: Any) -> dict[str, Any]:
    return {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2, **fields}}


# Each is slipped into a well-formed stream after the tokens "Once" and " upon".
MALFORMED_CHUNKS: dict[str, list[Any]] = {
    "content-number": [_delta({"content": 5})],
    "content-list": [_delta({"content": ["a"]})],
    "content-object": [_delta({"content": {"text": "a"}})],
    "content-false": [_delta({"content": False})],
    "refusal-number": [_delta({"refusal": 5})],
    "chunk-list": [[1, 2]],
    "chunk-number": [5],
    "chunk-string": ['"Once"'],
    "chunk-null": ["null"],
    "choices-string": [{"choices": "abc"}],
    "choices-object": [{"choices": {"0": {"delta": {"content": "a"}}}}],
    "choice-number": [{"choices": [5]}],
    "delta-string": [_delta("a")],
    "finish-reason-number": [_delta({}, finish_reason=1)],
    "tool-calls-object": [_delta({"tool_calls": {"index": 0}})],
    "tool-call-string": [_delta({"tool_calls": ["call_1"]})],
    "tool-call-index-string": [_fragment(index="0")],
    "tool-call-index-list": [_fragment(index=[0])],
    "tool-call-id-number": [_fragment(id=5)],
    "tool-call-function-string": [_fragment(function="calculate")],
    "tool-call-name-number": [_fragment(name=5)],
    "tool-call-arguments-object": [_fragment(arguments={"expression": "1+1"})],
    "tool-call-arguments-number": [_fragment(arguments=11)],
    "usage-number": [{"choices": [], "usage": 5}],
    "usage-tokens-string": [_usage(prompt_tokens="9")],
    "usage-tokens-float": [_usage(completion_tokens=2.5)],
    "usage-tokens-negative": [_usage(completion_tokens=-2)],
    "usage-tokens-bool": [_usage(prompt_tokens=True)],
}


@pytest.mark.parametrize("chunks", MALFORMED_CHUNKS.values(), ids=MALFORMED_CHUNKS.keys())
async def test_a_malformed_chunk_is_a_model_error_and_the_partial_answer_is_kept(
    settings: Settings,
    upstream: FakeOpenAI,
    monkeypatch: pytest.MonkeyPatch,
    chunks: list[Any],
) -> None:
    upstream.enqueue(Completion(text=["Once", " upon"], inject=chunks, usage=(9, 2)))
    monkeypatch.setenv("OPENAI_BASE_URL", upstream.url)

    await assert_a_malformed_chunk_fails_the_turn_and_keeps_its_text(settings, "openai:fake-model")


def test_no_chunk_of_any_shape_gets_past_the_reader_with_a_wrong_type() -> None:
    chunks: list[Any] = [
        _delta({"role": "assistant", "content": "", "refusal": None}),
        _delta({"content": "Once"}),
        _delta({"content": None, "refusal": "No."}),
        _fragment(),
        _delta({}, finish_reason="tool_calls"),
        _usage(),
    ]
    assert_no_wrong_type_gets_past_the_reader(
        ChatCompletionsReader, "openai:test", chunks, end=sse("[DONE]")
    )
