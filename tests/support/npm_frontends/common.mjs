// Shared by the drivers: read the scenario, note warnings, print one JSON result.
export const scenario = JSON.parse(process.argv[2]);

// A library that strips or repairs what the server sent says so on the console: the
// suite asserts that nothing was said.
export const warnings = [];
for (const level of ["warn", "error"]) {
  const original = console[level];
  console[level] = (...args) => {
    warnings.push(args.map((a) => (a instanceof Error ? a.message : String(a))).join(" "));
    original.apply(console, args);
  };
}

export function done(result) {
  process.stdout.write(JSON.stringify({ ...result, warnings }) + "\n");
}

export async function cancel(runId) {
  const response = await fetch(`${scenario.url}/api/chat/runs/${runId}/cancel`, {
    method: "POST",
  });
  return response.status;
}

export async function until(check, what, timeoutMs = 15000) {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}
