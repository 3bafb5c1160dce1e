"""The official Anthropic Python SDK against the llm_proxy example, unmodified.

Run by scripts/sdk-check-anthropic.sh, which starts the example and passes its base URL (no
`/v1`: the SDK adds it) in TOWER402_LLM_BASE. Checks `messages.create`, `messages.stream`
and `stream=True`, that what each completion cost (the balance before and after, from the
example's `GET /v1/balance`) is its `usage` priced by the example's table, a free plan's
token allowance, and that 402s surface as API errors carrying the problem's code.
"""
import json
import math
import os
import sys
import time
import urllib.request

import anthropic
from anthropic import Anthropic

base = os.environ["TOWER402_LLM_BASE"]
# The example's prices (examples/llm_proxy.rs, `prices()`): credits per 1,000 input and
# output tokens. Each meter's part is rounded up on its own.
PRICES = {"small-model": (1, 2), "large-model": (10, 30)}
PER = 1000
failures = []
passed = []


def check(name, ok, detail=""):
    print(("ok   " if ok else "FAIL ") + name + ("" if ok else f": {detail}"))
    (passed if ok else failures).append(name)


def client(key):
    return Anthropic(base_url=base, api_key=key, max_retries=0)


def balance(key):
    """The example's balance document once nothing is held (a stream settles as it ends)."""
    deadline = time.monotonic() + 5
    while True:
        req = urllib.request.Request(f"{base}/v1/balance", headers={"x-api-key": key})
        with urllib.request.urlopen(req, timeout=5) as r:
            doc = json.load(r)
        if doc["held"] == 0 or time.monotonic() > deadline:
            return doc
        time.sleep(0.02)


def cost(model, usage):
    price_in, price_out = PRICES[model]
    # No cache in the stand-in: cached reads and writes must be zero for this formula.
    assert not usage.cache_read_input_tokens and not usage.cache_creation_input_tokens, usage
    return math.ceil(usage.input_tokens * price_in / PER) + math.ceil(
        usage.output_tokens * price_out / PER
    )


pro = client("demo-pro")
# 150 words: enough tokens that the charge follows the usage, and far below the 1,000
# `max_tokens` the estimate holds (30 credits of output alone).
words = " ".join(f"word{i}" for i in range(150))

m = pro.messages.create(
    model="small-model",
    max_tokens=100,
    messages=[{"role": "user", "content": "hi claude"}],
)
check("create text", m.content[0].text == "You said: hi claude", m)
check("create stop_reason", m.stop_reason == "end_turn", m.stop_reason)
check("create usage", (m.usage.input_tokens, m.usage.output_tokens) == (9, 3), m.usage)

before = balance("demo-pro")["balance"]
m = pro.messages.create(
    model="large-model", max_tokens=1000, messages=[{"role": "user", "content": words}]
)
after = balance("demo-pro")
charged = before - after["balance"]
check("create usage (150 words)", (m.usage.input_tokens, m.usage.output_tokens) == (157, 151),
      m.usage)
check("create charged its usage priced", charged == cost("large-model", m.usage) == 7,
      (charged, cost("large-model", m.usage)))
check("create holds nothing after", after["held"] == 0, after)

before = balance("demo-pro")["balance"]
with pro.messages.stream(
    model="large-model", max_tokens=1000, messages=[{"role": "user", "content": words}]
) as stream:
    text = "".join(stream.text_stream)
    final = stream.get_final_message()
charged = before - balance("demo-pro")["balance"]
check("stream text", text == "You said: " + words, text[:60])
check("stream final message", final.content[0].text == text and final.stop_reason == "end_turn",
      final)
check("stream usage (message_start + message_delta)",
      (final.usage.input_tokens, final.usage.output_tokens) == (157, 151), final.usage)
check("stream charged its usage priced", charged == cost("large-model", final.usage),
      (charged, cost("large-model", final.usage)))

events = [
    e.type
    for e in pro.messages.create(
        model="small-model",
        max_tokens=2,
        messages=[{"role": "user", "content": "cut me short please"}],
        stream=True,
    )
]
check(
    "stream=True events",
    events
    == ["message_start", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop"],
    events,
)

# demo-free: no credit, 200 output tokens a month; the allowance pays, then 402.
free = client("demo-free")
m = free.messages.create(
    model="small-model", max_tokens=100, messages=[{"role": "user", "content": "free words"}]
)
doc = balance("demo-free")
used = {a["meter"]: a["used"] for a in doc["allowances"]}
check("free: served from the allowance", m.content[0].text == "You said: free words", m)
check("free: allowance used is the usage",
      used == {"output_tokens": m.usage.output_tokens, "input_tokens": m.usage.input_tokens}
      and doc["balance"] == 0, doc)
m = free.messages.create(
    model="small-model",
    max_tokens=1000,
    messages=[{"role": "user", "content": " ".join(f"word{i}" for i in range(300))}],
)
check("free: output capped at the allowance left",
      m.usage.output_tokens == 200 - used["output_tokens"] and m.stop_reason == "max_tokens",
      m.usage)


def refused(name, key, model, code, fields):
    try:
        client(key).messages.create(
            model=model, max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )
        check(name + " raises", False, "no exception")
    except anthropic.APIStatusError as e:
        check(name + " is PaymentRequiredError 402",
              isinstance(e, anthropic.PaymentRequiredError) and e.status_code == 402,
              (type(e), e.status_code))
        body = e.body if isinstance(e.body, dict) else {}
        check(name + " code " + code, body.get("code") == code, e.body)
        check(name + " fields", all(body.get(k) == v for k, v in fields.items()), e.body)
        check(name + " the SDK shows the code", code in str(e), str(e))
        check(
            name + " content type",
            e.response.headers.get("content-type") == "application/problem+json",
            e.response.headers.get("content-type"),
        )


refused("free after the allowance", "demo-free", "small-model", "QUOTA_EXCEEDED",
        {"meter": "output_tokens", "limit": 200, "used": 200})
refused("basic asks large-model", "demo-basic", "large-model", "PLAN_UPGRADE_REQUIRED",
        {"model": "large-model", "current_plan": "basic", "required_plan": "pro"})
refused("broke", "demo-broke", "small-model", "INSUFFICIENT_CREDITS", {"balance": 0})

try:
    pro.messages.create(model="claude-99", max_tokens=10,
                        messages=[{"role": "user", "content": "hi"}])
    check("unknown model raises", False, "no exception")
except anthropic.BadRequestError as e:
    check("unknown model is 400 UNKNOWN_MODEL", e.body.get("code") == "UNKNOWN_MODEL", e.body)

try:
    client("nope").messages.create(model="small-model", max_tokens=10,
                                   messages=[{"role": "user", "content": "hi"}])
    check("bad key raises", False, "no exception")
except anthropic.AuthenticationError as e:
    check("bad key is 401", e.status_code == 401, e.status_code)

print(f"anthropic sdk {anthropic.__version__}: {len(passed)} passed, {len(failures)} failed")
sys.exit(1 if failures else 0)
