"""Hostile input: generated requests from the OpenAPI document, and SSE framing properties."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from chatstream.config import Settings
from chatstream.events import (
    Done,
    Error,
    Event,
    FrameDecoder,
    Token,
    ToolCall,
    ToolProgress,
    ToolResult,
    encode,
    encode_token,
    parse_event,
)
from chatstream.server.app import create_app
from tests.support.server import LiveServer, live_server

# The document is the app's own; the requests go to a live server on loopback.
# (schemathesis's pytest plugin does not run under pytest 9, so its strategies
# are driven by Hypothesis here directly.)
_settings = Settings().with_(model="scripted", turns_per_minute=0, tool_timeout_s=2)
OPERATIONS = [result.ok() for result in schemathesis.openapi.from_dict(
    create_app(_settings).openapi()
).get_all_operations()]  # fmt: skip


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    db = tmp_path_factory.mktemp("fuzz") / "chat.db"
    target = _settings.with_(
        store=f"sqlite:///{db}",
        weather_geocoding_url="http://127.0.0.1:9/v1/search",
        weather_forecast_url="http://127.0.0.1:9/v1/forecast",
    )
    with live_server(target) as live:
        yield live


@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda op: op.label)
def test_generated_requests_get_no_5xx_and_match_the_schema(
    operation: Any, fuzz_server: LiveServer
) -> None:
    @given(case=operation.as_strategy())
    @hypothesis_settings(
        max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    def check(case: Any) -> None:
        case.call_and_validate(
            base_url=fuzz_server.url,
            checks=[
                not_a_server_error,
                status_code_conformance,
                content_type_conformance,
                response_schema_conformance,
            ],
            timeout=30,
        )

    check()


# -- SSE framing -------------------------------------------------------------------------

text = st.text(alphabet=st.characters(codec="utf-8"), max_size=200)
ids = st.text(alphabet="abcdef0123456789_", min_size=1, max_size=20)
# JSON numbers past 64 bits lose precision in every client (JavaScript's included), so the
# round trip is asked of 64-bit integers; bigger ones must only not break the stream.
arguments = st.dictionaries(
    text, st.one_of(text, st.integers(-(2**63), 2**63 - 1), st.booleans()), max_size=4
)
events: st.SearchStrategy[Event] = st.one_of(
    st.builds(Token, content=text),
    st.builds(ToolCall, id=ids, tool=text, args=arguments),
    st.builds(
        ToolProgress,
        id=ids,
        tool=text,
        message=text,
        progress=st.one_of(st.none(), st.floats(0, 1)),
    ),
    st.builds(ToolResult, id=ids, tool=text, result=text, is_error=st.booleans()),
    st.builds(
        Done,
        session_id=text,
        history_length=st.integers(0, 10_000),
        run_id=ids,
        usage=st.dictionaries(text, st.integers(0, 10**9), max_size=3),
    ),
    st.builds(Error, code=text, message=text),
)


@given(st.lists(events, min_size=1, max_size=8), st.integers(1, 64))
@hypothesis_settings(max_examples=300, deadline=None)
def test_any_events_round_trip_through_frames_in_any_chunking(
    sent: list[Event], chunk: int
) -> None:
    wire = b"".join(encode(e, event_id=f"run_1:{i + 1}") for i, e in enumerate(sent))
    decoder = FrameDecoder()
    frames = []
    for start in range(0, len(wire), chunk):
        frames.extend(decoder.feed(wire[start : start + chunk]))
    assert [parse_event(f) for f in frames] == sent
    assert [f.id for f in frames] == [f"run_1:{i + 1}" for i in range(len(sent))]


@given(events)
@hypothesis_settings(max_examples=300, deadline=None)
def test_no_value_can_inject_an_sse_field(event: Event) -> None:
    frame = encode(event, event_id="run_1:1")
    lines = frame.split(b"\n")
    # Exactly id, event, data, then the blank line: newlines and CRs in values are escaped.
    assert len(lines) == 5 and lines[3:] == [b"", b""]
    assert lines[0] == b"id: run_1:1"
    assert lines[1] == b"event: " + event.type.encode()
    assert lines[2].startswith(b"data: {")
    assert b"\r" not in frame


def test_an_event_id_with_a_line_break_is_refused() -> None:
    with pytest.raises(ValueError, match="line break"):
        encode(Token("x"), event_id="run_1:1\nevent: done")


def test_values_orjson_refuses_still_encode() -> None:
    frame = encode(ToolCall("c1", "calculate", {"n": 2**80, "서울": "\ud800"}), event_id="run_1:1")
    data = frame.split(b"\n")[2]
    assert data.startswith(b"data: {") and str(2**80).encode() in data
    assert "서울".encode() in data
    assert encode_token("\ud800 half", event_id="run_1:2").endswith(b'half"}\n\n')
