"""The frontends' protocols through the real client libraries from npm.

The Vercel AI SDK (``ai``: ``DefaultChatTransport``, ``readUIMessageStream`` and
``AbstractChat``, which ``useChat`` wraps) and AG-UI (``@ag-ui/client``'s ``HttpAgent``,
whose event verification and schema checks are always on) are pinned in
``tests/support/npm_frontends`` and installed on first use with ``npm ci``. Small Node
scripts there drive a scenario against a live server on loopback and print what the
library made of the stream: the chunks or events, the messages it built, and anything
it warned about (a field it stripped, an event it refused). The tests assert on that.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatstream.config import Settings
from chatstream.events import FrameDecoder
from chatstream.server.app import create_app
from chatstream.tools import BUILTIN, ToolContext, tool
from tests.support import approval_tools
from tests.support.server import LiveServer, live_server

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError as exc:  # the browser fixture fails with what to install
    PLAYWRIGHT_MISSING: str | None = str(exc)
else:
    PLAYWRIGHT_MISSING = None

NPM_DIR = Path(__file__).resolve().parent / "support" / "npm_frontends"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "use-chat"
CHROMIUM = Path(os.environ.get("CHATSTREAM_CHROMIUM", "/usr/bin/chromium"))
PACKAGES = ("ai", "@ag-ui/client")
EMAIL = '{"to": "kim@example.com", "subject": "Hello"}'
PARALLEL = 'call calculate {"expression": "6*7"}; call calculate {"expression": "2+3"}'


@tool
async def slow_steps(ctx: ToolContext, steps: int) -> str:
    """Work through some steps, slowly, saying where it is.

    Args:
        steps: How many.
    """
    for step in range(1, steps + 1):
        ctx.progress(f"step {step} of {steps}", step / steps)
        await asyncio.sleep(0.3)
    return f"all {steps} steps done"


def npm_ci(npm: str, folder: Path, packages: tuple[str, ...]) -> None:
    """``npm ci`` in ``folder`` unless ``packages`` are installed there already."""
    if all((folder / "node_modules" / p / "package.json").exists() for p in packages):
        return
    command = [npm, "ci", "--prefix", str(folder), "--no-audit", "--no-fund"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`{' '.join(command)}` did not finish in 5 minutes")
    if done.returncode != 0:
        pytest.fail(f"`{' '.join(command)}` failed:\n{done.stdout[-3000:]}\n{done.stderr}")


@pytest.fixture(scope="module")
def node() -> str:
    """Node.js, with the pinned client libraries installed (``npm ci`` when missing)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        # As for Bruno's CLI and the npm MCP server: never skipped, the setup installs it.
        pytest.fail(
            "the frontends' client libraries need Node.js and npm, and "
            f"{'node' if node is None else 'npm'} is not on PATH "
            "(Debian: apt-get install nodejs npm)."
        )
    npm_ci(npm, NPM_DIR, PACKAGES)
    return node


@pytest.fixture
def server(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[LiveServer]:
    """The scripted model at 20 ms a token, the built-in tools and the approval tools."""
    monkeypatch.setenv("APPROVAL_TOOLS_LOG", str(tmp_path / "ran.jsonl"))
    settings = settings.with_(model="scripted:20")
    tools = [*BUILTIN, *approval_tools.tools, slow_steps]
    with live_server(settings, lambda s: create_app(s, tools=tools)) as live:
        yield live


def drive(node: str, script: str, server: LiveServer, **scenario: Any) -> dict[str, Any]:
    """Run a driver in tests/support/npm_frontends; what it printed, parsed."""
    done = subprocess.run(
        [node, str(NPM_DIR / script), json.dumps({"url": server.url, **scenario})],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=NPM_DIR,
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["warnings"] == [], result["warnings"]
    return result


def user_message(text: str) -> dict[str, Any]:
    return {"id": "m", "role": "user", "parts": [{"type": "text", "text": text}]}


def types(items: list[dict[str, Any]]) -> list[str]:
    return [item["type"] for item in items]


def text_of(message: dict[str, Any]) -> str:
    return "".join(p["text"] for p in message["parts"] if p["type"] == "text")


def tool_parts(message: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in message["parts"] if p["type"].startswith("tool-")]


def session(server: LiveServer, session_id: str) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/api/chat/sessions/{session_id}", timeout=10)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


# -- the Vercel AI SDK's UI message stream -------------------------------------------


def test_ui_stream_text_is_one_assistant_message_with_the_session_in_its_metadata(
    node: str, server: LiveServer
) -> None:
    result = drive(node, "ui.mjs", server, name="send", chatId="ui-text", text="count to 5")

    assert types(result["chunks"]) == [
        "start",
        "start-step",
        "text-start",
        *["text-delta"] * 5,
        "text-end",
        "finish-step",
        "finish",
    ]
    message = result["message"]
    assert message["id"] == result["runId"]
    assert message["role"] == "assistant"
    assert text_of(message) == "1 2 3 4 5"
    assert message["metadata"]["sessionId"] == "ui-text"
    assert message["metadata"]["runId"] == result["runId"]
    assert message["metadata"]["historyLength"] == 2
    assert message["metadata"]["usage"]["completionTokens"] == 5
    assert result["errors"] == []
    assert session(server, "ui-text")["historyLength"] == 2


def test_ui_stream_parallel_tool_calls_show_their_progress_and_outputs(
    node: str, server: LiveServer
) -> None:
    result = drive(node, "ui.mjs", server, name="send", chatId="ui-tools", text=PARALLEL)

    chunks = result["chunks"]
    kinds = types(chunks)
    # Two model rounds, each a step: the calls and their outputs, then the answer.
    assert kinds.count("start-step") == 2
    assert kinds.count("finish-step") == 2
    assert kinds.index("finish-step") > max(
        i for i, k in enumerate(kinds) if k == "tool-output-available"
    )
    inputs = [c for c in chunks if c["type"] == "tool-input-available"]
    assert [(c["toolName"], c["input"]) for c in inputs] == [
        ("calculate", {"expression": "6*7"}),
        ("calculate", {"expression": "2+3"}),
    ]
    progress = [c for c in chunks if c["type"] == "data-tool-progress"]
    assert {c["id"] for c in progress} == {c["toolCallId"] for c in inputs}
    assert all(c["data"]["tool"] == "calculate" and c["data"]["message"] for c in progress)

    message = result["message"]
    parts = tool_parts(message)
    assert [(p["type"], p["state"], p["output"]) for p in parts] == [
        ("tool-calculate", "output-available", "42"),
        ("tool-calculate", "output-available", "5"),
    ]
    # One progress part per call, kept up to date by the SDK (it replaces by id).
    progress_parts = [p for p in message["parts"] if p["type"] == "data-tool-progress"]
    assert sorted(p["id"] for p in progress_parts) == sorted(p["toolCallId"] for p in parts)
    assert "42" in text_of(message) and "5" in text_of(message)


def test_ui_stream_a_failing_tool_is_an_output_error_and_the_turn_goes_on(
    node: str, server: LiveServer
) -> None:
    text = 'call calculate {"expression": "1/0"}'
    result = drive(node, "ui.mjs", server, name="send", chatId="ui-tool-error", text=text)

    (part,) = tool_parts(result["message"])
    assert part["state"] == "output-error"
    assert "division by zero" in part["errorText"]
    assert types(result["chunks"])[-1] == "finish"
    assert result["errors"] == []
    assert "division by zero" in text_of(result["message"])


def test_ui_stream_a_model_failure_is_an_error_chunk_then_finish(
    node: str, server: LiveServer
) -> None:
    text = "simulate a model error"
    result = drive(node, "ui.mjs", server, name="send", chatId="ui-model-error", text=text)

    chunks = result["chunks"]
    assert types(chunks)[-2:] == ["error", "finish"]
    assert chunks[-2]["code"] == "MODEL_ERROR"
    assert chunks[-1]["messageMetadata"]["code"] == "MODEL_ERROR"
    assert result["errors"] == [chunks[-2]["errorText"]]
    assert text_of(result["message"]) == "Starting to answer"


def test_ui_stream_stop_through_the_cancel_endpoint_ends_the_message(
    node: str, server: LiveServer
) -> None:
    result = drive(
        node,
        "ui.mjs",
        server,
        name="send",
        chatId="ui-stop",
        text="count to 200",
        stopAfterDeltas=3,
    )

    assert result["cancelStatus"] == 200
    chunks = result["chunks"]
    assert types(chunks)[-2:] == ["error", "finish"]
    assert chunks[-2]["code"] == "CANCELLED"
    assert types(chunks).count("text-delta") < 200
    stored = session(server, "ui-stop")["messages"]
    assert stored[-1]["interrupted"] is True


def test_ui_stream_a_dropped_stream_is_resumed_from_the_runs_start(
    node: str, server: LiveServer
) -> None:
    result = drive(
        node,
        "ui.mjs",
        server,
        name="send",
        chatId="ui-drop",
        text="count to 100",
        dropAfterDeltas=3,
    )

    assert "finish" not in types(result["chunks"])  # the first read was cut short
    resumed = result["resumed"]
    assert resumed is not None
    assert resumed["message"]["id"] == result["runId"]
    assert text_of(resumed["message"]) == " ".join(str(i) for i in range(1, 101))
    assert types(resumed["chunks"])[0] == "start"
    assert types(resumed["chunks"])[-1] == "finish"
    assert session(server, "ui-drop")["historyLength"] == 2


def test_ui_stream_reconnect_without_an_active_run_is_204(node: str, server: LiveServer) -> None:
    result = drive(node, "ui.mjs", server, name="resume", chatId="ui-nothing-running")
    assert result["resumed"] is None
    response = httpx.get(f"{server.url}/api/ui/chat/never-seen/stream", timeout=10)
    assert response.status_code == 204


def test_ui_stream_approval_answered_by_the_sdk_runs_the_tool(
    node: str, server: LiveServer, tmp_path: Path
) -> None:
    text = f"call send_email {EMAIL}"
    result = drive(
        node, "ui.mjs", server, name="approve", chatId="ui-approve", text=text, approved=True
    )

    assert result["errors"] == []
    assert len(result["asked"]) == 1
    # The first stream stopped at the request, before anything of the tool ran.
    (asked,) = tool_parts(result["before"][-1])
    assert asked["state"] == "approval-requested"
    assert asked["approval"]["id"] == asked["toolCallId"]
    messages = result["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    (part,) = tool_parts(messages[-1])
    assert part["state"] == "output-available"
    assert part["output"] == "Sent 'Hello' to kim@example.com."
    assert part["approval"]["approved"] is True
    assert "Sent 'Hello'" in text_of(messages[-1])
    assert approval_tools.ran(str(tmp_path / "ran.jsonl")) == [
        {"tool": "send_email", "to": "kim@example.com", "subject": "Hello"}
    ]


def test_ui_stream_approval_declined_by_the_sdk_tells_the_model(
    node: str, server: LiveServer, tmp_path: Path
) -> None:
    text = f"call send_email {EMAIL}"
    result = drive(
        node,
        "ui.mjs",
        server,
        name="approve",
        chatId="ui-decline",
        text=text,
        approved=False,
        reason="Not today.",
    )

    (part,) = tool_parts(result["messages"][-1])
    assert part["state"] == "output-error"
    assert "Not today." in part["errorText"]
    assert approval_tools.ran(str(tmp_path / "ran.jsonl")) == []
    assert session(server, "ui-decline")["historyLength"] == 2


def test_ui_stream_regenerate_replaces_the_last_answer(node: str, server: LiveServer) -> None:
    result = drive(node, "ui.mjs", server, name="regenerate", chatId="ui-again", text="count to 3")

    assert result["errors"] == []
    assert [m["role"] for m in result["first"]] == ["user", "assistant"]
    messages = result["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[-1]["id"] != result["first"][-1]["id"]  # a new run
    assert text_of(messages[-1]) == "1 2 3"
    stored = session(server, "ui-again")
    assert stored["historyLength"] == 2
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant"]


def test_ui_stream_regenerate_keeps_the_old_answer_until_the_new_one_is_stored(
    server: LiveServer,
) -> None:
    def ask(trigger: str) -> dict[str, Any]:
        part = {"type": "text", "text": "count to 30"}
        return {
            "id": "ui-keep",
            "trigger": trigger,
            "messages": [{"id": "m1", "role": "user", "parts": [part]}],
        }

    first = httpx.post(f"{server.url}/api/ui/chat", json=ask("submit-message"), timeout=30)
    assert first.status_code == 200
    old = session(server, "ui-keep")["messages"][-1]["content"]
    url = f"{server.url}/api/ui/chat"
    with httpx.stream("POST", url, json=ask("regenerate-message"), timeout=30) as again:
        assert again.status_code == 200
        chunks = again.iter_lines()
        next(line for line in chunks if '"text-delta"' in line)
        # Mid-answer, the session still holds the turn being regenerated, whole: a crash
        # now would lose nothing.
        during = session(server, "ui-keep")
        assert [m["content"] for m in during["messages"]] == ["count to 30", old]
        for _ in chunks:
            pass
    after = session(server, "ui-keep")
    assert [m["role"] for m in after["messages"]] == ["user", "assistant"]
    assert after["messages"][-1]["content"] == " ".join(str(i) for i in range(1, 31))
    # Nothing to regenerate in a new chat: a clear refusal, nothing written.
    empty = {**ask("regenerate-message"), "id": "ui-nothing"}
    refused = httpx.post(url, json=empty, timeout=10)
    assert refused.status_code == 400
    assert "no answer to regenerate" in refused.json()["error"]["message"]
    assert httpx.get(f"{server.url}/api/chat/sessions/ui-nothing", timeout=10).status_code == 404


# -- AG-UI ---------------------------------------------------------------------------


def test_agui_text_streams_one_message_between_run_started_and_run_finished(
    node: str, server: LiveServer
) -> None:
    result = drive(node, "agui.mjs", server, name="run", threadId="ag-text", text="count to 4")

    events = result["events"]
    assert types(events) == [
        "RUN_STARTED",
        "TEXT_MESSAGE_START",
        *["TEXT_MESSAGE_CONTENT"] * 4,
        "TEXT_MESSAGE_END",
        "RUN_FINISHED",
    ]
    assert events[0]["threadId"] == "ag-text"
    assert events[-1]["outcome"] == {"type": "success"}
    assert events[-1]["result"]["historyLength"] == 2
    assert "error" not in result and "failed" not in result
    assert [(m["role"], m.get("content")) for m in result["messages"]][-1] == (
        "assistant",
        "1 2 3 4",
    )
    assert session(server, "ag-text")["historyLength"] == 2


def test_agui_parallel_tool_calls_with_progress_and_results(node: str, server: LiveServer) -> None:
    result = drive(node, "agui.mjs", server, name="run", threadId="ag-tools", text=PARALLEL)

    events = result["events"]
    starts = [e for e in events if e["type"] == "TOOL_CALL_START"]
    assert [e["toolCallName"] for e in starts] == ["calculate", "calculate"]
    ids = {e["toolCallId"] for e in starts}
    progress = [e for e in events if e["type"] == "CUSTOM" and e["name"] == "tool_progress"]
    assert {e["value"]["id"] for e in progress} == ids
    results = {e["toolCallId"]: e["content"] for e in events if e["type"] == "TOOL_CALL_RESULT"}
    assert sorted(results.values()) == ["42", "5"]

    messages = result["messages"]
    calls = next(m for m in messages if m.get("toolCalls"))
    assert [json.loads(c["function"]["arguments"]) for c in calls["toolCalls"]] == [
        {"expression": "6*7"},
        {"expression": "2+3"},
    ]
    tool_messages = [m for m in messages if m["role"] == "tool"]
    assert {m["toolCallId"] for m in tool_messages} == ids
    assert "42" in messages[-1]["content"]


def test_agui_a_failing_tool_is_a_result_marked_as_an_error(node: str, server: LiveServer) -> None:
    text = 'call calculate {"expression": "1/0"}'
    result = drive(node, "agui.mjs", server, name="run", threadId="ag-tool-error", text=text)

    (failed,) = [e for e in result["events"] if e["type"] == "TOOL_CALL_RESULT"]
    assert "division by zero" in failed["content"]
    assert failed["metadata"] == {"isError": True}
    assert types(result["events"])[-1] == "RUN_FINISHED"


def test_agui_a_model_failure_is_run_error(node: str, server: LiveServer) -> None:
    text = "simulate a model error"
    result = drive(node, "agui.mjs", server, name="run", threadId="ag-model-error", text=text)

    events = result["events"]
    assert types(events)[-2:] == ["TEXT_MESSAGE_END", "RUN_ERROR"]
    assert events[-1]["code"] == "MODEL_ERROR"


def test_agui_stop_through_the_cancel_endpoint_finishes_the_run_as_cancelled(
    node: str, server: LiveServer
) -> None:
    result = drive(
        node,
        "agui.mjs",
        server,
        name="run",
        threadId="ag-stop",
        text="count to 200",
        stopAfterDeltas=3,
    )

    assert result["cancelStatus"] == 200
    events = result["events"]
    assert events[-1]["type"] == "RUN_FINISHED"
    assert events[-1]["outcome"] == {"type": "cancelled"}
    assert types(events).count("TEXT_MESSAGE_CONTENT") < 200
    assert session(server, "ag-stop")["messages"][-1]["interrupted"] is True


def test_agui_a_dropped_run_is_replayed_by_its_run_id(node: str, server: LiveServer) -> None:
    result = drive(
        node,
        "agui.mjs",
        server,
        name="run",
        threadId="ag-drop",
        text="count to 100",
        dropAfterDeltas=3,
    )

    assert "RUN_FINISHED" not in types(result["events"])  # the first read was cut short
    replayed = result["replayed"]
    assert replayed["events"][0]["runId"] == result["runId"]
    assert types(replayed["events"])[-1] == "RUN_FINISHED"
    text = "".join(e["delta"] for e in replayed["events"] if e["type"] == "TEXT_MESSAGE_CONTENT")
    assert text == " ".join(str(i) for i in range(1, 101))


def test_agui_approval_is_an_interrupt_answered_by_resume(
    node: str, server: LiveServer, tmp_path: Path
) -> None:
    text = f"call send_email {EMAIL}"
    result = drive(
        node, "agui.mjs", server, name="approve", threadId="ag-approve", text=text, approved=True
    )

    first = result["first"]
    finished = first["events"][-1]
    assert finished["type"] == "RUN_FINISHED"
    assert finished["outcome"]["type"] == "interrupt"
    (interrupt,) = finished["outcome"]["interrupts"]
    assert interrupt["reason"] == "tool_approval"
    assert interrupt["metadata"] == {"tool": "send_email", "args": json.loads(EMAIL)}
    assert [e["type"] for e in first["events"]].count("TOOL_CALL_RESULT") == 0

    second = result["second"]
    assert "error" not in second, second
    assert second["pendingInterrupts"] == []
    (sent,) = [e for e in second["events"] if e["type"] == "TOOL_CALL_RESULT"]
    assert sent["toolCallId"] == interrupt["toolCallId"]
    assert sent["content"] == "Sent 'Hello' to kim@example.com."
    assert second["events"][-1]["outcome"] == {"type": "success"}
    assert approval_tools.ran(str(tmp_path / "ran.jsonl")) == [
        {"tool": "send_email", "to": "kim@example.com", "subject": "Hello"}
    ]


# -- refusals --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "names"),
    [
        ("/api/ui/chat", {"messages": []}, ["id", "messages", "trigger"]),
        (
            "/api/ui/chat",
            {"id": "s", "trigger": "submit-message", "messages": [{"role": "user"}]},
            ["messages.0.id", "messages.0.parts"],
        ),
        (
            "/api/ui/chat",
            {"id": "s", "trigger": "send", "messages": [{"id": "m", "role": "user", "parts": []}]},
            ["trigger"],
        ),
        (
            "/api/ui/chat",
            {
                "id": "not a session id",
                "trigger": "submit-message",
                "messages": [
                    {"id": "m", "role": "user", "parts": [{"type": "text", "text": "hi"}]}
                ],
            },
            ["id"],
        ),
        (
            "/api/ui/chat",
            {
                "id": "s",
                "trigger": "submit-message",
                "messages": [{"id": "m", "role": "assistant", "parts": [{"type": "text"}]}],
            },
            ["messages"],
        ),
        ("/api/agui", {"threadId": "t"}, ["runId", "messages"]),
        ("/api/agui", {"threadId": "t", "runId": "r", "messages": []}, ["messages"]),
        (
            "/api/agui",
            {
                "threadId": "t",
                "runId": "r",
                "messages": [],
                "resume": [{"interruptId": "nope", "status": "resolved", "payload": True}],
            },
            ["resume", "nope"],
        ),
    ],
)
def test_bodies_not_of_the_protocols_shape_are_400_naming_what_is_wrong(
    server: LiveServer, path: str, body: dict[str, Any], names: list[str]
) -> None:
    response = httpx.post(server.url + path, json=body, timeout=10)

    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "INVALID_REQUEST"
    for name in names:
        assert name in error["message"]


@pytest.mark.parametrize(
    "content", ["hi \ud800", [{"type": "text", "text": "hi \ud800"}]], ids=["string", "part"]
)
def test_agui_text_with_a_lone_surrogate_is_refused_before_the_turn(
    server: LiveServer, content: object
) -> None:
    thread = f"ag-surrogate-{type(content).__name__}"
    body = {
        "threadId": thread,
        "runId": "r",
        "messages": [{"id": "m", "role": "user", "content": content}],
    }
    # As JSON escapes ("\\ud800"), the way a browser's JSON.stringify sends a lone half.
    response = httpx.post(
        f"{server.url}/api/agui",
        content=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
        timeout=10,
    )

    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "INVALID_REQUEST"
    assert "surrogate" in error["message"]
    assert "[" not in error["message"]  # pydantic's names for the types it tried
    assert httpx.get(f"{server.url}/api/chat/sessions/{thread}", timeout=10).status_code == 404


def test_a_user_message_without_text_is_missing_message(server: LiveServer) -> None:
    body = {
        "id": "s",
        "trigger": "submit-message",
        "messages": [{"id": "m", "role": "user", "parts": [{"type": "file", "url": "x"}]}],
    }
    response = httpx.post(f"{server.url}/api/ui/chat", json=body, timeout=10)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "MISSING_MESSAGE"


def test_heartbeats_between_chunks_are_comments_both_clients_skip(
    node: str, settings: Settings
) -> None:
    settings = settings.with_(model="scripted:40", heartbeat_s=0.01)
    with live_server(settings) as live:
        body = {
            "id": "beats",
            "trigger": "submit-message",
            "messages": [
                {"id": "m", "role": "user", "parts": [{"type": "text", "text": "count to 3"}]}
            ],
        }
        raw = httpx.post(f"{live.url}/api/ui/chat", json=body, timeout=10).text
        assert ": ping\n\n" in raw
        ui = drive(node, "ui.mjs", live, name="send", chatId="beats-ui", text="count to 3")
        agui = drive(node, "agui.mjs", live, name="run", threadId="beats-ag", text="count to 3")

    assert text_of(ui["message"]) == "1 2 3"
    assert ui["errors"] == []
    assert types(agui["events"])[-1] == "RUN_FINISHED"
    assert agui["messages"][-1]["content"] == "1 2 3"


# -- the useChat example page in Chromium ------------------------------------------------


@pytest.fixture(scope="module")
def example(node: str) -> Path:
    """examples/use-chat, installed from npm and built (esbuild) into its dist/."""
    npm = shutil.which("npm")
    assert npm is not None
    npm_ci(npm, EXAMPLE, ("@ai-sdk/react", "react-dom", "esbuild"))
    done = subprocess.run(
        [npm, "run", "build", "--prefix", str(EXAMPLE)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"the example's build failed:\n{done.stdout}\n{done.stderr}"
    return EXAMPLE


@contextmanager
def static_site(folder: Path) -> Iterator[str]:
    """``folder`` served over HTTP on a loopback port; yields its origin."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            return None

    site = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{site.server_address[1]}"
    finally:
        site.shutdown()
        site.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if PLAYWRIGHT_MISSING is not None:
        pytest.fail(f"Playwright is not installed ({PLAYWRIGHT_MISSING}): pip install playwright")
    if not CHROMIUM.exists():
        pytest.fail(f"Chromium is not installed at {CHROMIUM}: apt-get install -y chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        yield browser
        browser.close()


# Every text the answer's paragraphs showed, recorded at each DOM change.
RECORD_TEXTS = """() => {
  window.__texts = [];
  new MutationObserver(() => {
    const texts = [...document.querySelectorAll('.message[data-role="assistant"] .text')];
    if (texts.length) window.__texts.push(texts.at(-1).textContent);
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def test_the_use_chat_example_shows_tokens_a_tools_progress_and_its_result(
    example: Path, browser: Browser, settings: Settings, tmp_path: Path
) -> None:
    with static_site(example) as origin:
        settings = settings.with_(model="scripted:30", cors_origins=(origin,))
        with live_server(settings, lambda s: create_app(s, tools=[slow_steps])) as live:
            page: Page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(f"{origin}/index.html?server={live.url}")
            page.evaluate(RECORD_TEXTS)

            page.fill("input[name=message]", "count to 20")
            page.click("button[type=submit]")
            answer = page.locator('.message[data-role="assistant"] .text').last
            expect(answer).to_have_text(" ".join(str(i) for i in range(1, 21)), timeout=10_000)
            seen = page.evaluate("window.__texts")
            # The answer grew token by token: it showed some of it before all of it.
            assert any(0 < len(text) < len(seen[-1]) for text in seen), seen

            page.fill("input[name=message]", 'call slow_steps {"steps": 3}')
            page.click("button[type=submit]")
            card = page.locator(".tool").last
            expect(card.locator(".progress")).to_contain_text("of 3", timeout=10_000)
            expect(card.locator(".result")).to_have_text("all 3 steps done", timeout=10_000)
            expect(card).to_have_attribute("data-state", "output-available")
            expect(page.locator('.message[data-role="assistant"]').last).to_contain_text(
                "Here is what I found: all 3 steps done"
            )
            expect(page.locator("#status")).to_have_attribute("data-status", "ready")
            page.screenshot(path=tmp_path / "use-chat.png")
            page.close()
    assert not errors, errors


def test_an_approval_answer_naming_another_chats_run_is_refused(
    server: LiveServer, tmp_path: Path
) -> None:
    params = {"message": f"call send_email {EMAIL}", "sessionId": "mine"}
    url = f"{server.url}/api/chat/stream"
    with httpx.stream("GET", url, params=params, timeout=30) as waiting:
        frames = FrameDecoder()
        asked = None
        for chunk in waiting.iter_bytes():
            asked = next((f for f in frames.feed(chunk) if f.event == "approval_required"), None)
            if asked is not None:
                break
        assert asked is not None and asked.id is not None
        run_id = asked.id.rsplit(":", 1)[0]
        call_id = json.loads(asked.data)["id"]
        part = {
            "type": "tool-send_email",
            "toolCallId": call_id,
            "state": "approval-responded",
            "approval": {"id": "a1", "approved": True},
        }
        ui = {
            "id": "other",
            "trigger": "submit-message",
            "messages": [{"id": run_id, "role": "assistant", "parts": [part]}],
        }
        interrupt = {"interruptId": f"{run_id}:{call_id}", "status": "resolved", "payload": True}
        agui = {"threadId": "other", "runId": "r", "messages": [], "resume": [interrupt]}
        for path, body in (("/api/ui/chat", ui), ("/api/agui", agui)):
            refused = httpx.post(server.url + path, json=body, timeout=10)
            assert refused.status_code == 400, refused.text
            assert "another session" in refused.json()["error"]["message"]
        # Nothing was answered: the call still waits in its own chat.
        state = httpx.get(f"{server.url}/api/chat/runs/{run_id}", timeout=10).json()
        assert [p["id"] for p in state["pendingApprovals"]] == [call_id]
        assert approval_tools.ran(str(tmp_path / "ran.jsonl")) == []
        httpx.post(f"{server.url}/api/chat/runs/{run_id}/cancel", timeout=10)
