// Drives chatstream's AG-UI endpoint with @ag-ui/client's HttpAgent (its event
// verification and schema checks are always on).
import { HttpAgent } from "@ag-ui/client";
import { cancel, done, scenario } from "./common.mjs";

const url = `${scenario.url}/api/agui`;

function agent() {
  return new HttpAgent({ url, threadId: scenario.threadId });
}

// One runAgent call: the events in order, the agent's messages after it, and how it ended.
async function runOnce(client, parameters, { onEvent } = {}) {
  const events = [];
  const result = { events };
  try {
    await client.runAgent(parameters, {
      onEvent: async ({ event }) => {
        events.push(event);
        if (onEvent) await onEvent(event, events);
      },
      onRunFailed: ({ error }) => {
        result.failed = error.message;
      },
    });
  } catch (error) {
    result.error = error.message;
  }
  result.messages = structuredClone(client.messages);
  result.pendingInterrupts = structuredClone(client.pendingInterrupts);
  return result;
}

async function run() {
  const client = agent();
  client.addMessage({ id: `u-${Date.now()}`, role: "user", content: scenario.text });
  let deltas = 0;
  let runId;
  let cancelStatus;
  const first = await runOnce(client, {}, {
    onEvent: async (event) => {
      if (event.type === "RUN_STARTED") runId = event.runId;
      if (event.type !== "TEXT_MESSAGE_CONTENT") return;
      deltas += 1;
      if (deltas === scenario.stopAfterDeltas) cancelStatus = await cancel(runId);
      if (deltas === scenario.dropAfterDeltas) client.abortRun();
    },
  });
  const result = { ...first, runId, cancelStatus };
  if (scenario.dropAfterDeltas) {
    // A new agent asks for the run by its id: the server replays it from its start.
    result.replayed = await runOnce(agent(), { runId });
  }
  return result;
}

async function approve() {
  const client = agent();
  client.addMessage({ id: `u-${Date.now()}`, role: "user", content: scenario.text });
  const first = await runOnce(client, {});
  const resume = client.pendingInterrupts.map((interrupt) => ({
    interruptId: interrupt.id,
    status: "resolved",
    payload: { approved: scenario.approved, reason: scenario.reason },
  }));
  const second = await runOnce(client, { resume });
  return { first, second };
}

const scenarios = { run, approve };
done(await scenarios[scenario.name]());
