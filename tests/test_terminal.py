"""``chatstream chat`` as a person uses it: through a pipe, and in a pseudo-terminal."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import socket
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from chatstream.config import Settings
from chatstream.server.app import create_app
from tests.support import approval_tools
from tests.support.approval_tools import ran
from tests.support.server import LiveServer, free_port, live_server

HELLO = "Hello! I am the scripted model. Ask me about the weather, the time or some arithmetic."
UNREACHABLE = "the weather service is unreachable"
SPINNER_FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"  # rich's "dots"
# CSI and OSC sequences, and readline's prompt markers: what a screen shows, as text.
ANSI = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()][A-Z0-9]|[\x01\x02]"
)

MCP_TEST_SERVER = Path(__file__).parent / "support" / "mcp_server.py"

# send_email needs a person's yes; each call that runs is logged to APPROVAL_TOOLS_LOG.
SEND_EMAIL = 'call send_email {"to": "kim@example.com", "subject": "Hi"}'
EMAIL_CALL = 'send_email(to="kim@example.com", subject="Hi")'
SENT = "Sent 'Hi' to kim@example.com."


def chat_command(url: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "chatstream", "chat", "--url", url, *args]


def chat_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATSTREAM_", "COLUMNS"))}
    env.update(PYTHONIOENCODING="utf-8", TERM="xterm-256color")
    env.pop("NO_COLOR", None)
    return env


def piped(url: str, stdin: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        chat_command(url, *args),
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=60,
        env=chat_env(),
    )


@pytest.fixture
def mcp_server(settings: Settings, tmp_path: Path) -> Iterator[LiveServer]:
    """A server offering the test MCP server's tools (over stdio) as ``test__<tool>``."""
    config = {"mcpServers": {"test": {"command": sys.executable, "args": [str(MCP_TEST_SERVER)]}}}
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    with live_server(settings.with_(mcp_config=str(path))) as live:
        health = httpx.get(f"{live.url}/api/health", timeout=10).json()
        assert health["mcp"]["test"]["status"] == "ready", health
        yield live


# -- in a pipe ------------------------------------------------------------------


def test_piped_input_prints_the_answer_and_the_history_as_plain_text(server: LiveServer) -> None:
    done = piped(server.url, "hello\n/history\n/exit\n", "--session", "pipe-1")
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        f"{HELLO}\nsession pipe-1 · 2 messages\nyou: hello\nassistant: {HELLO}\n"
    )


def test_echo_into_the_chat_prints_tool_progress_and_one_result_line(server: LiveServer) -> None:
    """``echo "..." | chatstream chat``: the end of input ends the chat."""
    done = piped(server.url, "What's the weather in Seoul?\n")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "\x1b" not in done.stdout
    assert lines[0] == "  · get_weather: Finding Seoul… 10%"
    result = next(line for line in lines if line.startswith("✗"))
    assert result.startswith(f'✗ get_weather(location="Seoul") → {UNREACHABLE}')
    assert lines[-1].startswith("Here is what I found: get_weather failed:")
    assert len([line for line in lines if "get_weather(" in line]) == 1  # folded into one line


def test_piped_chat_prints_an_mcp_tools_progress_before_its_result(
    mcp_server: LiveServer,
) -> None:
    done = piped(mcp_server.url, 'call test__count {"steps": 3, "delay": 0.1}\n')
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "  · test__count: counted 1 33%",
        "  · test__count: counted 2 67%",
        "  · test__count: counted 3 100%",
        "✓ test__count(steps=3, delay=0.1) → counted to 3",
        "Here is what I found: counted to 3",
    ]


def test_the_readmes_arithmetic_example_calls_the_calculator(server: LiveServer) -> None:
    """``echo "what is 2**10?" | chatstream chat``, as the README shows it."""
    done = piped(server.url, "what is 2**10?\n")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith('✓ calculate(expression="2**10") → 1024') for line in lines)
    assert lines[-1].endswith("1024")


def test_piped_chat_exits_1_when_a_turn_fails_or_the_server_is_down(server: LiveServer) -> None:
    failed = piped(server.url, "simulate a model error\ncount to 3\n/new\n/history\n")
    assert failed.returncode == 1
    assert failed.stdout.splitlines() == [
        "Starting to answer",
        "✗ error MODEL_ERROR: scripted model failure (as requested by the prompt)",
        "1 2 3",
        "(new session)",
        "(no messages yet)",
    ]
    down = piped(f"http://127.0.0.1:{free_port()}", "hello\n")
    assert down.returncode == 1 and down.stdout == ""
    assert "cannot use the server" in down.stderr


# -- in a terminal ----------------------------------------------------------------


class Terminal:
    """A child process on a pseudo-terminal: type into it, wait for what it shows."""

    def __init__(self, master: int, process: subprocess.Popen[bytes]) -> None:
        self.master = master
        self.process = process
        self.raw = b""
        self.seen = 0  # where the next expect() starts looking, in the screen text

    @property
    def screen(self) -> str:
        return ANSI.sub("", self.raw.decode(errors="replace")).replace("\r", "")

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def expect(self, text: str, timeout: float = 15.0) -> str:
        """Wait until ``text`` is shown after the last match; return what came before it."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen
            found = screen.find(text, self.seen)
            if found >= 0:
                before = screen[self.seen : found]
                self.seen = found + len(text)
                return before
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{text!r} not shown; the screen ends with:\n{screen[-2000:]}")
            ready, _, _ = select.select([self.master], [], [], min(left, 0.2))
            if ready:
                try:
                    self.raw += os.read(self.master, 65536)
                except OSError:  # the child closed the terminal
                    if self.process.poll() is not None:
                        raise AssertionError(
                            f"{text!r} not shown before exit; screen:\n{screen[-2000:]}"
                        ) from None

    def wait(self, timeout: float = 15.0) -> int:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    self.raw += os.read(self.master, 65536)
                except OSError:
                    pass
        return self.process.wait(timeout=1)


def _take_the_terminal() -> None:
    # In the child: make the pty its controlling terminal, so Ctrl-C sends SIGINT.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@contextmanager
def terminal(command: list[str]) -> Iterator[Terminal]:
    master, slave = os.openpty()
    termios.tcsetwinsize(slave, (40, 120))
    try:
        process = subprocess.Popen(
            command,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=chat_env(),
            start_new_session=True,
            preexec_fn=_take_the_terminal,
        )
    except BaseException:
        os.close(master)
        os.close(slave)
        raise
    os.close(slave)
    term = Terminal(master, process)
    try:
        yield term
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        os.close(master)


@pytest.fixture
def silent_service() -> Iterator[str]:
    """A URL whose server accepts connections and never answers: a weather call hangs."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1/search"


@pytest.fixture
def slow_server(settings: Settings, silent_service: str) -> Iterator[LiveServer]:
    """Tokens 20 ms apart; the weather lookup hangs until it times out after 0.8 s."""
    slow = settings.with_(
        model="scripted:20", tool_timeout_s=2.0, weather_geocoding_url=silent_service
    )
    with live_server(slow) as live:
        yield live


def test_in_a_terminal_ctrl_c_stops_the_answer_and_the_chat_goes_on(
    slow_server: LiveServer,
) -> None:
    with terminal(chat_command(slow_server.url, "--session", "pty-1")) as term:
        banner = term.expect("you > ")
        assert "model scripted" in banner and "/history" in banner
        term.send("count to 200\r")
        term.expect("1 2 3 4 5 6 ")
        term.send("\x03")  # Ctrl-C, as typed
        term.expect("⏹ stopped")
        term.expect("you > ")
        assert term.process.poll() is None  # still chatting
        answer = httpx.get(f"{slow_server.url}/api/chat/sessions/pty-1").json()["messages"][-1]
        assert answer["role"] == "assistant" and answer["interrupted"] is True
        assert answer["content"].startswith("1 2 3 4 5 6 ")
        assert not answer["content"].endswith("200")

        term.send("What's the weather in Seoul?\r")
        # While the tool runs: a spinner line with its progress message...
        spinning = term.expect('get_weather(location="Seoul") · Finding Seoul…')
        assert spinning.rstrip()[-1] in SPINNER_FRAMES
        # ...then one line with its result, and the answer.
        term.expect('✗ get_weather(location="Seoul") → the weather service timed out')
        term.expect("Here is what I found")
        term.expect("you > ")
        term.send("/exit\r")
        assert term.wait() == 0
    assert "\x1b[" in term.raw.decode(errors="replace")  # a terminal gets colour


def test_in_a_terminal_an_mcp_tool_shows_live_progress_then_its_result(
    mcp_server: LiveServer,
) -> None:
    with terminal(chat_command(mcp_server.url)) as term:
        term.expect("you > ")
        term.send('call test__count {"steps": 4, "delay": 0.6}\r')
        # While the call runs: its spinner line with the server's message and progress/total…
        call = "test__count(steps=4, delay=0.6)"
        spinning = term.expect(f"{call} · counted 1 25%")
        assert spinning.rstrip()[-1] in SPINNER_FRAMES
        term.expect(f"{call} · counted 2 50%")
        term.expect(f"{call} · counted 3 75%")
        # …then one line with its result, and the answer.
        term.expect(f"✓ {call} → counted to 4")
        term.expect("Here is what I found: counted to 4")
        term.expect("you > ")
        term.send("/exit\r")
        assert term.wait() == 0


# -- tool calls that need approval ------------------------------------------------


@pytest.fixture
def approval_server(settings: Settings, ran_log: Path) -> Iterator[LiveServer]:
    """A server whose tools include send_email, which needs approval."""
    with live_server(settings, lambda s: create_app(s, tools=approval_tools.tools)) as live:
        yield live


def test_in_a_terminal_y_runs_a_call_that_needs_approval(
    approval_server: LiveServer, ran_log: Path
) -> None:
    with terminal(chat_command(approval_server.url)) as term:
        term.expect("you > ")
        term.send(SEND_EMAIL + "\r")
        term.expect(f"Run {EMAIL_CALL}? [y/N] ")
        assert ran(ran_log) == []  # it waits for the answer
        term.send("y\r")
        term.expect(f"✓ {EMAIL_CALL} → {SENT}")
        term.expect(f"Here is what I found: {SENT}")
        term.expect("you > ")
        assert ran(ran_log) == [{"tool": "send_email", "to": "kim@example.com", "subject": "Hi"}]
        term.send("/exit\r")
        assert term.wait() == 0


def test_in_a_terminal_n_declines_with_the_reason_typed_after_it(
    approval_server: LiveServer, ran_log: Path
) -> None:
    with terminal(chat_command(approval_server.url)) as term:
        term.expect("you > ")
        term.send(SEND_EMAIL + "\r")
        term.expect(f"Run {EMAIL_CALL}? [y/N] ")
        term.send("n wrong address\r")
        declined = "The user declined to run send_email. Their reason: wrong address"
        term.expect(f"✗ {EMAIL_CALL} → {declined}")
        term.expect(f"Here is what I found: send_email failed: {declined}")
        # The chat goes on: the next message is a message, and the call never ran.
        term.expect("you > ")
        term.send("count to 3\r")
        term.expect("1 2 3")
        term.expect("you > ")
        term.send("/exit\r")
        assert term.wait() == 0
    assert ran(ran_log) == []


def test_piped_chat_declines_a_call_that_needs_approval_and_reads_on(
    approval_server: LiveServer, ran_log: Path
) -> None:
    # The line after the call is the next message, never taken as an answer.
    done = piped(approval_server.url, f"{SEND_EMAIL}\ncount to 3\n")
    assert done.returncode == 0, done.stderr
    declined = "The user declined to run send_email. Their reason: no terminal to ask"
    assert done.stdout.splitlines() == [
        f"? {EMAIL_CALL}: declined, no terminal to ask (--yes approves)",
        f"✗ {EMAIL_CALL} → {declined}",
        f"Here is what I found: send_email failed: {declined}",
        "1 2 3",
    ]
    assert ran(ran_log) == []


def test_piped_chat_with_yes_approves_without_asking(
    approval_server: LiveServer, ran_log: Path
) -> None:
    done = piped(approval_server.url, f"{SEND_EMAIL}\n", "--yes")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"? {EMAIL_CALL}: approved (--yes)",
        "  · send_email: sending 50%",
        f"✓ {EMAIL_CALL} → {SENT}",
        f"Here is what I found: {SENT}",
    ]
    assert ran(ran_log) == [{"tool": "send_email", "to": "kim@example.com", "subject": "Hi"}]
