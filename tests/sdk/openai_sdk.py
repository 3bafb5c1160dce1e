"""The official OpenAI Python SDK against the llm_proxy example, unmodified.

Run by scripts/sdk-check.sh, which starts the example and passes its base URL in
TOWER402_LLM_URL. Checks completions, streaming, and that a 402 surfaces as an API error
whose body is the problem document.
"""
import os
import sys

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
    body = e.body if isinstance(e.body, dict) else {}
    check("402 body is the problem document", body.get("code") == "INSUFFICIENT_CREDITS", e.body)
    check("402 problem type", str(body.get("type", "")).endswith("/insufficient-credits"), body)
    check(
        "402 content type",
        e.response.headers.get("content-type") == "application/problem+json",
        e.response.headers.get("content-type"),
    )

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
