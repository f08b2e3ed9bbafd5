"""The terminal chat behind ``chatstream chat``.

Tokens are printed as they arrive. Each running tool, built-in or an MCP
server's, gets a spinner line with its latest progress message and, when the
tool gives one, how far along it is (``42%``), folded into one ✓/✗ line with
its result when the tool finishes. When stdout is not a terminal the same
things come out as plain lines, with no colour and no spinners, so
``echo hello | chatstream chat`` prints the answer.

Lines read from stdin are messages, except ``/new`` (start a new session),
``/history`` (this session so far) and ``/exit``. Ctrl-C while an answer is
being written stops the run on the server (the cancel endpoint) and returns to
the prompt; Ctrl-C or the end of input at the prompt leaves.

A tool call that needs approval is asked about: ``Run send_email(to=…)? [y/N]``.
``y`` (or ``yes``) runs it; anything else declines it, and what follows ``n`` is
the reason the model is told (``n wrong address``). Piped input is never read as
an answer, since it holds the next messages: such a call is declined ("no terminal
to ask"), unless ``--yes`` approves every call without asking.

Exit status: 0; 1 when the server cannot be reached, or when input is not a
terminal and a turn failed (so scripts notice); 130 after Ctrl-C at the prompt.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any, Protocol, TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.spinner import Spinner
from rich.text import Text

from chatstream.client import ChatStream, Client, ClientError, ClientException, ConnectionFailed
from chatstream.errors import ErrorCode
from chatstream.events import (
    ApprovalRequired,
    Done,
    Error,
    Event,
    Token,
    ToolCall,
    ToolProgress,
    ToolResult,
)

COMMANDS = "/new, /history, /exit"
# Model and tool text must not drive the terminal: drop C0 controls but tab and
# newline, DEL, and C1 controls (ESC sequences, bells, cursor moves).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean(text: str) -> str:
    """``text`` without the control characters that could drive a terminal."""
    return _CONTROL.sub("", text)


def describe_call(tool: str, args: dict[str, Any], *, limit: int = 60) -> str:
    """``get_weather(location="Seoul")``, shortened to about ``limit`` characters."""
    shown = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in args.items())
    if len(shown) > limit:
        shown = shown[: limit - 1] + "…"
    return clean(f"{tool}({shown})")


def one_line(text: str, *, limit: int = 160) -> str:
    """``text`` on one line, shortened to ``limit`` characters."""
    flat = " ".join(clean(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


class Renderer(Protocol):
    """How one turn's events are shown."""

    def begin(self) -> None:
        """The message was sent; nothing has come back yet."""

    def event(self, event: Event) -> None:
        """Show one event."""

    def notice(self, text: str, *, error: bool = False) -> None:
        """A line of the chat's own (stopped, refused, history…)."""

    def answered(self, call_id: str, *, approved: bool) -> None:
        """A call that waited for approval was answered; the turn goes on."""

    def end(self) -> None:
        """The turn is over, however it ended: leave the cursor at a line start."""


class PlainRenderer:
    """Plain lines for a pipe or a file: no colour, no cursor movement."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.calls: dict[str, str] = {}
        self.mid_line = False

    def begin(self) -> None:
        self.calls.clear()

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()
            self.mid_line = not text.endswith("\n")

    def _line(self, text: str) -> None:
        self._write(("\n" if self.mid_line else "") + text + "\n")

    def event(self, event: Event) -> None:
        if isinstance(event, Token):
            self._write(clean(event.content))
        elif isinstance(event, ToolCall):
            self.calls[event.id] = describe_call(event.tool, event.args)
        elif isinstance(event, ApprovalRequired):
            self.end()  # the question, or what was decided, goes on a line of its own
        elif isinstance(event, ToolProgress):
            # The fraction as the terminal's spinner line shows it: an MCP server's
            # progress/total, or a built-in's own estimate.
            done = "" if event.progress is None else f" {event.progress:.0%}"
            self._line(f"  · {event.tool}: {one_line(event.message)}{done}")
        elif isinstance(event, ToolResult):
            mark = "✗" if event.is_error else "✓"
            call = self.calls.pop(event.id, event.tool)
            self._line(f"{mark} {call} → {one_line(event.result)}")
        elif isinstance(event, Error):
            self._line(f"✗ error {event.code}: {one_line(event.message)}")
        elif isinstance(event, Done):
            self.end()

    def notice(self, text: str, *, error: bool = False) -> None:
        self._line(text)

    def answered(self, call_id: str, *, approved: bool) -> None:
        """Nothing to redraw: the result line follows."""

    def end(self) -> None:
        if self.mid_line:
            self._write("\n")


class _ToolLine:
    __slots__ = ("call", "message", "progress", "spinner")

    def __init__(self, call: str) -> None:
        self.call = call
        self.message = "starting"
        self.progress: float | None = None
        self.spinner = Spinner("dots", style="cyan")


class LiveRenderer:
    """A terminal: tokens as they come, a live spinner line per running tool."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live: Live | None = None
        self.tools: dict[str, _ToolLine] = {}
        self.waiting = Spinner("dots", text=Text("thinking…", style="dim"), style="dim")
        self.mid_line = False

    def begin(self) -> None:
        self.tools.clear()
        self._show()

    def _render(self) -> RenderableType:
        if not self.tools:
            return self.waiting
        rows: list[RenderableType] = []
        for line in self.tools.values():
            text = Text.assemble((line.call, "bold"), " · ", (one_line(line.message), "dim"))
            if line.progress is not None:
                text.append(f" {line.progress:.0%}", style="dim")
            text.no_wrap, text.overflow = True, "ellipsis"
            line.spinner.update(text=text)
            rows.append(line.spinner)
        return Group(*rows)

    def _show(self) -> None:
        if self.mid_line:
            self.console.out("")
            self.mid_line = False
        if self.live is None:
            self.live = Live(
                self._render(),
                console=self.console,
                transient=True,
                refresh_per_second=12,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self.live.start()
        else:
            self.live.update(self._render())

    def _hide(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

    def _print(self, text: Text) -> None:
        """A whole line above the live region (or plainly when there is none)."""
        if self.mid_line:
            self.console.out("")
            self.mid_line = False
        self.console.print(text)

    def event(self, event: Event) -> None:
        if isinstance(event, Token):
            self._hide()
            content = clean(event.content)
            if content:
                self.console.out(content, end="", highlight=False)
                self.mid_line = not content.endswith("\n")
        elif isinstance(event, ToolCall):
            self.tools[event.id] = _ToolLine(describe_call(event.tool, event.args))
            self._show()
        elif isinstance(event, ApprovalRequired):
            line = self.tools.get(event.id)
            if line is not None:
                line.message = "waiting for your answer"
            # The question is asked on a line of its own, with no spinner redrawing it.
            self.end()
        elif isinstance(event, ToolProgress):
            line = self.tools.get(event.id)
            if line is not None:
                line.message, line.progress = event.message, event.progress
                self._show()
        elif isinstance(event, ToolResult):
            line = self.tools.pop(event.id, None)
            mark = Text("✗ ", style="bold red") if event.is_error else Text("✓ ", style="green")
            folded = Text.assemble(
                mark,
                (line.call if line else event.tool, "bold"),
                " → ",
                (one_line(event.result), "red" if event.is_error else ""),
            )
            folded.no_wrap, folded.overflow = True, "ellipsis"
            self._print(folded)
            self._show()  # the model works on while no tool runs: "thinking…"
        elif isinstance(event, Error):
            self._hide()
            self._print(Text(f"✗ {event.code}: {one_line(event.message)}", style="bold red"))
        elif isinstance(event, Done):
            self.end()

    def notice(self, text: str, *, error: bool = False) -> None:
        self._hide()
        self._print(Text(text, style="bold red" if error else "dim"))

    def answered(self, call_id: str, *, approved: bool) -> None:
        line = self.tools.get(call_id)
        if line is not None:
            line.message = "approved, starting" if approved else "declined"
        self._show()

    def end(self) -> None:
        self._hide()
        if self.mid_line:
            self.console.out("")
            self.mid_line = False


# A piped chat's answer when it may not approve by itself: its stdin holds messages.
NO_TERMINAL = "no terminal to ask"


class Chat:
    """One terminal chat: reads lines, runs turns, keeps the session id."""

    def __init__(
        self,
        client: Client,
        *,
        session_id: str | None,
        enable_tools: bool,
        console: Console,
        renderer: Renderer,
        prompt: str | None,
        approve_all: bool = False,
    ) -> None:
        self.client = client
        self.session_id = session_id
        self.enable_tools = enable_tools
        self.console = console
        self.renderer = renderer
        self.prompt = prompt
        self.approve_all = approve_all
        self.failed = False

    def read(self, prompt: str | None = None) -> str:
        """The next line of input; EOFError at its end, KeyboardInterrupt on Ctrl-C."""
        prompt = prompt or self.prompt
        if prompt is None:
            return input()
        if self.console.is_terminal:
            return self.console.input(prompt)
        return input(Text.from_markup(prompt).plain)

    def loop(self) -> int:
        while True:
            try:
                line = self.read().strip()
            except EOFError:
                self.renderer.end()
                break
            except KeyboardInterrupt:
                self.renderer.notice("")
                return 130
            if not line:
                continue
            if line.startswith("/"):
                if line in ("/exit", "/quit"):
                    break
                self.command(line)
                continue
            self.turn(line)
        return 1 if self.failed and self.prompt is None else 0

    def command(self, line: str) -> None:
        if line == "/new":
            self.session_id = None
            self.renderer.notice("(new session)")
        elif line == "/history":
            self.history()
        else:
            self.renderer.notice(f"Unknown command {line}. Commands: {COMMANDS}.", error=True)

    def turn(self, message: str) -> None:
        stream = self.client.stream(
            message, session_id=self.session_id, enable_tools=self.enable_tools
        )
        self.renderer.begin()
        try:
            for event in stream:
                self.renderer.event(event)
                if isinstance(event, Error):
                    self.failed = True
                elif isinstance(event, ApprovalRequired) and stream.run_id is not None:
                    # The stream waits meanwhile (the server keeps it alive with heartbeats).
                    self.approve(stream.run_id, event)
        except KeyboardInterrupt:
            stream.close()
            self.renderer.end()
            self.stop(stream)
        except ClientError as exc:
            self.failed = True
            self.renderer.notice(f"✗ refused: {exc.code}: {exc.message}", error=True)
        except ClientException as exc:
            self.failed = True
            self.renderer.notice(f"✗ {exc}", error=True)
        finally:
            self.renderer.end()
            if stream.session_id is not None:
                self.session_id = stream.session_id

    def approve(self, run_id: str, event: ApprovalRequired) -> None:
        """Ask whether the call may run (or decide as the options say), and answer it."""
        call = describe_call(event.tool, event.args)
        reason: str | None = None
        if self.approve_all:
            approved = True
            self.renderer.notice(f"? {call}: approved (--yes)")
        elif self.prompt is None:
            approved, reason = False, NO_TERMINAL
            self.renderer.notice(f"? {call}: declined, {NO_TERMINAL} (--yes approves)")
        else:
            try:
                # Escaped: the call's arguments are the model's text, not rich markup.
                reply = self.read(f"[bold yellow]Run {escape(call)}?[/] {escape('[y/N]')} ").strip()
            except EOFError:
                reply = ""
            word, _, rest = reply.partition(" ")
            approved = word.lower() in ("y", "yes")
            if not approved and word.lower() in ("n", "no"):
                reason = rest.strip() or None
        try:
            self.client.approve(run_id, event.id, approved=approved, reason=reason)
        except ClientError as exc:
            # Answered elsewhere meanwhile (the web page), or expired: the stream says how.
            self.renderer.notice(f"✗ answer not taken: {exc.code}: {exc.message}", error=True)
            return
        except ClientException as exc:
            self.renderer.notice(f"✗ answer not sent: {exc}", error=True)
            return
        self.renderer.answered(event.id, approved=approved)

    def stop(self, stream: ChatStream) -> None:
        """Ctrl-C during an answer: cancel the run on the server, keep the chat going."""
        try:
            run_id = stream.run_id
            if run_id is None and stream.session_id is not None:
                # Interrupted before the server answered: find the run through the session.
                run_id = self.client.session(stream.session_id).get("activeRunId")
            if run_id is not None:
                self.client.cancel(run_id)
            self.renderer.notice("⏹ stopped")
        except KeyboardInterrupt:
            self.renderer.notice("⏹ stopped here; the server may finish the answer")
        except ClientException as exc:
            self.renderer.notice(f"⏹ stopped here; cancelling on the server failed: {exc}")

    def history(self) -> None:
        if self.session_id is None:
            self.renderer.notice("(no messages yet)")
            return
        try:
            session = self.client.session(self.session_id)
        except ClientError as exc:
            if exc.code == ErrorCode.SESSION_NOT_FOUND:
                self.renderer.notice("(no messages yet)")
            else:
                self.renderer.notice(f"✗ {exc.code}: {exc.message}", error=True)
            return
        except ClientException as exc:
            self.renderer.notice(f"✗ {exc}", error=True)
            return
        out = [f"session {session['sessionId']} · {session['messageCount']} messages"]
        for message in session["messages"]:
            out.extend(_history_lines(message))
        for line in out:
            self.renderer.notice(line)


def _history_lines(message: dict[str, Any]) -> list[str]:
    role, content = message.get("role"), clean(message.get("content") or "")
    if role == "user":
        return [f"you: {content}"]
    if role == "tool":
        mark = "✗" if message.get("isError") else "✓"
        return [f"  {mark} {message.get('tool', 'tool')} → {one_line(content)}"]
    calls = message.get("toolCalls") or []
    lines = [f"  → {describe_call(str(c.get('tool')), c.get('args') or {})}" for c in calls]
    if content or not lines:
        suffix = " [interrupted]" if message.get("interrupted") else ""
        lines.insert(0, f"assistant: {content}{suffix}")
    return lines


def run_chat(
    url: str,
    *,
    session_id: str | None = None,
    enable_tools: bool = True,
    api_key: str | None = None,
    approve_all: bool = False,
) -> int:
    """Chat with the server at ``url`` until /exit, the end of input, or Ctrl-C at the prompt.

    ``approve_all`` approves every tool call that asks, without asking.
    """
    console = Console(highlight=False)
    rich = console.is_terminal and not console.is_dumb_terminal
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    renderer: Renderer = LiveRenderer(console) if rich else PlainRenderer(sys.stdout)
    with Client(url, api_key=api_key) as client:
        try:
            health = client.health()
        except (ClientError, ConnectionFailed) as exc:
            print(f"chatstream chat: cannot use the server at {url}: {exc}", file=sys.stderr)
            return 1
        if interactive:
            session = f"session {session_id}" if session_id else "a new session"
            version, model = health.get("version", ""), health.get("model", "?")
            renderer.notice(f"chatstream {version} · {url} · model {model} · {session}")
            renderer.notice(f"{COMMANDS}; Ctrl-C stops an answer")
        chat = Chat(
            client,
            session_id=session_id,
            enable_tools=enable_tools,
            console=console,
            renderer=renderer,
            prompt=("[bold cyan]you >[/] " if interactive else None),
            approve_all=approve_all,
        )
        return chat.loop()
