"""The chat page in a real browser: Debian's Chromium, driven by Playwright, on loopback.

Playwright's own browser download cannot work here, so the system Chromium is launched
by path (``CHATSTREAM_CHROMIUM``, default ``/usr/bin/chromium``). A missing browser or
Playwright fails these tests, never skips them: the page is a deliverable like any other.

The tests use Playwright's sync API and are plain ``def`` functions, because the sync
API refuses to run inside an asyncio loop. Each saves screenshots under its ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatstream import messages as m
from chatstream.config import Settings
from chatstream.messages import ToolCallRequest
from chatstream.server.app import create_app
from chatstream.store.base import SessionRef
from tests.fakes.open_meteo import run_fake_open_meteo
from tests.support import approval_tools
from tests.support import process as server_processes
from tests.support.approval_tools import ran
from tests.support.process import server_process
from tests.support.proxy import CuttingProxy, cutting_proxy
from tests.support.server import LiveServer, free_port, live_server

try:
    from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright
except ImportError as exc:  # the browser fixture fails with what to install
    PLAYWRIGHT_MISSING: str | None = str(exc)
else:
    PLAYWRIGHT_MISSING = None

CHROMIUM = Path(os.environ.get("CHATSTREAM_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 10_000

# Records the newest answer's state at every DOM change, so a test can tell what the page
# showed while the answer streamed, however fast it went.
RECORD_ANSWER = """() => {
  window.__seen = [];
  const log = document.querySelector("#log");
  new MutationObserver(() => {
    const answer = [...log.querySelectorAll(".msg.assistant")].pop();
    if (!answer) return;
    window.__seen.push({
      text: answer.querySelector(".answer").textContent,
      typing: !answer.querySelector(".typing").hidden,
      busy: answer.getAttribute("aria-busy") === "true",
      stop: !document.querySelector("#stop").disabled,
    });
  }).observe(log, { childList: true, subtree: true, characterData: true, attributes: true });
}"""

MCP_TEST_SERVER = Path(__file__).parent / "support" / "mcp_server.py"

# Records every state of the newest tool card, so a test can tell what it showed before
# its result came, however loaded the machine.
RECORD_TOOL_CARD = """() => {
  window.__cards = [];
  const log = document.querySelector("#log");
  new MutationObserver(() => {
    const card = [...log.querySelectorAll(".tool")].pop();
    if (!card) return;
    const bar = card.querySelector("[role=progressbar]");
    window.__cards.push({
      running: card.classList.contains("running"),
      progress: card.querySelector(".tool-progress").textContent,
      percent: bar.hidden ? null : bar.getAttribute("aria-valuenow"),
      result: card.querySelector(".tool-result").hidden
        ? null
        : card.querySelector(".tool-result").textContent,
    });
  }).observe(log, { childList: true, subtree: true, characterData: true, attributes: true });
}"""

MARKUP = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'

# send_email and delete_file need a person's yes; each call that runs is logged to a file.
EMAIL = {"to": "kim@example.com", "subject": "Hi"}
SEND_EMAIL = f"call send_email {json.dumps(EMAIL)}"
SENT = "Sent 'Hi' to kim@example.com."
APPROVAL_TOOLS = "tests.support.approval_tools:tools"


def counted(n: int) -> str:
    """The scripted model's answer to ``count to n``."""
    return " ".join(str(i) for i in range(1, n + 1))


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if PLAYWRIGHT_MISSING is not None:
        pytest.fail(
            f"Playwright is not installed ({PLAYWRIGHT_MISSING}): pip install playwright",
            pytrace=False,
        )
    if not CHROMIUM.exists():
        pytest.fail(
            f"Chromium is not installed at {CHROMIUM}: apt-get install -y chromium "
            "(or set CHATSTREAM_CHROMIUM to its path)",
            pytrace=False,
        )
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, tmp_path: Path) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    page.screenshot(path=tmp_path / "last.png")
    context.close()
    assert not errors, f"the page threw: {errors}"


def slow(settings: Settings, **changes: Any) -> Settings:
    """Settings whose scripted model writes a token every 30 ms."""
    return settings.with_(model="scripted:30", **changes)


def send(page: Page, message: str) -> None:
    page.get_by_label("Message").fill(message)
    page.get_by_label("Message").press("Enter")


def answer(page: Page) -> str:
    return page.locator(".msg.assistant .answer").last.inner_text()


def wait_until_answered(page: Page) -> None:
    expect(page.locator(".msg.assistant").last).to_have_attribute("aria-busy", "false")


def showing_step(page: Page, message: str, percent: int) -> None:
    """Wait until the running tool card shows this progress line and bar."""
    page.wait_for_function(
        """([message, percent]) => {
          const card = document.querySelector(".tool.running");
          const bar = card?.querySelector("[role=progressbar]");
          return card?.querySelector(".tool-progress").textContent === message
            && !bar.hidden && bar.getAttribute("aria-valuenow") === String(percent);
        }""",
        arg=[message, percent],
    )


def with_mcp(settings: Settings, tmp_path: Path, server: str) -> Settings:
    """Settings that offer the tools of the test MCP server (over stdio) as ``server``."""
    config = {"mcpServers": {server: {"command": sys.executable, "args": [str(MCP_TEST_SERVER)]}}}
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return settings.with_(model="scripted:10", mcp_config=str(path))


def mcp_ready(live: LiveServer, server: str) -> None:
    health = httpx.get(f"{live.url}/api/health", timeout=10).json()
    assert health["mcp"][server]["status"] == "ready", health


def stored(live: LiveServer, page: Page) -> dict[str, Any]:
    """The page's session as the server stored it."""
    session_id = page.locator("#log").get_attribute("data-session-id")
    response = httpx.get(f"{live.url}/api/chat/sessions/{session_id}", timeout=10)
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


def test_the_answer_streams_in_before_it_is_done(
    page: Page, settings: Settings, tmp_path: Path
) -> None:
    with live_server(slow(settings)) as live:
        page.goto(live.url)
        page.evaluate(RECORD_ANSWER)
        send(page, "count to 40")
        page.wait_for_function("() => document.querySelector('.answer')?.textContent.length > 20")
        page.screenshot(path=tmp_path / "streaming.png")
        wait_until_answered(page)
        page.screenshot(path=tmp_path / "done.png")

        assert answer(page) == counted(40)
        seen: list[dict[str, Any]] = page.evaluate("window.__seen")
        # The typing indicator showed while the first token was on its way …
        assert any(s["typing"] and s["busy"] and s["text"] == "" for s in seen)
        # … then the text grew in place while the answer was running and Stop was live.
        partial = {
            s["text"]
            for s in seen
            if s["busy"] and s["stop"] and s["text"] and s["text"] != counted(40)
        }
        assert len(partial) >= 3, seen
        assert all(counted(40).startswith(text) for text in partial)
        expect(page.locator("#stop")).to_be_hidden()
        expect(page.get_by_role("button", name="Send")).to_be_enabled()
        assert stored(live, page)["messages"][-1]["content"] == counted(40)


def test_a_tool_runs_as_a_card_with_live_progress_and_its_result(
    page: Page, settings: Settings, tmp_path: Path
) -> None:
    with run_fake_open_meteo(delay_s=0.4) as weather:
        configured = settings.with_(
            model="scripted:10",
            weather_geocoding_url=weather.geocoding_url,
            weather_forecast_url=weather.forecast_url,
        )
        with live_server(configured) as live:
            page.goto(live.url)
            send(page, "What's the weather in Seoul?")
            card = page.locator(".tool")
            expect(card.locator(".tool-name")).to_have_text("get_weather")
            expect(card.locator(".tool-args")).to_have_text('location: "Seoul"')
            # Each step lasts as long as the fake service's delay; these checks run on
            # every animation frame, so they cannot miss one (expect() polls too slowly).
            showing_step(page, "Finding Seoul…", 10)
            showing_step(page, "Fetching the forecast for Seoul, South Korea…", 50)
            page.screenshot(path=tmp_path / "tool-running.png")

            expect(card).to_have_class("tool ok")
            expect(card.locator(".tool-state")).to_have_text("Done")
            expect(card.locator(".tool-result")).to_contain_text("Seoul, South Korea: 20.1°C")
            wait_until_answered(page)
            assert answer(page).endswith(
                "Here is what I found: " + card.locator(".tool-result").inner_text()
            )
            page.screenshot(path=tmp_path / "tool-done.png")


def test_an_mcp_tool_runs_as_a_card_with_live_progress_and_its_result(
    page: Page, settings: Settings, tmp_path: Path
) -> None:
    with live_server(with_mcp(settings, tmp_path, "test")) as live:
        mcp_ready(live, "test")
        page.goto(live.url)
        page.evaluate(RECORD_TOOL_CARD)
        send(page, 'call test__count {"steps": 4, "delay": 0.5}')
        card = page.locator(".tool")
        expect(card.locator(".tool-name")).to_have_text("test__count")
        expect(card.locator(".tool-args")).to_have_text("steps: 4, delay: 0.5")
        # The server's progress shows while the call runs: its message, and progress/total
        # as the bar. Each step lasts 0.5 s; showing_step checks on every animation frame.
        showing_step(page, "counted 1", 25)
        page.screenshot(path=tmp_path / "mcp-tool-running.png")
        showing_step(page, "counted 2", 50)
        expect(card.locator(".tool-result")).to_be_hidden()

        expect(card).to_have_class("tool ok")
        expect(card.locator(".tool-state")).to_have_text("Done")
        expect(card.locator(".tool-result")).to_have_text("counted to 4")
        expect(card.get_by_role("progressbar")).to_be_hidden()
        wait_until_answered(page)
        expect(page.locator(".msg.assistant .text").last).to_have_text(
            "Here is what I found: counted to 4"
        )
        page.screenshot(path=tmp_path / "mcp-tool-done.png")

        # Every step was shown in turn, with progress/total as the bar, before the result.
        seen: list[dict[str, Any]] = page.evaluate("window.__cards")
        shown = [(s["progress"], s["percent"]) for s in seen if s["running"] and s["progress"]]
        steps = list(dict.fromkeys(shown))
        assert steps[:3] == [("counted 1", "25"), ("counted 2", "50"), ("counted 3", "75")], seen
        assert all(s["result"] is None for s in seen if s["running"]), seen
        first_result = next(i for i, s in enumerate(seen) if s["result"] is not None)
        assert all(not s["running"] for s in seen[first_result:]), seen


def test_a_failing_tool_shows_its_error_and_the_answer_goes_on(
    page: Page, settings: Settings
) -> None:
    # The conftest points the weather service at a closed port.
    with live_server(settings) as live:
        page.goto(live.url)
        send(page, "What's the weather in Seoul?")
        card = page.locator(".tool")
        expect(card).to_have_class("tool failed")
        expect(card.locator(".tool-state")).to_have_text("Failed")
        expect(card.locator(".tool-result")).to_contain_text("unreachable")
        wait_until_answered(page)
        assert "get_weather failed" in answer(page)


def test_stop_ends_the_answer_and_it_is_stored_as_interrupted(
    page: Page, settings: Settings, tmp_path: Path
) -> None:
    with live_server(slow(settings)) as live:
        page.goto(live.url)
        send(page, "count to 300")
        expect(page.locator(".answer").last).to_contain_text("1 2 3 4 5")
        page.get_by_role("button", name="Stop").click()

        turn = page.locator(".msg.assistant").last
        expect(turn).to_have_class("msg assistant interrupted")
        expect(turn.locator(".note")).to_have_text("Stopped — this answer is incomplete.")
        expect(page.locator("#stop")).to_be_hidden()
        shown = answer(page)
        page.wait_for_timeout(300)
        assert answer(page) == shown, "text kept coming after Stop"
        assert counted(300).startswith(shown) and shown != counted(300)
        page.screenshot(path=tmp_path / "stopped.png")

        last = stored(live, page)["messages"][-1]
        assert last["interrupted"] is True
        assert last["content"].rstrip() == shown  # inner_text drops the trailing space

        # The stored history shows the answer as interrupted too.
        page.reload()
        expect(page.locator(".msg.assistant.interrupted .note")).to_contain_text("Interrupted")
        assert answer(page) == shown


def test_a_reload_resumes_the_answer_in_progress(
    page: Page, settings: Settings, tmp_path: Path
) -> None:
    with live_server(slow(settings)) as live:
        page.goto(live.url)
        send(page, "count to 100")
        expect(page.locator(".answer").last).to_contain_text("1 2 3 4 5 ")
        page.reload()
        # Back on its feet mid-answer: the answer is still being written.
        expect(page.locator(".msg.assistant").last).to_have_attribute("aria-busy", "true")
        expect(page.get_by_role("button", name="Stop")).to_be_enabled()
        page.screenshot(path=tmp_path / "resumed.png")
        wait_until_answered(page)

        assert answer(page) == counted(100)
        expect(page.locator(".msg.user")).to_have_text(["count to 100"])
        expect(page.locator(".msg.assistant")).to_have_count(1)
        messages = stored(live, page)["messages"]
        assert [(msg["role"], msg["content"]) for msg in messages] == [
            ("user", "count to 100"),
            ("assistant", counted(100)),
        ]
        assert "interrupted" not in messages[-1]


def test_a_dropped_connection_resumes_with_no_lost_or_repeated_text(
    page: Page, settings: Settings
) -> None:
    with live_server(slow(settings, retry_ms=200)) as live:
        proxy_cm = cutting_proxy(live.url)
        proxy: CuttingProxy = live.call(proxy_cm.__aenter__())  # type: ignore[assignment]
        try:
            page.goto(proxy.url)
            send(page, "count to 60")
            expect(page.locator(".answer").last).to_contain_text("1 2 3 4 5 ")
            before = proxy.connections
            assert live.loop is not None
            live.loop.call_soon_threadsafe(proxy.cut)
            wait_until_answered(page)
            assert answer(page) == counted(60)
            assert proxy.connections > before, "the page never reconnected"
        finally:
            live.call(proxy_cm.__aexit__(None, None, None))


def test_a_refused_message_is_reported_in_the_conversation(page: Page, settings: Settings) -> None:
    with live_server(settings.with_(max_message_chars=20)) as live:
        page.goto(live.url)
        send(page, "a message that is longer than the limit")
        note = page.locator(".msg.assistant .note.error")
        expect(note).to_contain_text("The server refused this message")
        expect(page.locator("#stop")).to_be_hidden()
        expect(page.get_by_role("button", name="Send")).to_be_enabled()
        # The page works on after a refusal.
        send(page, "count to 3")
        wait_until_answered(page)
        assert answer(page) == counted(3)


# Holds back the answers to the page's reads of one chat, as a slow network would: the
# answer is the chat as it was when asked. window.slowReads counts those still held.
SLOW_SESSION_READS = """
window.slowReads = 0;
const realFetch = window.fetch;
window.fetch = async (input, init) => {
  const path = new URL(typeof input === "string" ? input : input.url, location.href).pathname;
  const chat = path.startsWith("/api/chat/sessions/") && path.split("/").length === 5;
  const response = await realFetch(input, init);
  if ((init?.method ?? "GET") === "GET" && chat) {
    window.slowReads++;
    await new Promise((resolve) => setTimeout(resolve, 1000));
    window.slowReads--;
  }
  return response;
};
"""


@pytest.mark.parametrize("network", ["fast", "slow"])
def test_a_server_with_api_keys_asks_for_one(page: Page, settings: Settings, network: str) -> None:
    if network == "slow":
        # The chat is read again once the key is given; a message sent before that read
        # arrives must stay on screen, not be wiped by the (empty) history.
        page.add_init_script(SLOW_SESSION_READS)
    with live_server(settings.with_(api_keys=("s3cret",))) as live:
        page.goto(live.url)
        dialog = page.get_by_role("dialog", name="This server needs an API key")
        expect(dialog).to_be_visible()
        dialog.get_by_label("API key").fill("wrong")
        dialog.get_by_role("button", name="Use this key").click()
        expect(dialog).to_contain_text("The API key is not valid.")
        dialog.get_by_label("API key").fill("s3cret")
        dialog.get_by_role("button", name="Use this key").click()
        expect(dialog).to_be_hidden()
        send(page, "count to 3")
        wait_until_answered(page)
        if network == "slow":
            page.wait_for_function("window.slowReads === 0")
        assert answer(page) == counted(3)
        expect(page.locator(".msg.user")).to_have_text(["count to 3"])
        expect(page.locator("#session-list button")).to_have_count(1)


def test_new_chat_and_picking_a_previous_chat(page: Page, settings: Settings) -> None:
    with live_server(settings) as live:
        page.goto(live.url)
        send(page, "count to 3")
        wait_until_answered(page)
        first = page.locator("#log").get_attribute("data-session-id")

        page.get_by_role("button", name="New chat").click()
        expect(page.get_by_role("heading", name="What can I help with?")).to_be_visible()
        expect(page.locator(".msg")).to_have_count(0)
        send(page, "count to 5")
        wait_until_answered(page)
        assert page.locator("#log").get_attribute("data-session-id") != first

        chats = page.locator("#session-list button")
        expect(chats).to_have_count(2)
        page.locator(f'#session-list button[data-session-id="{first}"]').click()
        expect(page.locator(".msg.user")).to_have_text(["count to 3"])
        assert answer(page) == counted(3)
        expect(page.locator(f'button[data-session-id="{first}"]')).to_have_attribute(
            "aria-current", "page"
        )


def test_the_page_fits_a_phone_screen_in_dark_mode(
    browser: Browser, settings: Settings, tmp_path: Path
) -> None:
    context = browser.new_context(
        viewport={"width": 390, "height": 844}, color_scheme="dark", has_touch=True
    )
    try:
        page = context.new_page()
        with live_server(settings) as live:
            page.goto(live.url)
            send(page, "What's the weather in Seoul?")
            wait_until_answered(page)
            page.screenshot(path=tmp_path / "phone-dark.png")
            assert page.evaluate("document.scrollingElement.scrollWidth") <= 390
            expect(page.get_by_label("Message")).to_be_in_viewport()
            expect(page.locator(".tool")).to_be_in_viewport()
            # The chat list slides in over the conversation, and out again once used.
            chats = page.locator("#sessions")
            expect(chats).to_be_hidden()
            page.get_by_role("button", name="Show chats").click()
            expect(chats).to_be_in_viewport(ratio=1)
            page.screenshot(path=tmp_path / "phone-dark-chats.png")
            page.get_by_role("button", name="New chat").click()
            expect(chats).to_be_hidden()
            expect(page.locator(".msg")).to_have_count(0)
    finally:
        context.close()


def test_a_long_mcp_tool_name_fits_a_phone_screen(
    browser: Browser, settings: Settings, tmp_path: Path
) -> None:
    server = "chatstream_test_server_with_a_long_name"
    context = browser.new_context(viewport={"width": 390, "height": 844}, has_touch=True)
    try:
        page = context.new_page()
        with live_server(with_mcp(settings, tmp_path, server)) as live:
            mcp_ready(live, server)
            page.goto(live.url)
            send(page, f'call {server}__count {{"steps": 2, "delay": 0.1}}')
            card = page.locator(".tool")
            expect(card.locator(".tool-name")).to_have_text(f"{server}__count")
            expect(card).to_have_class("tool ok")
            wait_until_answered(page)
            page.screenshot(path=tmp_path / "phone-mcp-tool.png")
            assert page.evaluate("document.scrollingElement.scrollWidth") <= 390
            expect(card.locator(".tool-name")).to_be_in_viewport(ratio=1)
            expect(card.locator(".tool-state")).to_be_in_viewport(ratio=1)
    finally:
        context.close()


def test_markup_from_users_models_and_tools_is_shown_as_text(
    page: Page, settings: Settings, tmp_path: Path
) -> None:
    call = ToolCallRequest(id="call_1", name="calculate", arguments={"expression": MARKUP})
    answer_text = (
        f"**Bold** and *em*, `code`, [a link](https://example.com/?a=1&b=2), "
        f"[not a link](javascript:window.__pwned=3) and {MARKUP}\n\n- one\n- two\n\n"
        f"```\n{MARKUP}\n```"
    )
    with live_server(settings) as live:
        live.call(
            live.runtime.store.append(
                SessionRef("", "s_markup"),
                [
                    m.user(f"Look: {MARKUP}"),
                    m.assistant("", tool_calls=(call,)),
                    m.tool_result(call, f"bad input {MARKUP}", is_error=True),
                    m.assistant(answer_text),
                ],
            )
        )
        page.goto(live.url)
        page.locator('#session-list button[data-session-id="s_markup"]').click()
        expect(page.locator(".tool-result")).to_have_text(f"bad input {MARKUP}")
        # Typed in the page too: the user's own text is never markup either.
        send(page, f"Hello {MARKUP} **not bold**")
        wait_until_answered(page)
        page.wait_for_timeout(200)  # give an <img onerror> the time it would need to fire
        page.screenshot(path=tmp_path / "markup.png", full_page=True)

        log = page.locator("#log")
        assert log.locator("img, script, iframe, svg, object").count() == 0
        assert page.evaluate("window.__pwned") is None
        expect(page.locator(".msg.user .bubble")).to_have_text(
            [f"Look: {MARKUP}", f"Hello {MARKUP} **not bold**"]
        )
        expect(page.locator(".tool-args")).to_have_text(f"expression: {json.dumps(MARKUP)}")
        text = page.locator(".msg.assistant .text").nth(0)
        expect(text.locator("strong")).to_have_text("Bold")
        expect(text.locator("em")).to_have_text("em")
        expect(text.locator("p > code")).to_have_text("code")
        expect(text.locator("li")).to_have_text(["one", "two"])
        expect(text.locator("pre code")).to_have_text(MARKUP)
        links = text.locator("a")
        expect(links).to_have_count(1)
        expect(links).to_have_attribute("href", "https://example.com/?a=1&b=2")
        expect(text).to_contain_text(f"[not a link](javascript:window.__pwned=3) and {MARKUP}")


# -- approvals ------------------------------------------------------------------------


@contextmanager
def approval_server(settings: Settings, **changes: Any) -> Iterator[LiveServer]:
    """A server whose tools include send_email and delete_file, which need approval."""
    configured = settings.with_(model="scripted:10", **changes)
    with live_server(configured, lambda s: create_app(s, tools=approval_tools.tools)) as live:
        yield live


def asking(page: Page) -> Locator:
    """The one tool card, once it shows its request for approval."""
    card = page.locator(".tool")
    expect(card.locator(".tool-state")).to_have_text("Needs approval")
    expect(card.get_by_role("button", name="Approve")).to_be_visible()
    expect(card.get_by_role("button", name="Decline")).to_be_visible()
    return card


def waiting_run(live: LiveServer, page: Page) -> dict[str, Any]:
    """The server's view of the page's active run."""
    run_id = stored(live, page)["activeRunId"]
    response = httpx.get(f"{live.url}/api/chat/runs/{run_id}", timeout=10)
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


def last_text(page: Page) -> Locator:
    return page.locator(".msg.assistant .text").last


def test_a_call_that_needs_approval_runs_only_after_approve(
    page: Page, settings: Settings, ran_log: Path, tmp_path: Path
) -> None:
    with approval_server(settings) as live:
        page.goto(live.url)
        send(page, SEND_EMAIL)
        card = asking(page)
        expect(card.locator(".tool-name")).to_have_text("send_email")
        expect(card.locator(".tool-args")).to_have_text('to: "kim@example.com", subject: "Hi"')
        expect(card.get_by_role("group", name="Approve send_email?")).to_contain_text(
            "Run send_email? Nothing has run yet. It waits until"
        )
        page.screenshot(path=tmp_path / "approval-asked.png")
        # The run waits for the answer, and nothing of the tool has run.
        run = waiting_run(live, page)
        assert run["state"] == "waiting"
        assert [(p["tool"], p["args"]) for p in run["pendingApprovals"]] == [("send_email", EMAIL)]
        assert ran(ran_log) == []
        expect(page.get_by_role("button", name="Stop")).to_be_enabled()

        card.get_by_role("button", name="Approve").click()
        expect(card.get_by_role("button")).to_have_count(0)
        expect(card).to_have_class("tool ok")
        expect(card.locator(".tool-state")).to_have_text("Done")
        expect(card.locator(".tool-result")).to_have_text(SENT)
        wait_until_answered(page)
        expect(last_text(page)).to_have_text(f"Here is what I found: {SENT}")
        page.screenshot(path=tmp_path / "approval-approved.png")
        assert ran(ran_log) == [{"tool": "send_email", **EMAIL}]
        call = stored(live, page)["messages"][1]["toolCalls"][0]
        assert call["approval"] == "approved"


def test_decline_with_a_reason_tells_the_model_and_the_tool_never_runs(
    page: Page, settings: Settings, ran_log: Path, tmp_path: Path
) -> None:
    with approval_server(settings) as live:
        page.goto(live.url)
        send(page, f"call delete_file {json.dumps({'path': MARKUP})}")
        card = asking(page)
        # Arguments that look like markup are shown as text, in the request too.
        expect(card.locator(".tool-args")).to_have_text(f"path: {json.dumps(MARKUP)}")
        card.get_by_label("Reason for declining (optional)").fill("Not that <b>file</b>")
        card.get_by_role("button", name="Decline").click()

        expect(card.get_by_role("button")).to_have_count(0)
        expect(card).to_have_class("tool refused declined")
        expect(card.locator(".tool-state")).to_have_text("Declined")
        expect(card.locator(".tool-result")).to_have_text(
            "The user declined to run delete_file. Their reason: Not that <b>file</b>"
        )
        wait_until_answered(page)
        expect(last_text(page)).to_contain_text("The user declined to run delete_file.")
        page.wait_for_timeout(200)  # the time an <img onerror> would need to fire
        page.screenshot(path=tmp_path / "approval-declined.png")
        assert page.locator("#log").locator("img, script, b").count() == 0
        assert page.evaluate("window.__pwned") is None
        assert ran(ran_log) == []
        result = stored(live, page)["messages"][2]
        assert (result["role"], result["approval"], result["isError"]) == ("tool", "declined", True)

        # The stored chat says so too.
        page.reload()
        expect(card).to_have_class("tool refused declined")
        expect(card.locator(".tool-state")).to_have_text("Declined")
        expect(card.get_by_role("button")).to_have_count(0)


def test_after_a_reload_the_buttons_are_back_and_approve_runs_the_call(
    page: Page, settings: Settings, ran_log: Path, tmp_path: Path
) -> None:
    with approval_server(settings) as live:
        page.goto(live.url)
        send(page, SEND_EMAIL)
        asking(page)
        page.reload()
        # The page resumes the waiting run; its replay asks again, on one card.
        card = asking(page)
        expect(page.locator(".tool")).to_have_count(1)
        expect(page.locator(".msg.user")).to_have_text([SEND_EMAIL])
        expect(card.locator(".tool-args")).to_have_text('to: "kim@example.com", subject: "Hi"')
        page.screenshot(path=tmp_path / "approval-after-reload.png")
        assert ran(ran_log) == []
        assert waiting_run(live, page)["state"] == "waiting"

        card.get_by_role("button", name="Approve").click()
        expect(card.locator(".tool-result")).to_have_text(SENT)
        expect(card).to_have_class("tool ok")
        wait_until_answered(page)
        expect(last_text(page)).to_have_text(f"Here is what I found: {SENT}")
        expect(page.locator(".tool")).to_have_count(1)
        assert ran(ran_log) == [{"tool": "send_email", **EMAIL}]


def test_an_unanswered_call_expires_and_says_so(
    page: Page, settings: Settings, ran_log: Path
) -> None:
    with approval_server(settings, approval_timeout_s=1.5) as live:
        page.goto(live.url)
        send(page, SEND_EMAIL)
        card = page.locator(".tool")
        expect(card.locator(".tool-state")).to_have_text("Expired")
        expect(card).to_have_class("tool refused expired")
        expect(card.get_by_role("button")).to_have_count(0)
        expect(card.locator(".tool-result")).to_have_text(
            "Nobody approved send_email within 1.5 s, so it did not run."
        )
        wait_until_answered(page)
        assert ran(ran_log) == []
        assert stored(live, page)["messages"][2]["approval"] == "expired"


def test_stop_while_a_call_waits_cancels_it(page: Page, settings: Settings, ran_log: Path) -> None:
    with approval_server(settings) as live:
        page.goto(live.url)
        send(page, SEND_EMAIL)
        card = asking(page)
        page.get_by_role("button", name="Stop").click()
        expect(card).to_have_class("tool refused cancelled")
        expect(card.locator(".tool-state")).to_have_text("Cancelled")
        expect(card.get_by_role("button")).to_have_count(0)
        expect(card.locator(".tool-note")).to_have_text(
            "Not run: the answer was stopped before anyone said yes."
        )
        expect(page.locator(".msg.assistant .note")).to_have_text(
            "Stopped — this answer is incomplete."
        )
        assert ran(ran_log) == []
        result = stored(live, page)["messages"][2]
        assert (result["role"], result["approval"]) == ("tool", "cancelled")
        page.reload()
        expect(card.locator(".tool-state")).to_have_text("Cancelled")
        expect(card.locator(".tool-result")).to_contain_text("so it did not run")


def test_a_call_parked_by_a_restart_is_answered_after_it_and_the_turn_goes_on(
    page: Page, ran_log: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A real `chatstream serve`, stopped with SIGTERM and started again on the same port
    # and SQLite file, so that the page (its origin, its tab's storage) stays the same.
    port = free_port()
    monkeypatch.setattr(server_processes, "free_port", lambda: port)
    store = f"sqlite:///{tmp_path / 'restart.db'}"
    args = ("--model", "scripted:10", "--store", store, "--tools", APPROVAL_TOOLS)
    env = {"APPROVAL_TOOLS_LOG": str(ran_log)}
    with server_process(*args, env=env) as first:
        page.goto(first.url)
        send(page, SEND_EMAIL)
        card = asking(page)
        first.terminate()
        # The server stops while the call waits: the page is told that the call is kept.
        expect(page.locator(".msg.assistant .note.error")).to_contain_text(
            "answer it after the restart"
        )
        first.process.wait(timeout=20)
    expect(card.get_by_role("button", name="Approve")).to_be_visible()
    with server_process(*args, env=env) as second:
        session = page.locator("#log").get_attribute("data-session-id")
        stored_turn = httpx.get(f"{second.url}/api/chat/sessions/{session}", timeout=10).json()
        assert stored_turn["messages"][1]["toolCalls"][0]["approval"] == "pending"
        # Another device (a browser with none of this tab's storage) that picks the chat
        # can answer the parked call too: the stored call names its run.
        other = page.context.browser.new_context()  # type: ignore[union-attr]
        try:
            elsewhere = other.new_page()
            elsewhere.goto(second.url)
            elsewhere.locator(f'#session-list button[data-session-id="{session}"]').click()
            asking(elsewhere)
            expect(elsewhere.locator(".tool-note")).not_to_contain_text("where this chat")
        finally:
            other.close()
        # A reload shows the stored turn, with the parked call still asking.
        page.reload()
        card = asking(page)
        page.screenshot(path=tmp_path / "approval-after-restart.png")
        assert ran(ran_log) == []

        card.get_by_role("button", name="Approve").click()
        expect(card.locator(".tool-result")).to_have_text(SENT)
        expect(card).to_have_class("tool ok")
        expect(last_text(page)).to_have_text(f"Here is what I found: {SENT}")
        wait_until_answered(page)
        expect(page.locator(".tool")).to_have_count(1)
        expect(page.locator(".msg.assistant")).to_have_count(1)
        assert ran(ran_log) == [{"tool": "send_email", **EMAIL}]
        stored_turn = httpx.get(f"{second.url}/api/chat/sessions/{session}", timeout=10).json()
        messages = stored_turn["messages"]
        assert [msg["role"] for msg in messages] == ["user", "assistant", "tool", "assistant"]
        assert messages[1]["toolCalls"][0]["approval"] == "approved"
