"""The official OpenAI Python SDK against the llm_proxy example, unmodified.

Run by scripts/sdk-check.sh, which starts the example and passes its base URL in
TOWER402_LLM_URL. Checks completions, streaming, that a 402 surfaces as an API error with
the code and the problem document, and that a 409 for a reused Idempotency-Key is sent once
(the SDK obeys `x-should-retry: false`): every request goes through a counting httpx hook.
"""
import os
import sys

import time
import uuid

import openai
from openai import OpenAI

base_url = os.environ["TOWER402_LLM_URL"]
pro = OpenAI(base_url=base_url, api_key="demo-pro", max_retries=0)
broke = OpenAI(base_url=base_url, api_key="demo-broke", max_retries=0)
failures = []
passed = []


def check(name, ok, detail=""):
    print(("ok   " if ok else "FAIL ") + name + ("" if ok else f": {detail}"))
    (passed if ok else failures).append(name)


models = [m.id for m in pro.models.list()]
check("models.list", sorted(models) == ["large-model", "small-model"], models)

r = pro.chat.completions.create(
    model="large-model",
    max_tokens=200,
    messages=[{"role": "user", "content": "hello there"}],
)
check("completion text", r.choices[0].message.content == "You said: hello there", r)
check("completion usage", (r.usage.prompt_tokens, r.usage.completion_tokens) == (9, 3), r.usage)

stream = pro.chat.completions.create(
    model="small-model",
    stream=True,
    stream_options={"include_usage": True},
    messages=[{"role": "user", "content": "stream please"}],
)
text, usage = "", None
for chunk in stream:
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
    if chunk.usage:
        usage = chunk.usage
check("stream text", text == "You said: stream please", text)
check("stream usage", usage is not None and usage.completion_tokens == 3, usage)

try:
    broke.chat.completions.create(
        model="small-model", messages=[{"role": "user", "content": "hi"}]
    )
    check("402 raises", False, "no exception")
except openai.APIStatusError as e:
    check("402 status", e.status_code == 402, e.status_code)
    # The SDK's `body` is the `error` member when there is one; the response is the problem.
    doc = e.response.json()
    check("402 e.code", e.code == "INSUFFICIENT_CREDITS", e.code)
    check("402 the SDK shows the detail", "balance is 0" in str(e), str(e))
    check("402 body is the problem document", doc.get("code") == "INSUFFICIENT_CREDITS", doc)
    check("402 problem type", str(doc.get("type", "")).endswith("/insufficient-credits"), doc)
    check(
        "402 error member",
        (doc.get("error") or {}).get("code") == "INSUFFICIENT_CREDITS",
        doc.get("error"),
    )
    check(
        "402 content type",
        e.response.headers.get("content-type") == "application/problem+json",
        e.response.headers.get("content-type"),
    )

sent = []
counted = OpenAI(
    base_url=base_url,
    api_key="demo-pro",
    max_retries=2,
    http_client=openai.DefaultHttpxClient(event_hooks={"request": [sent.append]}),
)
key = f"python-sdk-{uuid.uuid4()}"


def chat(content):
    return counted.chat.completions.create(
        model="small-model",
        messages=[{"role": "user", "content": content}],
        extra_headers={"Idempotency-Key": key},
    )


chat("first")
sent.clear()
started = time.monotonic()
try:
    chat("second, different")
    check("409 raises", False, "no exception")
except openai.ConflictError as e:
    check("409 code", e.code == "IDEMPOTENCY_KEY_REUSED", e.body)
    check("409 is sent once", len(sent) == 1, len(sent))
    check("409 comes back at once", time.monotonic() - started < 0.4, time.monotonic() - started)

try:
    pro.chat.completions.create(model="gpt-99", messages=[{"role": "user", "content": "hi"}])
    check("unknown model raises", False, "no exception")
except openai.BadRequestError as e:
    check("unknown model is 400 UNKNOWN_MODEL", e.body.get("code") == "UNKNOWN_MODEL", e.body)

try:
    OpenAI(base_url=base_url, api_key="nope", max_retries=0).models.list()
    check("bad key raises", False, "no exception")
except openai.AuthenticationError as e:
    check("bad key is 401", e.status_code == 401, e.status_code)

print(f"sdk: {len(passed)} passed, {len(failures)} failed")
sys.exit(1 if failures else 0)
