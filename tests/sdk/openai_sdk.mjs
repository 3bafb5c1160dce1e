// The official OpenAI Node SDK against the llm_proxy example, unmodified.
//
// Run by scripts/sdk-check-node.sh, which installs the pinned SDK, starts the example and
// passes its base URL in TOWER402_LLM_URL. Checks that a 402 surfaces the problem (`e.error`
// with the code and the detail, not "402 status code (no body)"), and that a 409 for a
// reused Idempotency-Key is sent once, not retried: every request the SDK sends goes through
// a counting `fetch`.
import OpenAI from "openai";

const baseURL = process.env.TOWER402_LLM_URL;
let sent = 0;
const countingFetch = (url, init) => {
  sent += 1;
  return fetch(url, init);
};
const client = (apiKey, maxRetries = 2) =>
  new OpenAI({ baseURL, apiKey, maxRetries, fetch: countingFetch });

const passed = [];
const failures = [];
function check(name, ok, detail = "") {
  console.log((ok ? "ok   " : "FAIL ") + name + (ok ? "" : `: ${JSON.stringify(detail)}`));
  (ok ? passed : failures).push(name);
}

async function refused(promise) {
  try {
    await promise;
    return null;
  } catch (e) {
    return e;
  }
}

const pro = client("demo-pro");
const models = (await pro.models.list()).data.map((m) => m.id).sort();
check("models.list", JSON.stringify(models) === '["large-model","small-model"]', models);

const r = await pro.chat.completions.create({
  model: "large-model",
  max_tokens: 200,
  messages: [{ role: "user", content: "hello there" }],
});
check("completion text", r.choices[0].message.content === "You said: hello there", r);

// A 402: one request, even with retries allowed, and the problem shown.
sent = 0;
let e = await refused(
  client("demo-broke").chat.completions.create({
    model: "small-model",
    messages: [{ role: "user", content: "hi" }],
  }),
);
check("402 raises an APIError", e instanceof OpenAI.APIError, String(e));
check("402 status", e?.status === 402, e?.status);
check("402 e.error is defined", e?.error !== undefined, e?.message);
check("402 e.error.code", e?.error?.code === "INSUFFICIENT_CREDITS", e?.error);
check("402 e.code", e?.code === "INSUFFICIENT_CREDITS", e?.code);
check("402 message has the detail", /balance is 0/.test(e?.message ?? ""), e?.message);
check("402 is not retried", sent === 1, sent);

// A reused Idempotency-Key: the first request is served, the second (another body) is a
// 409 IDEMPOTENCY_KEY_REUSED, sent once.
const key = `node-sdk-${process.pid}-${Date.now()}`;
const chat = (content) =>
  pro.chat.completions.create(
    { model: "small-model", messages: [{ role: "user", content }] },
    { headers: { "Idempotency-Key": key } },
  );
await chat("first");
sent = 0;
const started = Date.now();
e = await refused(chat("second, different"));
check("409 raises ConflictError", e instanceof OpenAI.ConflictError, String(e));
check("409 e.error.code", e?.error?.code === "IDEMPOTENCY_KEY_REUSED", e?.error);
check("409 is sent once", sent === 1, sent);
check("409 comes back at once", Date.now() - started < 400, Date.now() - started);

e = await refused(client("nope", 0).models.list());
check("bad key is 401", e instanceof OpenAI.AuthenticationError, String(e));

console.log(`sdk-node: ${passed.length} passed, ${failures.length} failed`);
process.exit(failures.length ? 1 : 0);
