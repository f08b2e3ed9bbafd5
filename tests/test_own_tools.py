"""A team's own agent: their Python tools by reference, their prompt, chatstream in their app."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from collections.abc import AsyncGenerator, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

import chatstream
from chatstream.config import Settings
from chatstream.messages import Message
from chatstream.models.base import ModelEvent, TextDelta, ToolSpec
from chatstream.tools import ToolContext, tool
from tests.support.process import server_process
from tests.support.server import live_server
from tests.support.sse import stream

MYAPP = '''
import asyncio
from chatstream.tools import ToolContext, ToolRegistry, tool


@tool
async def shout(ctx: ToolContext, text: str, times: int = 1) -> str:
    """Say it louder.

    Args:
        text: What to shout.
        times: How often.
    """
    for i in range(times):
        ctx.progress(f"shouting {i + 1} of {times}", (i + 1) / times)
        await asyncio.sleep(0.01)
    return " ".join([text.upper()] * times)


@tool(name="send-email", description="Send an email.", approval=True)
async def send_email(ctx: ToolContext, to: str, body: str) -> str:
    return f"sent to {to}"


registry = ToolRegistry([shout, send_email])
just_one = shout
not_tools = "shout"
twice = [shout, shout]
'''


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Path]:
    """A directory holding a package ``myapp`` with a tools module, as a team's project would."""
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "myapp" / "tools.py").write_text(textwrap.dedent(MYAPP))
    yield tmp_path


def serve(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``chatstream serve`` run in the project, for the start-ups that must fail."""
    return subprocess.run(
        [sys.executable, "-m", "chatstream", "serve", "--model", "scripted", *args],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_serve_offers_builtin_and_your_own_tools_and_streams_their_progress(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(project)
    args = ("--model", "scripted", "--tools", "builtin,myapp.tools:registry")
    with server_process(*args, env={"CHATSTREAM_STORE": "sqlite:///:memory:"}) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            listed = (await http.get("/api/tools")).json()
            by_name = {t["name"]: t for t in listed["tools"]}
            assert list(by_name) == [
                "get_weather",
                "convert_temperature",
                "calculate",
                "get_current_time",
                "shout",
                "send-email",
            ]
            assert by_name["calculate"]["source"] == "builtin"
            assert by_name["shout"]["source"] == "python"
            assert by_name["shout"]["description"] == "Say it louder."
            assert by_name["shout"]["parameters"]["properties"]["times"]["description"] == (
                "How often."
            )
            assert by_name["send-email"]["approval"] is True
            assert by_name["shout"]["approval"] is False

            message = 'call shout {"text": "hi", "times": 3}'
            result = await stream(http, "GET", "/api/chat/stream", params={"message": message})
    assert result.types == [
        "tool_call",
        "tool_progress",
        "tool_progress",
        "tool_progress",
        "tool_result",
        *["token"] * (len(result.types) - 6),
        "done",
    ]
    assert result.of("tool_call")[0]["args"] == {"text": "hi", "times": 3}
    assert [p["progress"] for p in result.of("tool_progress")] == pytest.approx([1 / 3, 2 / 3, 1])
    assert result.of("tool_result")[0] == {
        "id": result.of("tool_call")[0]["id"],
        "tool": "shout",
        "result": "HI HI HI",
        "isError": False,
    }


@pytest.mark.parametrize(
    ("tools", "says"),
    [
        (
            "nosuch.module:tools",
            "--tools nosuch.module:tools: cannot import module 'nosuch.module'",
        ),
        ("myapp.tools:missing", "module 'myapp.tools' has no attribute 'missing'"),
        ("myapp.tools:not_tools", "is a str, not a Tool, a ToolRegistry"),
        ("myapp.tools", "use 'builtin' or '<module>:<attribute>'"),
        ("myapp.tools:twice", "a tool named 'shout' is already offered"),
        ("myapp.tools:just_one,myapp.tools:registry", "a tool named 'shout' is already offered"),
    ],
)
def test_a_bad_tool_reference_stops_start_up_with_exit_code_2(
    project: Path, tools: str, says: str
) -> None:
    done = serve(project, "--tools", tools)
    assert done.returncode == 2, done.stderr
    # The message as a person reads it, without the frame rich draws around it.
    assert says in " ".join(re.sub("[│╭╮╰╯─]", " ", done.stderr).split()), done.stderr


def test_a_missing_system_prompt_file_stops_start_up(project: Path) -> None:
    done = serve(project, "--system-prompt", "@nowhere.txt")
    assert done.returncode == 2
    assert "nowhere.txt" in done.stderr


class Recording:
    """A model double that answers with the system prompt it was given."""

    name = "recording"

    async def warm_up(self, tools: Sequence[ToolSpec], *, system_prompt: str = "") -> None:
        """Nothing to load."""

    async def aclose(self) -> None:
        """Nothing to release."""

    async def stream(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec]
    ) -> AsyncGenerator[ModelEvent, None]:
        yield TextDelta(f"{messages[0].role}: {messages[0].content} | tools: ")
        yield TextDelta(",".join(t.name for t in tools))


async def test_the_system_prompt_is_yours_from_text_or_a_file(
    settings: Settings, tmp_path: Path
) -> None:
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("You are Ahoy, a pirate.\n", encoding="utf-8")
    for value, expected in (
        ("Be brief.", "Be brief."),
        (f"@{prompt_file}", "You are Ahoy, a pirate."),
    ):
        configured = settings.with_(system_prompt=value, tools=())
        with live_server(configured, lambda s: chatstream.create_app(s, model=Recording())) as live:
            async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
                answer = (await http.post("/api/chat", json={"message": "who are you?"})).json()
        assert answer["message"] == f"system: {expected} | tools: "


@tool
async def lookup(ctx: ToolContext[dict[str, str]], key: str) -> str:
    """Look a key up in the application's own data."""
    return ctx.deps[key]


async def test_chatstream_mounted_in_your_fastapi_app_serves_your_agent(
    settings: Settings,
) -> None:
    def host_app(configured: Settings) -> FastAPI:
        chat = chatstream.create_app(
            configured,
            tools=[lookup],
            system_prompt="You know the shop's data.",
            deps={"opening": "9 to 5"},
        )

        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncGenerator[dict[str, object], None]:
            # A mounted app's lifespan does not run by itself: the host runs it, and its
            # state reaches every request, the mounted app's too.
            async with chat.router.lifespan_context(chat) as state:
                yield dict(state or {})

        host = FastAPI(lifespan=lifespan)

        @host.get("/")
        async def home() -> dict[str, str]:
            return {"app": "the shop"}

        host.mount("/chat", chat)
        return host

    with live_server(settings, host_app) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
            assert (await http.get("/")).json() == {"app": "the shop"}
            tools = (await http.get("/chat/api/tools")).json()
            assert [t["name"] for t in tools["tools"]] == ["lookup"]
            message = 'call lookup {"key": "opening"}'
            result = await stream(http, "GET", "/chat/api/chat/stream", params={"message": message})
    assert result.of("tool_result")[0]["result"] == "9 to 5"
    assert result.types[-1] == "done"
