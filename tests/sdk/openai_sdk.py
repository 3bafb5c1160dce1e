"""The official OpenAI Python SDK against the llm_proxy example, unmodified.

Run by scripts/sdk-check.sh, which starts the example and passes its base URL in
TOWER402_LLM_URL. Checks completions, streaming, that a 402 surfaces as an API error with
the code and the problem document, and that a 409 for a reused Idempotency-Key is sent once
(the SDK obeys `x-should-retry: false`): every request goes through a counting httpx hook.
Also `responses.create` (plain and `stream=True`) on `/v1/responses`, and that what each
Responses call cost (the balance before and after, from the example's `GET /v1/balance`) is
its `usage` priced by the example's table.
"""
import json
import math
import os
import sys
import time
import urllib.request
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

# The example's prices (examples/llm_proxy.rs, `prices()`): credits per 1,000 input and
# output tokens. Each meter's part is rounded up on its own.
PRICES = {"small-model": (1, 2), "large-model": (10, 30)}


def balance():
    """demo-pro's balance once nothing is held (a stream settles as it ends)."""
    deadline = time.monotonic() + 5
    while True:
        req = urllib.request.Request(
            f"{base_url}/balance", headers={"Authorization": "Bearer demo-pro"}
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            doc = json.load(r)
        if doc["held"] == 0 or time.monotonic() > deadline:
            return doc["balance"]
        time.sleep(0.02)


def cost(model, usage):
    price_in, price_out = PRICES[model]
    # No cache and no reasoning in the stand-in: this formula needs both to be zero.
    assert usage.input_tokens_details.cached_tokens == 0, usage
    assert usage.output_tokens_details.reasoning_tokens == 0, usage
    return math.ceil(usage.input_tokens * price_in / 1000) + math.ceil(
        usage.output_tokens * price_out / 1000
    )


r = pro.responses.create(model="small-model", input="hi responses", max_output_tokens=50)
check("responses text", r.output_text == "You said: hi responses", r)
check("responses status", r.status == "completed", r.status)
check("responses usage", (r.usage.input_tokens, r.usage.output_tokens) == (9, 3), r.usage)

# 150 words: enough tokens that the charge follows the usage, far below the 1,000
# `max_output_tokens` the estimate holds (30 credits of output alone).
words = " ".join(f"word{i}" for i in range(150))
before = balance()
r = pro.responses.create(model="large-model", input=words, max_output_tokens=1000)
charged = before - balance()
check("responses usage (150 words)", (r.usage.input_tokens, r.usage.output_tokens) == (157, 151),
      r.usage)
check("responses charged its usage priced", charged == cost("large-model", r.usage) == 7,
      (charged, cost("large-model", r.usage)))

before = balance()
stream = pro.responses.create(
    model="large-model",
    instructions="be brief",
    input=[{"role": "user", "content": words}],
    max_output_tokens=1000,
    stream=True,
)
kinds, text, done = [], "", None
for event in stream:
    kinds.append(event.type)
    if event.type == "response.output_text.delta":
        text += event.delta
    if event.type == "response.completed":
        done = event.response
charged = before - balance()
check("responses stream text", text == "You said: " + words, text[:60])
check("responses stream events", kinds[0] == "response.created"
      and kinds[-1] == "response.completed" and "response.output_text.done" in kinds, kinds)
check("responses stream completed", done is not None and done.output_text == text, done)
usage = done.usage if done else None
check("responses stream usage", usage is not None
      and (usage.input_tokens, usage.output_tokens) == (163, 151), usage)
check("responses stream charged its usage priced",
      usage is not None and charged == cost("large-model", usage),
      (charged, usage and cost("large-model", usage)))

r = pro.responses.create(model="small-model", input="a b c d e f", max_output_tokens=3)
check("responses cut at max_output_tokens",
      r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
      and r.usage.output_tokens == 3, r)

try:
    OpenAI(base_url=base_url, api_key="demo-basic", max_retries=0).responses.create(
        model="large-model", input="hi"
    )
    check("responses basic/large-model raises", False, "no exception")
except openai.APIStatusError as e:
    doc = e.response.json()
    check("responses 402 PLAN_UPGRADE_REQUIRED",
          e.status_code == 402 and e.code == "PLAN_UPGRADE_REQUIRED"
          and (doc.get("model"), doc.get("current_plan"), doc.get("required_plan"))
          == ("large-model", "basic", "pro"), doc)

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
