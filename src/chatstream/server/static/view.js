// How a conversation looks: user messages, answers, tool cards.
//
// Text from the model, tools or the user enters the page only as text nodes
// (`h` appends strings as text, and Markdown goes through renderMarkdown, which
// does the same), so none of it can become markup.
//
// A tool call that needs approval shows Approve / Decline on its card until it is
// answered, here or elsewhere; a call that did not run says why (declined, expired,
// cancelled) instead of "Failed".

import { renderMarkdown } from "./markdown.js";

/** Make an element: `h("p", {className: "x"}, "text", child)`. Strings become text nodes. */
export function h(tag, props = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "role" || name.startsWith("aria-")) element.setAttribute(name, value);
    else element[name] = value;
  }
  element.append(...children.filter((child) => child !== null && child !== undefined));
  return element;
}

export function userMessage(text) {
  return h("article", { className: "msg user" }, h("div", { className: "bubble" }, text));
}

/**
 * One answer: text segments and tool cards in the order they came, then how it ended.
 *
 * `answer({view, callId, runId, approved, reason})` sends a person's answer to a call
 * waiting for approval, and resolves with the server's reply (or rejects with its error).
 */
export class AnswerView {
  constructor({ answer = null } = {}) {
    this.answer = answer;
    this.body = h("div", { className: "answer" });
    this.typing = h(
      "div",
      { className: "typing", role: "img", "aria-label": "The assistant is writing" },
      h("span"),
      h("span"),
      h("span"),
    );
    this.element = h("article", { className: "msg assistant" }, this.body, this.typing);
    this.element.setAttribute("aria-busy", "true");
    this.segment = null; // the text segment tokens go to; a tool card closes it
    this.dirty = new Set();
    this.frame = 0;
    this.tools = new Map();
  }

  /** Append answer text; it is rendered at most once per animation frame. */
  text(delta) {
    if (!delta) return;
    if (this.segment === null) {
      this.segment = { source: "", element: h("div", { className: "text" }) };
      this.body.append(this.segment.element);
    }
    this.segment.source += delta;
    this.dirty.add(this.segment);
    // Re-rendering the Markdown on every token would cost O(n²) on long answers;
    // once per frame is as fast as anyone can see.
    this.frame ||= requestAnimationFrame(() => this.render());
    this.showTyping(false);
  }

  render() {
    cancelAnimationFrame(this.frame);
    this.frame = 0;
    for (const segment of this.dirty) {
      segment.element.replaceChildren(renderMarkdown(segment.source));
    }
    this.dirty.clear();
  }

  toolCall({ id, tool, args, approval }) {
    this.segment = null;
    this.showTyping(false);
    // A turn continued after a restart sends its calls again: they keep their card.
    if (this.tools.has(id)) return;
    const card = new ToolCard(tool, args);
    if (approval && approval !== "pending") card.verdict = approval;
    this.tools.set(id, card);
    this.body.append(card.element);
  }

  /** The call waits for a person; `runId` is where to send the answer (null: unknown here). */
  approvalRequired({ id, tool, args, expiresAt }, runId) {
    if (!this.tools.has(id)) this.toolCall({ id, tool, args });
    const card = this.tools.get(id);
    const send = (approved, reason) =>
      this.answer({ view: this, callId: id, runId, approved, reason });
    card.ask({ tool, expiresAt, send: runId && this.answer ? send : null });
    this.showTyping(false);
  }

  /** Whether a call still waits for an answer on this view. */
  get waiting() {
    return [...this.tools.values()].some((card) => card.waiting);
  }

  /** A new message was sent instead of answering: the server declines what waited. */
  leaveWaiting() {
    for (const card of this.tools.values()) {
      if (card.waiting) card.refused("declined", "Not run: a new message was sent instead.");
    }
  }

  toolProgress({ id, message, progress }) {
    this.tools.get(id)?.progress(message, progress);
  }

  toolResult({ id, tool, result, isError, approval }) {
    let card = this.tools.get(id);
    if (!card) {
      // A stored tool message whose call was not shown: still show what it said.
      card = new ToolCard(tool ?? "tool", null);
      this.body.append(card.element);
    }
    card.result(result, isError, approval);
    // Every tool has answered: the model is thinking about what they said.
    if ([...this.tools.values()].every((c) => c.finished)) this.showTyping(true);
  }

  /** The turn goes on in a new run (an approval answered after a restart): write on here. */
  reopen() {
    this.element.classList.remove("failed", "interrupted");
    for (const note of this.element.querySelectorAll(":scope > .note")) note.remove();
    this.element.setAttribute("aria-busy", "true");
    this.segment = null;
    this.showTyping(!this.waiting);
  }

  showTyping(on) {
    this.typing.hidden = !on;
  }

  /** The answer ended: normally, stopped (`interrupted`), or with an `error`. */
  finish({ interrupted = false, stopped = false, error = null } = {}) {
    this.render();
    this.showTyping(false);
    this.element.setAttribute("aria-busy", "false");
    // A call waiting for approval outlives a server restart (the server parks it) and a
    // page that lost the server; any other end of the run leaves it cancelled.
    const parked = error?.code === "SHUTTING_DOWN" || error?.code === "NETWORK";
    for (const card of this.tools.values()) {
      if (card.finished || (card.waiting && (parked || (!error && !stopped)))) continue;
      card.stop();
    }
    if (error) {
      this.element.classList.add("failed");
      this.element.append(
        h("p", { className: "note error", role: "alert" }, `${error.message} (${error.code})`),
      );
    } else if (interrupted) {
      this.element.classList.add("interrupted");
      const why = stopped ? "Stopped" : "Interrupted";
      this.element.append(h("p", { className: "note" }, `${why} — this answer is incomplete.`));
    }
  }
}

const VERDICTS = {
  declined: "Declined",
  expired: "Expired",
  cancelled: "Cancelled",
};

class ToolCard {
  constructor(tool, args) {
    this.finished = false;
    this.waiting = false; // for a person's answer: the Approve / Decline buttons show
    this.verdict = null; // how it was answered, once known here
    this.choice = null; // the answer clicked here, while it is being sent
    this.expiresAt = null;
    this.approval = null;
    this.state = h("span", { className: "tool-state" }, "Running");
    this.line = h("p", { className: "tool-progress" });
    this.note = h("p", { className: "tool-note", hidden: true });
    this.fill = h("span");
    this.meter = h(
      "div",
      { className: "meter", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100 },
      this.fill,
    );
    this.meter.hidden = true;
    this.output = h("pre", { className: "tool-result", hidden: true });
    this.element = h(
      "section",
      { className: "tool running", "aria-label": `Tool ${tool}` },
      h(
        "div",
        { className: "tool-head" },
        h("span", { className: "tool-icon", "aria-hidden": "true" }),
        h("code", { className: "tool-name" }, ...nameParts(tool)),
        this.state,
      ),
      args && Object.keys(args).length
        ? h("code", { className: "tool-args" }, formatArgs(args))
        : null,
      this.line,
      this.meter,
      this.note,
      this.output,
    );
  }

  /**
   * Show the request for approval: Approve, and Decline with an optional reason. `send`
   * posts the answer; without it (the run is not known here) the card only says so.
   */
  ask({ tool, expiresAt, send }) {
    if (this.finished || this.verdict) return; // a replay of a request answered since
    this.waiting = true;
    this.expiresAt = expiresAt ? Date.parse(expiresAt) : null;
    this.element.classList.remove("running");
    this.element.classList.add("waiting");
    this.state.textContent = "Needs approval";
    this.approval?.remove();
    const until = this.expiresAt
      ? ` It waits until ${new Date(this.expiresAt).toLocaleTimeString([], {
          hour: "2-digit",
          minute: "2-digit",
        })}.`
      : "";
    const question = h("p", { className: "tool-ask" }, `Run ${tool}? Nothing has run yet.${until}`);
    if (!send) {
      this.approval = h(
        "div",
        { className: "tool-approval" },
        question,
        h("p", { className: "tool-note" }, "Answer it where this chat was started."),
      );
      this.element.insertBefore(this.approval, this.note);
      return;
    }
    const reason = h("input", {
      type: "text",
      className: "tool-reason",
      maxLength: 2000,
      placeholder: "Reason, if you decline (optional)",
      "aria-label": "Reason for declining (optional)",
    });
    const approve = h("button", { type: "button", className: "button primary" }, "Approve");
    const decline = h("button", { type: "button", className: "button decline" }, "Decline");
    const trouble = h("p", { className: "tool-trouble", role: "alert" });
    const answer = async (approved) => {
      approve.disabled = decline.disabled = reason.disabled = true;
      trouble.textContent = "";
      // Its result may come before the reply does.
      this.choice = approved ? "approved" : "declined";
      try {
        await send(approved, approved ? null : reason.value.trim() || null);
      } catch (error) {
        this.choice = null;
        if (error.code === "APPROVAL_ANSWERED" || error.code === "APPROVAL_NOT_FOUND") {
          // Answered elsewhere (another tab, the terminal), expired, or its run is gone.
          this.settleAsking();
          this.element.classList.remove("waiting");
          this.state.textContent = "Answered";
          this.showNote("This call was already answered, or its time ran out.");
          return;
        }
        approve.disabled = decline.disabled = reason.disabled = false;
        trouble.textContent = `Your answer was not sent: ${error.message}. Try again.`;
        return;
      }
      if (this.finished) return;
      if (approved) this.approved();
      else this.refused("declined", "Declined — the assistant is told.");
    };
    approve.addEventListener("click", () => answer(true));
    decline.addEventListener("click", () => answer(false));
    reason.addEventListener("keydown", (event) => {
      // Enter in the reason box declines (never approves by accident).
      if (event.key === "Enter" && !event.isComposing) {
        event.preventDefault();
        answer(false);
      }
    });
    this.approval = h(
      "div",
      { className: "tool-approval", role: "group", "aria-label": `Approve ${tool}?` },
      question,
      h("div", { className: "tool-actions" }, reason, approve, decline),
      trouble,
    );
    this.element.insertBefore(this.approval, this.note);
  }

  settleAsking() {
    this.waiting = false;
    this.approval?.remove();
    this.approval = null;
  }

  approved() {
    this.settleAsking();
    this.verdict = "approved";
    this.element.classList.remove("waiting");
    this.element.classList.add("running");
    this.state.textContent = "Running";
    if (!this.line.textContent) this.line.textContent = "Approved — running…";
  }

  /** It will not run (`verdict`: declined, expired, cancelled); its result may follow. */
  refused(verdict, why) {
    this.settleAsking();
    this.verdict = verdict;
    this.meter.hidden = true;
    this.element.classList.remove("waiting", "running");
    this.element.classList.add("refused", verdict);
    this.state.textContent = VERDICTS[verdict] ?? "Not run";
    if (why) this.showNote(why);
  }

  showNote(text) {
    this.note.textContent = text;
    this.note.hidden = false;
  }

  progress(message, fraction) {
    if (this.waiting) this.approved(); // answered elsewhere: it runs
    this.line.textContent = message;
    if (typeof fraction === "number") {
      const percent = Math.round(Math.min(1, Math.max(0, fraction)) * 100);
      this.meter.hidden = false;
      this.meter.setAttribute("aria-valuenow", String(percent));
      this.fill.style.width = `${percent}%`;
    }
  }

  /** The call's result; `approval` (from the stored session) says how it was answered. */
  result(text, isError, approval) {
    const verdict =
      approval ?? this.verdict ?? (this.waiting ? (this.choice ?? this.unanswered()) : null);
    this.settleAsking();
    this.finished = true;
    this.meter.hidden = true;
    this.output.textContent = text;
    this.output.hidden = false;
    if (isError && verdict && verdict !== "approved") {
      // It did not run: say why, not "Failed" (the result is what the model was told).
      if (this.verdict !== verdict || !this.element.classList.contains("refused")) {
        this.refused(verdict, null);
      }
      return;
    }
    this.element.classList.remove("running", "waiting");
    this.element.classList.add(isError ? "failed" : "ok");
    this.state.textContent = isError ? "Failed" : "Done";
  }

  /** Why a call that waited got a refusal without an answer from here. */
  unanswered() {
    // Its time ran out, or someone declined it elsewhere (another tab, the terminal).
    return this.expiresAt !== null && Date.now() >= this.expiresAt - 2000 ? "expired" : "declined";
  }

  stop() {
    this.finished = true;
    this.meter.hidden = true;
    if (this.waiting) {
      this.refused("cancelled", "Not run: the answer was stopped before anyone said yes.");
      return;
    }
    this.element.classList.remove("running");
    this.element.classList.add("stopped");
    this.state.textContent = "Stopped";
  }
}

/**
 * A tool's name as parts: an MCP tool's `<server>__` prefix (up to 64 characters
 * with the tool's own name) is set apart, with a place to break the line after it,
 * so the tool's own name stands out and a long name wraps instead of pushing the
 * card's state off a phone's screen. The text stays the name the model called.
 */
function nameParts(tool) {
  const cut = tool.indexOf("__");
  if (cut <= 0 || cut + 2 >= tool.length) return [tool];
  return [
    h("span", { className: "tool-server" }, tool.slice(0, cut + 2)),
    h("wbr"),
    tool.slice(cut + 2),
  ];
}

function formatArgs(args) {
  return Object.entries(args)
    .map(([name, value]) => `${name}: ${JSON.stringify(value)}`)
    .join(", ");
}

/**
 * Render stored messages (GET /api/chat/sessions/{id}) into `log`; returns the answers.
 *
 * A call stored as `approval: "pending"` (its turn was parked by a server restart)
 * gets its buttons back, answered in the run the call names (`runId`), or else the one
 * `runOf(callId)` remembers; `answer` is AnswerView's.
 */
export function renderHistory(log, messages, { answer: send = null, runOf = () => null } = {}) {
  const answers = [];
  let answer = null;
  for (const message of messages) {
    if (message.role === "user") {
      answer?.finish();
      answer = null;
      log.append(userMessage(message.content));
      continue;
    }
    if (answer === null) {
      answer = new AnswerView({ answer: send });
      answers.push(answer);
      log.append(answer.element);
    }
    if (message.role === "tool") {
      answer.toolResult({
        id: message.toolCallId,
        tool: message.tool,
        result: message.content,
        isError: Boolean(message.isError),
        approval: message.approval,
      });
    } else {
      answer.text(message.content);
      for (const call of message.toolCalls ?? []) {
        answer.toolCall(call);
        if (call.approval === "pending") {
          answer.approvalRequired(call, call.runId ?? runOf(call.id));
        }
      }
      if (message.interrupted) {
        answer.finish({ interrupted: true });
        answer = null;
      }
    }
  }
  answer?.finish();
  return answers;
}
