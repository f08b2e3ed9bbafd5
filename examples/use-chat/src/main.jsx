// A chat page on useChat: chatstream runs the model and the tools, and keeps the history.
// Open index.html?server=http://127.0.0.1:3002 (the server lists this page's origin in
// CHATSTREAM_CORS_ORIGINS), or serve it from the same origin and leave `server` out.
import { useChat } from "@ai-sdk/react";
import { DefaultChatTransport, lastAssistantMessageIsCompleteWithApprovalResponses } from "ai";
import { useState } from "react";
import { createRoot } from "react-dom/client";

const server = new URLSearchParams(location.search).get("server") ?? "";
const transport = new DefaultChatTransport({
  api: `${server}/api/ui/chat`,
  // The server keeps the history: send only the new message (or the approval answer).
  prepareSendMessagesRequest: ({ id, messages, trigger, messageId }) => ({
    body: { id, messages: messages.slice(-1), trigger, messageId },
  }),
});

function Tool({ part, progress, onAnswer }) {
  const name = part.type.slice("tool-".length);
  return (
    <div className="tool" data-state={part.state}>
      <div>
        <strong>{name}</strong> <code>{JSON.stringify(part.input)}</code>
      </div>
      {progress && part.state === "input-available" && (
        <div className="progress">
          {progress.message}
          {progress.progress != null && ` (${Math.round(progress.progress * 100)}%)`}
        </div>
      )}
      {part.state === "approval-requested" && (
        <div>
          <button onClick={() => onAnswer(part.approval.id, true)}>Approve</button>
          <button onClick={() => onAnswer(part.approval.id, false)}>Decline</button>
        </div>
      )}
      {part.state === "output-available" && <div className="result">{String(part.output)}</div>}
      {part.state === "output-error" && <div className="result error">{part.errorText}</div>}
    </div>
  );
}

function Message({ message, onAnswer }) {
  // data-tool-progress parts hold each call's latest step, by the call's id.
  const progress = Object.fromEntries(
    message.parts.filter((p) => p.type === "data-tool-progress").map((p) => [p.id, p.data]),
  );
  return (
    <div className="message" data-role={message.role}>
      {message.parts.map((part, index) => {
        if (part.type === "text") return <p className="text" key={index}>{part.text}</p>;
        if (part.type.startsWith("tool-")) {
          return (
            <Tool key={index} part={part} progress={progress[part.toolCallId]} onAnswer={onAnswer} />
          );
        }
        return null;
      })}
    </div>
  );
}

function App() {
  const [input, setInput] = useState("");
  const { messages, sendMessage, status, stop, error, addToolApprovalResponse } = useChat({
    transport,
    sendAutomaticallyWhen: lastAssistantMessageIsCompleteWithApprovalResponses,
  });
  const busy = status === "submitted" || status === "streaming";
  async function stopRun() {
    // The message id is the run id: the cancel endpoint stops the run on the server too.
    const last = messages.at(-1);
    await stop();
    if (last?.role === "assistant") {
      await fetch(`${server}/api/chat/runs/${last.id}/cancel`, { method: "POST" });
    }
  }
  return (
    <main>
      <h1>chatstream + useChat</h1>
      <div id="log">
        {messages.map((message) => (
          <Message
            key={message.id}
            message={message}
            onAnswer={(id, approved) => addToolApprovalResponse({ id, approved })}
          />
        ))}
      </div>
      {error && <p className="error">{error.message}</p>}
      <form
        onSubmit={(event) => {
          event.preventDefault();
          if (!input.trim()) return;
          sendMessage({ text: input });
          setInput("");
        }}
      >
        <input
          name="message"
          value={input}
          onChange={(event) => setInput(event.target.value)}
          placeholder="Ask about the weather, the time, or some arithmetic"
        />
        {busy ? (
          <button type="button" onClick={stopRun}>Stop</button>
        ) : (
          <button type="submit">Send</button>
        )}
      </form>
      <p id="status" data-status={status}>{status}</p>
    </main>
  );
}

createRoot(document.getElementById("root")).render(<App />);
