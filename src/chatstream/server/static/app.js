// The chat page: send a message, follow its run, stop it, resume it, switch chats,
// answer the tool calls that wait for approval.

import * as api from "./api.js";
import { AnswerView, h, renderHistory, userMessage } from "./view.js";

const $ = (selector) => document.querySelector(selector);
const els = {
  log: $("#log"),
  empty: $("#empty"),
  form: $("#composer"),
  message: $("#message"),
  tools: $("#tools"),
  send: $("#send"),
  stop: $("#stop"),
  status: $("#status"),
  sessions: $("#session-list"),
  noSessions: $("#session-empty"),
  newChat: $("#new-chat"),
  toggle: $("#toggle-sessions"),
  keyDialog: $("#key-dialog"),
  keyForm: $("#key-form"),
  keyInput: $("#api-key"),
  keyWhy: $("#key-why"),
};

const state = {
  sessionId: null,
  view: null, // the answer being written, from send (or resume) until it ends
  follower: null, // its open stream; null while reconnecting
  runId: null,
  pending: null, // the message whose answer is being written: {message}
  asked: {}, // call id -> the run that asked for its approval, in this chat
  shown: [], // the stored answers on screen (from the session's history)
  opening: 0, // counts openSession calls, so that only the latest one renders
  loaded: Promise.resolve(), // settles when the chat being opened has shown its history
  pinned: true, // the log follows new text unless the reader scrolled up
};

// -- what survives a reload --------------------------------------------------------
// Per tab (sessionStorage): the chat on screen, the message whose answer is being
// written, and the runs that asked for approvals. The run itself is found again
// through the session's `activeRunId`, which is right even when the reload came
// before the first event; but a run parked by a server restart is no session's
// active run any more, and the session view does not name it, so the page keeps
// the run of each call it was asked about, to answer it after the restart.

const KEY = "chatstream";

function saved() {
  try {
    return JSON.parse(sessionStorage.getItem(KEY)) ?? {};
  } catch {
    return {};
  }
}

function remember() {
  const { sessionId, pending, asked } = state;
  sessionStorage.setItem(KEY, JSON.stringify({ sessionId, pending, asked }));
  els.log.dataset.sessionId = state.sessionId ?? "";
}

// -- following a run ---------------------------------------------------------------

function setStreaming(on) {
  if (!on) state.view = null;
  els.send.disabled = on;
  els.stop.disabled = !on;
  document.body.classList.toggle("streaming", on);
}

function status(text) {
  els.status.textContent = text;
}

function follow(url, view, { runId = null, afterSeq = 0, attempt = 0 } = {}) {
  state.view = view;
  state.runId = runId;
  setStreaming(true);
  state.follower = api.follow(
    url,
    {
      open: () => status(""),
      event(type, data, where) {
        state.runId = where.runId;
        apply(view, type, data, where);
        if (type === "done" || type === "error") finished();
      },
      reconnecting: () => status("Connection lost — reconnecting…"),
      lost: (where) => recover(view, where, attempt + 1),
    },
    { runId, afterSeq },
  );
}

function apply(view, type, data, where) {
  switch (type) {
    case "token":
      return view.text(data.content);
    case "tool_call":
      return view.toolCall(data);
    case "approval_required":
      state.asked[data.id] = where.runId;
      remember();
      return view.approvalRequired(data, where.runId);
    case "tool_progress":
      return view.toolProgress(data);
    case "tool_result":
      if (data.id in state.asked) {
        delete state.asked[data.id];
        remember();
      }
      return view.toolResult(data);
    case "done":
      return view.finish();
    case "error":
      return data.code === "CANCELLED"
        ? view.finish({ interrupted: true, stopped: true })
        : view.finish({ error: data });
  }
}

function finished() {
  state.follower = null;
  state.runId = null;
  state.pending = null;
  setStreaming(false);
  status("");
  remember();
  refreshSessions();
}

const newView = () => new AnswerView({ answer: answerCall });

/** Send a person's answer to a call waiting for approval (the card's buttons). */
async function answerCall({ view, callId, runId, approved, reason }) {
  const reply = await api.answerApproval(runId, callId, { approved, reason });
  if (reply.continuedRunId && !state.view) {
    // Its turn was parked by a server restart: the answer continues it in a new run,
    // which streams from its start; it writes on in the same answer.
    state.shown = state.shown.filter((shown) => shown !== view);
    view.reopen();
    status("");
    follow(api.resumeUrl(reply.continuedRunId, 0), view, { runId: reply.continuedRunId });
  }
  return reply;
}

/** The stream closed before its end: pick the run up again, or show how it ended. */
async function recover(view, { runId, lastSeq }, attempt) {
  state.follower = null;
  let session = null;
  try {
    session = await api.getSession(state.sessionId);
  } catch (error) {
    if (state.view !== view) return; // the reader moved to another chat meanwhile
    if (needsKey(error)) {
      askForKey(error.message);
      return failed(view, error.code, "This server needs an API key.");
    }
    if (!(error instanceof api.ApiError && error.status === 404)) {
      if (attempt > 5) return failed(view, "NETWORK", "The server cannot be reached.");
      status("The server cannot be reached — retrying…");
      return setTimeout(() => recover(view, { runId, lastSeq }, attempt + 1), 1000 * attempt);
    }
  }
  if (state.view !== view) return;
  const active = session?.activeRunId;
  if (active && attempt <= 5) {
    // Still running: go on after the last event shown (from the start if it is
    // a run this view has not shown yet).
    const afterSeq = active === runId ? lastSeq : 0;
    return follow(api.resumeUrl(active, afterSeq), view, { runId: active, afterSeq, attempt });
  }
  if (runId === null) {
    // EventSource cannot read a refusal's JSON body, only that it was refused.
    return failed(
      view,
      "REFUSED",
      "The server refused this message (busy, rate limited, too long, or not authorised).",
    );
  }
  // It ended while we were away: the stored session has the whole turn.
  showHistory(session?.messages ?? []);
  finished();
}

function failed(view, code, message) {
  view.finish({ error: { code, message } });
  finished();
}

function send(message) {
  if (state.view || !message.trim()) return;
  state.sessionId ??= api.newSessionId();
  els.empty.hidden = true;
  // The server declines the calls of a parked turn that a new message leaves.
  for (const shown of state.shown) shown.leaveWaiting();
  state.shown = [];
  const view = newView();
  els.log.append(userMessage(message), view.element);
  state.pinned = true;
  state.pending = { message };
  remember();
  follow(api.turnUrl(message, state.sessionId, els.tools.checked), view);
}

async function stop() {
  els.stop.disabled = true;
  try {
    // Before the first event the run id is not known yet; the session knows it.
    const runId = state.runId ?? (await api.getSession(state.sessionId)).activeRunId;
    // The stream then ends with `error CANCELLED`, which finishes the view.
    if (runId) await api.cancelRun(runId);
  } catch (error) {
    status(`Could not stop: ${error.message}`);
    els.stop.disabled = false;
  }
}

// -- chats -------------------------------------------------------------------------

function unfollow() {
  // The run goes on without us; the server keeps it resumable for a while.
  state.follower?.close();
  state.follower = null;
  state.runId = null;
  setStreaming(false);
  status("");
}

function showHistory(messages) {
  els.log.replaceChildren(els.empty);
  els.empty.hidden = messages.length > 0;
  state.shown = renderHistory(els.log, messages, {
    answer: answerCall,
    runOf: (callId) => state.asked[callId] ?? null,
  });
}

function openSession(sessionId) {
  state.loaded = loadSession(sessionId).catch((error) => status(error.message));
  return state.loaded;
}

async function loadSession(sessionId) {
  unfollow();
  const before = saved();
  const same = before.sessionId === sessionId;
  const pending = same ? before.pending : null;
  const ticket = ++state.opening;
  state.sessionId = sessionId;
  state.pending = null;
  state.asked = same ? (before.asked ?? {}) : {};
  remember();
  markCurrent();
  let session = null;
  try {
    session = await api.getSession(sessionId);
  } catch (error) {
    // 404: a chat whose first message never reached the server; start it afresh.
    if (needsKey(error)) askForKey(error.message);
    else if (!(error instanceof api.ApiError && error.status === 404)) status(error.message);
  }
  if (ticket !== state.opening) return; // another chat was picked meanwhile
  showHistory(session?.messages ?? []);
  if (session?.activeRunId) {
    // An answer is being written: replay it from its first event, then follow it live.
    els.empty.hidden = true;
    const view = newView();
    if (pending) els.log.append(userMessage(pending.message));
    els.log.append(view.element);
    status("Resuming the answer in progress…");
    state.pending = pending;
    remember();
    follow(api.resumeUrl(session.activeRunId, 0), view, { runId: session.activeRunId });
  }
  state.pinned = true;
  els.log.scrollTop = els.log.scrollHeight;
}

function newChat() {
  unfollow();
  state.opening++;
  state.sessionId = api.newSessionId();
  state.pending = null;
  state.asked = {};
  remember();
  showHistory([]);
  markCurrent();
  els.message.focus();
}

async function refreshSessions() {
  let list;
  try {
    list = await api.listSessions();
  } catch (error) {
    if (needsKey(error)) askForKey(error.message);
    return; // otherwise the list is a convenience; the chat works without it
  }
  els.noSessions.hidden = list.count > 0;
  els.sessions.replaceChildren(...list.sessions.map(sessionItem));
  markCurrent();
}

function sessionItem(session) {
  const button = h(
    "button",
    { type: "button", className: "session" },
    h("span", { className: "session-title" }, session.title || "Untitled"),
    h(
      "span",
      { className: "session-meta" },
      `${ago(session.lastActivity)} · ${session.messageCount} messages`,
    ),
  );
  button.dataset.sessionId = session.sessionId;
  return h("li", {}, button);
}

function markCurrent() {
  for (const button of els.sessions.querySelectorAll("button")) {
    if (button.dataset.sessionId === state.sessionId) button.setAttribute("aria-current", "page");
    else button.removeAttribute("aria-current");
  }
}

const relative = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });

function ago(iso) {
  const seconds = (Date.parse(iso) - Date.now()) / 1000;
  for (const [unit, size] of [["day", 86400], ["hour", 3600], ["minute", 60]]) {
    if (Math.abs(seconds) >= size) return relative.format(Math.round(seconds / size), unit);
  }
  return "just now";
}

function showSessions(open) {
  document.body.classList.toggle("sessions-open", open);
  els.toggle.setAttribute("aria-expanded", String(open));
}

// -- API keys (only when the server has them) ----------------------------------------

const needsKey = (error) => error instanceof api.ApiError && error.status === 401;

function askForKey(why) {
  if (els.keyDialog.open) return;
  // The server's own words are for API clients; a first visit gets plainer ones.
  els.keyWhy.textContent = api.hasApiKey() ? why : "Enter the key you were given for it.";
  els.keyInput.value = "";
  els.keyDialog.showModal();
}

els.keyForm.addEventListener("submit", () => {
  // The form's method is "dialog": submitting closes it.
  api.setApiKey(els.keyInput.value.trim());
  openSession(state.sessionId);
  refreshSessions();
});

// -- wiring ------------------------------------------------------------------------

els.form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const message = els.message.value;
  if (!message.trim() || state.view) return;
  els.message.value = "";
  fitMessageBox();
  // A chat still loading would replace the log, and this message with it, when it
  // arrives (right after an API key is given, say): show its history first.
  await state.loaded;
  send(message);
});

els.message.addEventListener("keydown", (event) => {
  // Enter sends, Shift+Enter breaks the line; not while an IME is composing (Korean, Japanese…).
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    els.form.requestSubmit();
  }
});

function fitMessageBox() {
  els.message.style.height = "auto";
  els.message.style.height = `${els.message.scrollHeight}px`;
}
els.message.addEventListener("input", fitMessageBox);

els.stop.addEventListener("click", stop);
els.newChat.addEventListener("click", () => {
  showSessions(false);
  newChat();
});
els.toggle.addEventListener("click", () =>
  showSessions(!document.body.classList.contains("sessions-open")),
);
els.sessions.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-session-id]");
  if (!button) return;
  showSessions(false);
  if (button.dataset.sessionId !== state.sessionId || !state.view) {
    openSession(button.dataset.sessionId);
  }
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape") showSessions(false);
});
$(".chat").addEventListener("pointerdown", (event) => {
  if (!els.toggle.contains(event.target)) showSessions(false);
});
for (const chip of document.querySelectorAll(".chip")) {
  chip.addEventListener("click", () => {
    els.message.value = chip.textContent;
    els.form.requestSubmit();
  });
}

// Keep the newest text in view while it streams, unless the reader scrolled up.
els.log.addEventListener("scroll", () => {
  const { scrollHeight, scrollTop, clientHeight } = els.log;
  state.pinned = scrollHeight - scrollTop - clientHeight < 48;
});
new MutationObserver(() => {
  if (state.pinned) els.log.scrollTop = els.log.scrollHeight;
}).observe(els.log, { childList: true, subtree: true, characterData: true });

// Pick up where this tab was: the same chat, and an answer still being written.
const { sessionId } = saved();
if (sessionId) openSession(sessionId);
else newChat();
refreshSessions();
