// How a conversation looks: user messages, answers, tool cards.
//
// Text from the model, tools or the user enters the page only as text nodes
// (`h` appends strings as text, and Markdown goes through renderMarkdown, which
// does the same), so none of it can become markup.

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

/** One answer: text segments and tool cards in the order they came, then how it ended. */
export class AnswerView {
  constructor() {
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

  toolCall({ id, tool, args }) {
    this.segment = null;
    const card = new ToolCard(tool, args);
    this.tools.set(id, card);
    this.body.append(card.element);
    this.showTyping(false);
  }

  toolProgress({ id, message, progress }) {
    this.tools.get(id)?.progress(message, progress);
  }

  toolResult({ id, tool, result, isError }) {
    let card = this.tools.get(id);
    if (!card) {
      // A stored tool message whose call was not shown: still show what it said.
      card = new ToolCard(tool ?? "tool", null);
      this.body.append(card.element);
    }
    card.result(result, isError);
    // Every tool has answered: the model is thinking about what they said.
    if ([...this.tools.values()].every((c) => c.finished)) this.showTyping(true);
  }

  showTyping(on) {
    this.typing.hidden = !on;
  }

  /** The answer ended: normally, stopped (`interrupted`), or with an `error`. */
  finish({ interrupted = false, stopped = false, error = null } = {}) {
    this.render();
    this.showTyping(false);
    this.element.setAttribute("aria-busy", "false");
    for (const card of this.tools.values()) if (!card.finished) card.stop();
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

class ToolCard {
  constructor(tool, args) {
    this.finished = false;
    this.state = h("span", { className: "tool-state" }, "Running");
    this.line = h("p", { className: "tool-progress" });
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
      this.output,
    );
  }

  progress(message, fraction) {
    this.line.textContent = message;
    if (typeof fraction === "number") {
      const percent = Math.round(Math.min(1, Math.max(0, fraction)) * 100);
      this.meter.hidden = false;
      this.meter.setAttribute("aria-valuenow", String(percent));
      this.fill.style.width = `${percent}%`;
    }
  }

  result(text, isError) {
    this.finished = true;
    this.meter.hidden = true;
    this.element.classList.remove("running");
    this.element.classList.add(isError ? "failed" : "ok");
    this.state.textContent = isError ? "Failed" : "Done";
    this.output.textContent = text;
    this.output.hidden = false;
  }

  stop() {
    this.finished = true;
    this.meter.hidden = true;
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

/** Render stored messages (GET /api/chat/sessions/{id}) into `log`. */
export function renderHistory(log, messages) {
  let answer = null;
  for (const message of messages) {
    if (message.role === "user") {
      answer?.finish();
      answer = null;
      log.append(userMessage(message.content));
      continue;
    }
    if (answer === null) {
      answer = new AnswerView();
      log.append(answer.element);
    }
    if (message.role === "tool") {
      answer.toolResult({
        id: message.toolCallId,
        tool: message.tool,
        result: message.content,
        isError: Boolean(message.isError),
      });
    } else {
      answer.text(message.content);
      for (const call of message.toolCalls ?? []) answer.toolCall(call);
      if (message.interrupted) {
        answer.finish({ interrupted: true });
        answer = null;
      }
    }
  }
  answer?.finish();
}
