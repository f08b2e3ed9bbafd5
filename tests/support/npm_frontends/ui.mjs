// Drives chatstream's UI message stream with the `ai` package: DefaultChatTransport,
// readUIMessageStream, and AbstractChat (what useChat wraps) for approvals and regenerate.
import {
  AbstractChat,
  DefaultChatTransport,
  lastAssistantMessageIsCompleteWithApprovalResponses,
  readUIMessageStream,
} from "ai";
import { cancel, done, scenario, until } from "./common.mjs";

const api = `${scenario.url}/api/ui/chat`;
const transport = new DefaultChatTransport({ api });

function userMessage(text) {
  return { id: `u-${Date.now()}`, role: "user", parts: [{ type: "text", text }] };
}

// Reads a chunk stream to its end: every chunk, the message they build, and the errors.
async function read(stream, { onChunk } = {}) {
  const chunks = [];
  const errors = [];
  const [mine, theirs] = stream.tee();
  const collecting = (async () => {
    const reader = mine.getReader();
    try {
      for (;;) {
        const { value, done: end } = await reader.read();
        if (end) break;
        chunks.push(value);
        if (onChunk) await onChunk(value, chunks);
      }
    } catch (error) {
      errors.push(`stream: ${error.message}`);
    }
  })();
  let message;
  try {
    for await (const snapshot of readUIMessageStream({
      stream: theirs,
      onError: (error) => errors.push(error.message),
    })) {
      message = snapshot;
    }
  } catch (error) {
    errors.push(`read: ${error.message}`);
  }
  await collecting;
  return { chunks, message, errors };
}

async function send() {
  const abort = new AbortController();
  let deltas = 0;
  let runId;
  let cancelStatus;
  const stream = await transport.sendMessages({
    trigger: "submit-message",
    chatId: scenario.chatId,
    messageId: undefined,
    messages: [userMessage(scenario.text)],
    abortSignal: abort.signal,
  });
  const first = await read(stream, {
    onChunk: async (chunk) => {
      if (chunk.type === "start") runId = chunk.messageId;
      if (chunk.type !== "text-delta") return;
      deltas += 1;
      if (deltas === scenario.stopAfterDeltas) cancelStatus = await cancel(runId);
      if (deltas === scenario.dropAfterDeltas) abort.abort();
    },
  });
  const result = { ...first, runId, cancelStatus };
  if (scenario.dropAfterDeltas) {
    const again = await transport.reconnectToStream({ chatId: scenario.chatId });
    result.resumed = again === null ? null : await read(again);
  }
  return result;
}

async function resume() {
  const again = await transport.reconnectToStream({ chatId: scenario.chatId });
  return { resumed: again === null ? null : await read(again) };
}

class State {
  constructor() {
    this.status = "ready";
    this.error = undefined;
    this.messages = [];
  }
  pushMessage(message) {
    this.messages = [...this.messages, message];
  }
  popMessage() {
    this.messages = this.messages.slice(0, -1);
  }
  replaceMessage(index, message) {
    this.messages = [...this.messages.slice(0, index), message, ...this.messages.slice(index + 1)];
  }
  snapshot(thing) {
    return structuredClone(thing);
  }
}

class Chat extends AbstractChat {
  constructor(options) {
    super({ ...options, state: new State() });
  }
}

function parts(chat, state) {
  return chat.messages.flatMap((m) => m.parts).filter((p) => p.state === state);
}

// useChat's approval flow: the stream stops at the request, the person answers each call,
// and the chat sends the answers by itself.
async function approve() {
  const errors = [];
  const chat = new Chat({
    id: scenario.chatId,
    transport,
    sendAutomaticallyWhen: lastAssistantMessageIsCompleteWithApprovalResponses,
    onError: (error) => errors.push(error.message),
  });
  await chat.sendMessage({ text: scenario.text });
  const asked = parts(chat, "approval-requested").map((p) => p.toolCallId);
  const before = structuredClone(chat.messages);
  for (const part of parts(chat, "approval-requested")) {
    await chat.addToolApprovalResponse({
      id: part.approval.id,
      approved: scenario.approved,
      reason: scenario.reason,
    });
  }
  await until(
    () => chat.status === "ready" && parts(chat, "approval-responded").length === 0,
    "the answered approval's stream",
  );
  return { asked, before, messages: chat.messages, status: chat.status, errors };
}

async function regenerate() {
  const errors = [];
  const chat = new Chat({ id: scenario.chatId, transport, onError: (e) => errors.push(e.message) });
  await chat.sendMessage({ text: scenario.text });
  const first = structuredClone(chat.messages);
  await chat.regenerate();
  return { first, messages: chat.messages, status: chat.status, errors };
}

const scenarios = { send, resume, approve, regenerate };
done(await scenarios[scenario.name]());
