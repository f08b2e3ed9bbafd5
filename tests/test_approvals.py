"""Approvals through the real server on loopback, the fake OpenAI upstream calling tools.

The tools (``tests/support/approval_tools.py``) record each call in a file, so every test
can tell whether a tool ran before a person said yes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatstream.client import Approval, AsyncClient, Client, ClientError
from chatstream.config import Settings
from chatstream.events import ApprovalRequired, Done, Event, Frame, FrameDecoder
from chatstream.server.app import create_app
from tests.fakes.anthropic_upstream import FakeAnthropic, ToolUse
from tests.fakes.anthropic_upstream import Message as AnthropicMessage
from tests.fakes.openai_upstream import Call, Completion, FakeOpenAI
from tests.support import approval_tools
from tests.support.approval_tools import ran
from tests.support.process import server_process
from tests.support.server import LiveServer, live_server
from tests.support.sse import stream

EMAIL = {"to": "kim@example.com", "subject": "Hello"}
TOOLS = "tests.support.approval_tools:tools"
MCP_TEST_SERVER = Path(__file__).resolve().parent / "support" / "mcp_server.py"


@pytest.fixture
def upstream(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        monkeypatch.setenv("OPENAI_BASE_URL", fake.url)
        yield fake


@asynccontextmanager
async def serve(settings: Settings, **overrides: Any) -> AsyncIterator[LiveServer]:
    settings = settings.with_(model="openai:fake-model", **overrides)
    with live_server(settings, lambda s: create_app(s, tools=approval_tools.tools)) as live:
        yield live


class Reader:
    """A stream read event by event while the test does other things."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.frames: list[Frame] = []
        self._decoder = FrameDecoder()
        self._chunks = response.aiter_raw()
        self._next = 0  # the first frame that ``until`` has not passed yet

    async def until(self, kind: str, within: float = 10.0) -> Frame:
        """Read up to the next frame of ``kind``; the frames read stay in ``frames``."""
        async with asyncio.timeout(within):
            while True:
                for index in range(self._next, len(self.frames)):
                    if self.frames[index].event == kind:
                        self._next = index + 1
                        return self.frames[index]
                self._next = len(self.frames)
                self.frames.extend(self._decoder.feed(await anext(self._chunks)))

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [json.loads(f.data) for f in self.frames if f.event == kind]

    @property
    def types(self) -> list[str]:
        return [f.event for f in self.frames]


@asynccontextmanager
async def reading(http: httpx.AsyncClient, **params: str) -> AsyncIterator[Reader]:
    headers = {}
    if "last_event_id" in params:
        headers["Last-Event-ID"] = params.pop("last_event_id")
    async with http.stream("GET", "/api/chat/stream", params=params, headers=headers) as response:
        assert response.status_code == 200
        yield Reader(response)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def run_of(frame: Frame) -> str:
    return (frame.id or "").split(":")[0]


def email_call(call_id: str = "call_mail") -> Completion:
    return Completion(tool_calls=[Call("send_email", EMAIL, id=call_id)])


async def test_a_call_waits_for_approval_then_runs(
    settings: Settings, upstream: FakeOpenAI, ran_log: Path
) -> None:
    upstream.enqueue(email_call(), Completion(text=["Sent", " it."]))
    async with serve(settings) as live, httpx.AsyncClient(base_url=live.url, timeout=30) as http:
        async with reading(http, message="mail Kim", sessionId="s-approve") as events:
            asked = await events.until("approval_required")
            request = json.loads(asked.data)
            assert events.types[-2:] == ["tool_call", "approval_required"]
            assert request["id"] == "call_mail"
            assert request["tool"] == "send_email"
            assert request["args"] == EMAIL
            expires = dt.datetime.fromisoformat(request["expiresAt"])
            left = (expires - dt.datetime.now(dt.UTC)).total_seconds()
            assert 590 < left <= 600
            run_id = run_of(asked)
            # The run waits: nothing of the tool has run, and the run says what it waits for.
            await asyncio.sleep(0.3)
            assert ran(ran_log) == []
            state = (await http.get(f"/api/chat/runs/{run_id}")).json()
            assert state["state"] == "waiting"
            assert state["pendingApprovals"] == [request]
            answer = await http.post(
                f"/api/chat/runs/{run_id}/approvals/call_mail", json={"approved": True}
            )
            assert answer.status_code == 200
            assert answer.json() == {
                "runId": run_id,
                "callId": "call_mail",
                "approved": True,
                "state": "running",
            }
            result = json.loads((await events.until("tool_result")).data)
            assert result["isError"] is False
            assert result["approval"] == "approved"
            assert result["result"] == "Sent 'Hello' to kim@example.com."
            await events.until("done")
            assert events.of("tool_progress")[0]["message"] == "sending"
        assert ran(ran_log) == [{"tool": "send_email", **EMAIL}]
        session = (await http.get("/api/chat/sessions/s-approve")).json()
        step, result_msg, final = session["messages"][1:]
        assert step["toolCalls"][0]["approval"] == "approved"
        assert result_msg["approval"] == "approved"
        assert final["content"] == "Sent it."
        assert (await http.get(f"/api/chat/runs/{run_id}")).json()["pendingApprovals"] == []


async def test_a_declined_call_never_runs_and_the_model_is_told_why(
    settings: Settings, upstream: FakeOpenAI, ran_log: Path
) -> None:
    upstream.enqueue(email_call(), Completion(text=["OK,", " I", " won't."]))
    async with serve(settings) as live, httpx.AsyncClient(base_url=live.url, timeout=30) as http:
        async with reading(http, message="mail Kim", sessionId="s-decline") as events:
            run_id = run_of(await events.until("approval_required"))
            answer = await http.post(
                f"/api/chat/runs/{run_id}/approvals/call_mail",
                json={"approved": False, "reason": "Not today."},
            )
            assert answer.json()["approved"] is False
            result = json.loads((await events.until("tool_result")).data)
            await events.until("done")
        assert (result["isError"], result["approval"]) == (True, "declined")
        assert result["result"] == "The user declined to run send_email. Their reason: Not today."
        assert ran(ran_log) == []
        told = upstream.requests[-1].body["messages"][-1]
        assert told["role"] == "tool"
        assert "declined" in told["content"]
        assert "Not today." in told["content"]
        assert events.of("token")[0]["content"] == "OK,"


async def test_an_unanswered_call_expires_and_a_late_answer_is_refused(
    settings: Settings, upstream: FakeOpenAI, ran_log: Path
) -> None:
    upstream.enqueue(email_call(), Completion(text=["Nobody", " said", " yes."]))
    async with (
        serve(settings, approval_timeout_s=0.5) as live,
        httpx.AsyncClient(base_url=live.url, timeout=30) as http,
    ):
        async with reading(http, message="mail Kim") as events:
            run_id = run_of(await events.until("approval_required"))
            result = json.loads((await events.until("tool_result")).data)
            await events.until("done")
        assert (result["isError"], result["approval"]) == (True, "expired")
        assert result["result"] == "Nobody approved send_email within 0.5 s, so it did not run."
        late = await http.post(
            f"/api/chat/runs/{run_id}/approvals/call_mail", json={"approved": True}
        )
        assert late.status_code == 409
        assert late.json()["error"]["code"] == "APPROVAL_ANSWERED"
        assert ran(ran_log) == []


async def test_one_answer_per_call_and_only_the_owners(
    settings: Settings, upstream: FakeOpenAI, ran_log: Path
) -> None:
    upstream.enqueue(email_call(), Completion(text=["Done."]))
    keys = {"api_keys": ("key-a", "key-b")}
    async with serve(settings, **keys) as live:
        a = httpx.AsyncClient(base_url=live.url, timeout=30, headers=bearer("key-a"))
        b = httpx.AsyncClient(base_url=live.url, timeout=30, headers=bearer("key-b"))
        async with a, b, reading(a, message="mail Kim") as events:
            run_id = run_of(await events.until("approval_required"))
            url = f"/api/chat/runs/{run_id}/approvals/call_mail"
            others = await b.post(url, json={"approved": True})
            assert others.status_code == 404
            assert others.json()["error"]["code"] == "APPROVAL_NOT_FOUND"
            unknown = await a.post(
                f"/api/chat/runs/{run_id}/approvals/nope", json={"approved": True}
            )
            assert unknown.status_code == 404
            assert unknown.json()["error"]["code"] == "APPROVAL_NOT_FOUND"
            no_run = await a.post(
                "/api/chat/runs/run_0/approvals/call_mail", json={"approved": True}
            )
            assert no_run.status_code == 404
            assert (await a.post(url, json={"approved": False})).status_code == 200
            twice = await a.post(url, json={"approved": True})
            assert twice.status_code == 409
            assert twice.json()["error"]["code"] == "APPROVAL_ANSWERED"
            malformed = await a.post(url, json={"approved": "yes please"})
            assert malformed.status_code == 400
            wordy = await a.post(url, json={"approved": False, "reason": "x" * 2001})
            assert wordy.status_code == 400
            assert "reason" in wordy.json()["error"]["message"]
            long_id = await a.post(
                f"/api/chat/runs/{run_id}/approvals/{'c' * 5000}", json={"approved": True}
            )
            assert long_id.status_code == 404
            assert len(long_id.json()["error"]["message"]) < 300  # not echoed back whole
            await events.until("done")
        assert ran(ran_log) == []


@asynccontextmanager
async def away_while_asked(
    settings: Settings, upstream: FakeOpenAI, session_id: str
) -> AsyncIterator[tuple[httpx.AsyncClient, Frame]]:
    """A server with a short grace period whose reader left once it was asked to approve,
    and stayed away for well past the grace period: a client, and the request it saw."""
    upstream.enqueue(email_call(), Completion(text=["Sent."]))
    async with (
        serve(settings, resume_grace_s=0.2) as live,
        httpx.AsyncClient(base_url=live.url, timeout=30) as http,
    ):
        async with reading(http, message="mail Kim", sessionId=session_id) as events:
            asked = await events.until("approval_required")
        await asyncio.sleep(1.0)
        yield http, asked


async def test_a_waiting_run_outlives_its_reader_and_resumes_with_the_request(
    settings: Settings, upstream: FakeOpenAI, ran_log: Path
) -> None:
    async with away_while_asked(settings, upstream, "s-away") as (http, asked):
        run_id = run_of(asked)
        state = (await http.get(f"/api/chat/runs/{run_id}")).json()
        assert state["state"] == "waiting"
        # Coming back replays the request like any other event, then follows the run.
        async with reading(http, last_event_id=f"{run_id}:0") as again:
            replayed = await again.until("approval_required")
            assert replayed.data == asked.data
            await http.post(f"/api/chat/runs/{run_id}/approvals/call_mail", json={"approved": True})
            await again.until("done")
        assert again.types[:2] == ["tool_call", "approval_required"]
        assert ran(ran_log) == [{"tool": "send_email", **EMAIL}]


async def test_an_answer_with_nobody_listening_still_finishes_the_turn(
    settings: Settings, upstream: FakeOpenAI, ran_log: Path
) -> None:
    async with away_while_asked(settings, upstream, "s-curl") as (http, asked):
        run_id = run_of(asked)
        await http.post(f"/api/chat/runs/{run_id}/approvals/call_mail", json={"approved": True})
        for _ in range(100):
            if (await http.get(f"/api/chat/runs/{run_id}")).json()["state"] == "done":
                break
            await asyncio.sleep(0.05)
        session = (await http.get("/api/chat/sessions/s-curl")).json()
        assert session["messages"][-1]["content"] == "Sent."
        assert ran(ran_log) == [{"tool": "send_email", **EMAIL}]


async def test_calls_of_one_round_are_asked_together_and_run_as_answered(
    settings: Settings, upstream: FakeOpenAI, ran_log: Path
) -> None:
    upstream.enqueue(
        Completion(
            tool_calls=[
                Call("send_email", EMAIL, id="call_mail"),
                Call("delete_file", {"path": "/tmp/x"}, id="call_rm"),
                Call("look_up", {"key": "k"}, id="call_read"),
            ]
        ),
        Completion(text=["All", " done."]),
    )
    async with serve(settings) as live, httpx.AsyncClient(base_url=live.url, timeout=30) as http:
        async with reading(http, message="do three things", sessionId="s-many") as events:
            first = await events.until("approval_required")
            second = await events.until("approval_required")
            asked = [json.loads(f.data)["id"] for f in (first, second)]
            assert asked == ["call_mail", "call_rm"]
            # The call that needs nobody's yes runs at once.
            read = json.loads((await events.until("tool_result")).data)
            assert read["id"] == "call_read"
            run_id = run_of(first)
            state = (await http.get(f"/api/chat/runs/{run_id}")).json()
            assert [p["id"] for p in state["pendingApprovals"]] == ["call_mail", "call_rm"]
            # Answered last first: it runs first.
            await http.post(f"/api/chat/runs/{run_id}/approvals/call_rm", json={"approved": True})
            assert json.loads((await events.until("tool_result")).data)["id"] == "call_rm"
            state = (await http.get(f"/api/chat/runs/{run_id}")).json()
            assert [p["id"] for p in state["pendingApprovals"]] == ["call_mail"]
            await http.post(
                f"/api/chat/runs/{run_id}/approvals/call_mail", json={"approved": False}
            )
            mail = json.loads((await events.until("tool_result")).data)
            assert (mail["id"], mail["isError"]) == ("call_mail", True)
            await events.until("done")
        assert [r["tool"] for r in ran(ran_log)] == ["look_up", "delete_file"]
        # The model is shown the results in the order it asked.
        told = [m for m in upstream.requests[-1].body["messages"] if m["role"] == "tool"]
        assert [m["tool_call_id"] for m in told] == ["call_mail", "call_rm", "call_read"]


async def test_stopping_a_waiting_run_stores_the_call_as_cancelled(
    settings: Settings, upstream: FakeOpenAI, ran_log: Path
) -> None:
    upstream.enqueue(email_call(), Completion(text=["Next", " turn."]))
    async with serve(settings) as live, httpx.AsyncClient(base_url=live.url, timeout=30) as http:
        async with reading(http, message="mail Kim", sessionId="s-stop") as events:
            run_id = run_of(await events.until("approval_required"))
            stopped = await http.post(f"/api/chat/runs/{run_id}/cancel")
            assert stopped.json()["state"] == "cancelled"
            error = json.loads((await events.until("error")).data)
        assert error["code"] == "CANCELLED"
        late = await http.post(
            f"/api/chat/runs/{run_id}/approvals/call_mail", json={"approved": True}
        )
        assert late.status_code == 409
        assert ran(ran_log) == []
        session = (await http.get("/api/chat/sessions/s-stop")).json()
        step, result_msg, answer = session["messages"][1:]
        assert step["toolCalls"][0]["approval"] == "cancelled"
        assert (result_msg["toolCallId"], result_msg["approval"]) == ("call_mail", "cancelled")
        assert result_msg["isError"] is True
        assert "stopped" in result_msg["content"]
        assert answer["interrupted"] is True
        # The next turn's history is valid for the provider: the call has its result.
        result2 = await stream(
            http, "GET", "/api/chat/stream", params={"message": "next", "sessionId": "s-stop"}
        )
        assert result2.types[-1] == "done"
        sent = upstream.requests[-1].body["messages"]
        calls = [c["id"] for m in sent if m["role"] == "assistant" for c in m.get("tool_calls", [])]
        results = [m["tool_call_id"] for m in sent if m["role"] == "tool"]
        assert calls == results == ["call_mail"]


async def test_the_turn_time_limit_does_not_count_the_wait(
    settings: Settings, upstream: FakeOpenAI, ran_log: Path
) -> None:
    upstream.enqueue(email_call(), Completion(text=["Sent."]))
    async with (
        serve(settings, turn_timeout_s=0.5) as live,
        httpx.AsyncClient(base_url=live.url, timeout=30) as http,
    ):
        async with reading(http, message="mail Kim") as events:
            run_id = run_of(await events.until("approval_required"))
            await asyncio.sleep(1.0)
            await http.post(f"/api/chat/runs/{run_id}/approvals/call_mail", json={"approved": True})
            await events.until("done")
        assert "error" not in events.types
        assert ran(ran_log) == [{"tool": "send_email", **EMAIL}]


# -- across a restart, and across instances ---------------------------------------------


async def test_a_restart_keeps_a_pending_approval_and_the_answer_continues_the_turn(
    tmp_path: Path, upstream: FakeOpenAI, ran_log: Path
) -> None:
    upstream.enqueue(email_call(), Completion(text=["Sent", " after", " all."]))
    store = f"sqlite:///{tmp_path / 'chat.db'}"
    args = ("--model", "openai:fake-model", "--store", store, "--tools", TOOLS)
    env = {"OPENAI_BASE_URL": upstream.url, "APPROVAL_TOOLS_LOG": str(ran_log)}
    async with httpx.AsyncClient(timeout=30) as http:
        with server_process(*args, env=env) as first:
            http.base_url = httpx.URL(first.url)
            async with reading(http, message="mail Kim", sessionId="s-restart") as events:
                asked = await events.until("approval_required")
                first.terminate()
                error = json.loads((await events.until("error")).data)
            assert first.process.wait(timeout=20) in (0, -signal.SIGTERM)
        assert error["code"] == "SHUTTING_DOWN"
        assert "answer it after the restart" in error["message"]
        run_id = run_of(asked)
        with server_process(*args, env=env) as second:
            http.base_url = httpx.URL(second.url)
            session = (await http.get("/api/chat/sessions/s-restart")).json()
            step = session["messages"][-1]
            # The page of another device finds the run to answer in on the call.
            assert step["toolCalls"][0]["approval"] == "pending"
            assert step["toolCalls"][0]["runId"] == run_id
            state = (await http.get(f"/api/chat/runs/{run_id}")).json()
            assert state["state"] == "waiting"
            assert state["pendingApprovals"] == [json.loads(asked.data)]
            assert ran(ran_log) == []
            # Three devices answer at once: one answer continues the turn.
            answers = await asyncio.gather(
                *(
                    http.post(
                        f"/api/chat/runs/{run_id}/approvals/call_mail", json={"approved": True}
                    )
                    for _ in range(3)
                )
            )
            assert sorted(a.status_code for a in answers) == [200, 409, 409]
            refused = [a.json()["error"]["code"] for a in answers if a.status_code == 409]
            assert refused == ["APPROVAL_ANSWERED"] * 2
            answer = next(a for a in answers if a.status_code == 200)
            continued = answer.json()["continuedRunId"]
            assert continued.startswith("run_") and continued != run_id
            async with reading(http, last_event_id=f"{continued}:0") as rest:
                await rest.until("done")
            assert rest.types[:3] == ["tool_call", "tool_progress", "tool_result"]
            assert rest.of("tool_result")[0]["isError"] is False
            assert "".join(t["content"] for t in rest.of("token")) == "Sent after all."
            assert ran(ran_log) == [{"tool": "send_email", **EMAIL}]
            session = (await http.get("/api/chat/sessions/s-restart")).json()
            roles = [m["role"] for m in session["messages"]]
            assert roles == ["user", "assistant", "tool", "assistant"]
            assert session["messages"][1]["toolCalls"][0]["approval"] == "approved"
            assert "runId" not in session["messages"][1]["toolCalls"][0]
            assert session["historyLength"] == 2
            again = await http.post(
                f"/api/chat/runs/{run_id}/approvals/call_mail", json={"approved": True}
            )
            assert again.status_code == 409


async def test_a_new_message_instead_of_an_answer_declines_the_parked_call(
    tmp_path: Path, upstream: FakeOpenAI, ran_log: Path
) -> None:
    upstream.enqueue(email_call(), Completion(text=["Something", " else."]))
    store = f"sqlite:///{tmp_path / 'chat.db'}"
    args = ("--model", "openai:fake-model", "--store", store, "--tools", TOOLS)
    env = {"OPENAI_BASE_URL": upstream.url, "APPROVAL_TOOLS_LOG": str(ran_log)}
    async with httpx.AsyncClient(timeout=30) as http:
        with server_process(*args, env=env) as first:
            http.base_url = httpx.URL(first.url)
            async with reading(http, message="mail Kim", sessionId="s-moved-on") as events:
                run_id = run_of(await events.until("approval_required"))
                first.terminate()
                await events.until("error")
            assert first.process.wait(timeout=20) in (0, -signal.SIGTERM)
        with server_process(*args, env=env) as second:
            http.base_url = httpx.URL(second.url)
            params = {"message": "never mind", "sessionId": "s-moved-on"}
            result = await stream(http, "GET", "/api/chat/stream", params=params)
            assert result.types[-1] == "done"
            sent = upstream.requests[-1].body["messages"]
            assert [m["role"] for m in sent[1:]] == [
                "user",
                "assistant",
                "tool",
                "assistant",
                "user",
            ]
            assert "did not run" in sent[3]["content"]
            late = await http.post(
                f"/api/chat/runs/{run_id}/approvals/call_mail", json={"approved": True}
            )
            assert late.status_code == 409
        assert ran(ran_log) == []


async def test_an_answer_on_instance_b_runs_the_call_on_instance_a(
    redis_url: str, upstream: FakeOpenAI, ran_log: Path
) -> None:
    upstream.enqueue(email_call(), Completion(text=["Sent."]))
    args = ("--model", "openai:fake-model", "--store", redis_url, "--tools", TOOLS)
    env = {"OPENAI_BASE_URL": upstream.url, "APPROVAL_TOOLS_LOG": str(ran_log)}
    with server_process(*args, env=env) as a, server_process(*args, env=env) as b:
        async with (
            httpx.AsyncClient(base_url=a.url, timeout=30) as on_a,
            httpx.AsyncClient(base_url=b.url, timeout=30) as on_b,
        ):
            async with reading(on_a, message="mail Kim", sessionId="s-two") as events:
                run_id = run_of(await events.until("approval_required"))
                state = (await on_b.get(f"/api/chat/runs/{run_id}")).json()
                assert state["state"] == "waiting"
                assert [p["id"] for p in state["pendingApprovals"]] == ["call_mail"]
                url = f"/api/chat/runs/{run_id}/approvals/call_mail"
                assert (await on_b.post(url, json={"approved": True})).status_code == 200
                assert (await on_a.post(url, json={"approved": True})).status_code == 409
                result = json.loads((await events.until("tool_result")).data)
                await events.until("done")
            assert result["isError"] is False
            assert ran(ran_log) == [{"tool": "send_email", **EMAIL}]


async def test_an_mcp_tool_that_is_not_read_only_asks_first(
    settings: Settings, tmp_path: Path
) -> None:
    config = tmp_path / "mcp.json"
    server = {"command": sys.executable, "args": [str(MCP_TEST_SERVER)]}
    never = {**server, "approval": "never"}
    config.write_text(json.dumps({"mcpServers": {"test": server, "trusted": never}}))
    served = settings.with_(model="scripted", mcp_config=str(config), tools=())
    with live_server(served) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
            tools = {
                t["name"]: t["approval"] for t in (await http.get("/api/tools")).json()["tools"]
            }
            assert tools["test__write_note"] is True  # no readOnlyHint: the default asks
            assert tools["test__echo"] is False  # readOnlyHint
            assert tools["trusted__write_note"] is False  # "approval": "never"
            message = 'call test__write_note {"text": "hi"}'
            async with reading(http, message=message) as events:
                asked = json.loads((await events.until("approval_required")).data)
                assert asked["tool"] == "test__write_note"
                run_id = run_of(events.frames[-1])
                await http.post(
                    f"/api/chat/runs/{run_id}/approvals/{asked['id']}", json={"approved": True}
                )
                result = json.loads((await events.until("tool_result")).data)
                await events.until("done")
            assert result["result"] == "noted: hi"
            trusted = await stream(
                http,
                "GET",
                "/api/chat/stream",
                params={"message": 'call trusted__write_note {"text": "ok"}'},
            )
            assert "approval_required" not in trusted.types
            assert trusted.of("tool_result")[0]["result"] == "noted: ok"


# -- the Python client -------------------------------------------------------------------


async def test_the_python_client_sees_a_typed_request_and_answers_it(
    settings: Settings, upstream: FakeOpenAI, ran_log: Path
) -> None:
    upstream.enqueue(email_call(), Completion(text=["Sent."]))
    upstream.enqueue(email_call("call_two"), Completion(text=["Not", " sent."]))
    async with serve(settings) as live, AsyncClient(live.url) as client:
        seen: list[Event] = []
        async with client.stream("mail Kim", session_id="s-client") as events:
            async for event in events:
                seen.append(event)
                if isinstance(event, ApprovalRequired):
                    assert (event.id, event.tool, event.args) == ("call_mail", "send_email", EMAIL)
                    assert events.run_id is not None
                    answer = await client.approve(events.run_id, event.id)
                    assert answer == Approval(events.run_id, "call_mail", True, "running")
        assert [e.type for e in seen][:3] == ["tool_call", "approval_required", "tool_progress"]
        assert isinstance(seen[-1], Done)
        # chat() puts each request to the approver; (False, reason) declines.
        asked: list[ApprovalRequired] = []

        def approver(request: ApprovalRequired) -> tuple[bool, str]:
            asked.append(request)
            return False, "not now"

        result = await client.chat("mail Kim again", session_id="s-client", approver=approver)
        assert [r.id for r in asked] == ["call_two"]
        assert result.text == "Not sent."
        assert result.tool_results[0].is_error
        assert "not now" in result.tool_results[0].result
        with pytest.raises(ClientError) as refused:
            await client.approve(result.run_id, "call_two")
        assert (refused.value.status, refused.value.code) == (409, "APPROVAL_ANSWERED")
    assert ran(ran_log) == [{"tool": "send_email", **EMAIL}]


def test_the_blocking_client_answers_too(
    settings: Settings, upstream: FakeOpenAI, ran_log: Path
) -> None:
    upstream.enqueue(email_call(), Completion(text=["Sent."]))
    settings = settings.with_(model="openai:fake-model")
    app = create_app(settings, tools=approval_tools.tools)
    with live_server(settings, lambda s: app) as live, Client(live.url) as client:
        result = client.chat("mail Kim", approver=lambda request: request.tool == "send_email")
        assert result.text == "Sent."
        assert result.tool_results[0].result == "Sent 'Hello' to kim@example.com."
    assert ran(ran_log) == [{"tool": "send_email", **EMAIL}]


async def test_a_call_stopped_while_waiting_leaves_a_history_anthropic_takes(
    settings: Settings, ran_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Anthropic refuses a history in which a tool_use has no tool_result right after it.
    with FakeAnthropic() as fake:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.url)
        fake.enqueue(
            AnthropicMessage(tool_uses=[ToolUse("send_email", EMAIL, id="toolu_mail")]),
            AnthropicMessage(text=["Fine."]),
        )
        served = settings.with_(model="anthropic:fake-model")
        app = create_app(served, tools=approval_tools.tools)
        async with httpx.AsyncClient(timeout=30) as http:
            with live_server(served, lambda s: app) as live:
                http.base_url = httpx.URL(live.url)
                async with reading(http, message="mail Kim", sessionId="s-claude") as events:
                    run_id = run_of(await events.until("approval_required"))
                    await http.post(f"/api/chat/runs/{run_id}/cancel")
                    await events.until("error")
                again = await stream(
                    http,
                    "GET",
                    "/api/chat/stream",
                    params={"message": "ok", "sessionId": "s-claude"},
                )
                assert again.types[-1] == "done"
        sent = fake.requests[-1].body["messages"]
        uses = [
            b
            for m in sent
            if m["role"] == "assistant"
            for b in m["content"]
            if b.get("type") == "tool_use"
        ]
        results = [
            b
            for m in sent
            if m["role"] == "user" and isinstance(m["content"], list)
            for b in m["content"]
            if b.get("type") == "tool_result"
        ]
        assert [u["id"] for u in uses] == [r["tool_use_id"] for r in results] == ["toolu_mail"]
        assert results[0]["is_error"] is True
        assert ran(ran_log) == []
