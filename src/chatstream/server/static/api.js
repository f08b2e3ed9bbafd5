// The server's HTTP API as the page uses it: JSON calls, and one run's event stream.

const EVENT_TYPES = [
  "token",
  "tool_call",
  "approval_required",
  "tool_progress",
  "tool_result",
  "done",
  "error",
];

/** An error the server answered with `{"error": {code, message}}`. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// The API key, when the server wants one. Kept per tab (sessionStorage), not on disk.
const KEY_ITEM = "chatstream.apiKey";
let apiKey = sessionStorage.getItem(KEY_ITEM) ?? "";

export const hasApiKey = () => apiKey !== "";

export function setApiKey(key) {
  apiKey = key;
  sessionStorage.setItem(KEY_ITEM, key);
}

async function call(method, path, body = undefined) {
  const headers = { Accept: "application/json" };
  if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const json = body === undefined ? undefined : JSON.stringify(body);
  const response = await fetch(path, { method, headers, body: json });
  const answer = await response.json().catch(() => null);
  if (!response.ok) {
    const error = answer?.error ?? {};
    throw new ApiError(
      response.status,
      error.code ?? `HTTP_${response.status}`,
      error.message ?? response.statusText,
    );
  }
  return answer;
}

export const listSessions = () => call("GET", "/api/chat/sessions?limit=100");
export const getSession = (id) => call("GET", `/api/chat/sessions/${encodeURIComponent(id)}`);
export const cancelRun = (runId) =>
  call("POST", `/api/chat/runs/${encodeURIComponent(runId)}/cancel`);

/** Answer a tool call waiting for approval: `{runId, callId, approved, state, continuedRunId?}`. */
export function answerApproval(runId, callId, { approved, reason = null }) {
  const path = `/api/chat/runs/${encodeURIComponent(runId)}/approvals/${encodeURIComponent(callId)}`;
  return call("POST", path, reason ? { approved, reason } : { approved });
}

/** A session id made here, so the page knows it before the first event arrives. */
export function newSessionId() {
  // getRandomValues, unlike randomUUID, also works on plain http:// beyond localhost.
  const bytes = crypto.getRandomValues(new Uint8Array(8));
  return "s_" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

export function turnUrl(message, sessionId, enableTools) {
  return streamUrl({ message, sessionId, enableTools: String(enableTools) });
}

export function resumeUrl(runId, afterSeq) {
  return streamUrl({ lastEventId: `${runId}:${afterSeq}` });
}

function streamUrl(params) {
  // EventSource cannot send an Authorization header; the server takes the key here too.
  if (apiKey) params.access_token = apiKey;
  return `/api/chat/stream?${new URLSearchParams(params)}`;
}

/**
 * Follow one run over an EventSource.
 *
 * EventSource reconnects by itself after a drop and sends `Last-Event-ID`, so
 * the server replays what was missed. A replay may overlap what already
 * arrived, so frames with a seq at or below the last one seen are dropped:
 * no text is shown twice. `handlers`:
 *   event(type, data, {runId, seq})  every new event, in order;
 *   open()                           connected (again);
 *   reconnecting()                   the connection dropped; the browser retries;
 *   lost({runId, lastSeq})           the stream closed before a terminal event
 *                                    (refused with a 4xx, or 204: nothing left).
 */
export function follow(url, handlers, { runId = null, afterSeq = 0 } = {}) {
  const source = new EventSource(url);
  let lastSeq = afterSeq;
  let ended = false;

  const end = () => {
    ended = true;
    source.close();
  };

  const onFrame = (frame) => {
    const cut = frame.lastEventId.lastIndexOf(":");
    const frameRun = frame.lastEventId.slice(0, cut);
    const seq = Number(frame.lastEventId.slice(cut + 1));
    if (runId !== null && frameRun !== runId) return; // not the run this view follows
    if (seq <= lastSeq) return; // already shown before a reconnect
    runId = frameRun;
    lastSeq = seq;
    const data = JSON.parse(frame.data);
    // Close on the terminal event ourselves: otherwise the browser reconnects,
    // only to be told 204.
    if (frame.type === "done" || frame.type === "error") end();
    handlers.event(frame.type, data, { runId, seq });
  };

  for (const type of EVENT_TYPES) {
    source.addEventListener(type, (frame) => {
      // "error" is both the server's event and EventSource's own connection
      // failure; only the server's carries data.
      if (frame instanceof MessageEvent) onFrame(frame);
      else if (!ended) connectionTrouble();
    });
  }

  source.addEventListener("open", () => handlers.open());

  function connectionTrouble() {
    if (source.readyState === EventSource.CONNECTING) {
      handlers.reconnecting();
    } else {
      end();
      handlers.lost({ runId, lastSeq });
    }
  }

  return {
    close: end,
    get runId() {
      return runId;
    },
  };
}
