#!/usr/bin/env bash
# Runs the official Anthropic Python SDK (tests/sdk/anthropic_sdk.py) against the llm_proxy
# example's `POST /v1/messages`. Installs the SDK into target/sdk-venv-anthropic (pinned; a
# venv holding another version is reinstalled); starts and stops the example by process id.
# If the SDK cannot be installed (no PyPI), says SKIPPED and exits 0, unless
# TOWER402_REQUIRE_SDK=1.
set -euo pipefail
cd "$(dirname "$0")/.."
ANTHROPIC_VERSION=2.16.0
venv=target/sdk-venv-anthropic
installed=$("$venv/bin/python" -c "import anthropic; print(anthropic.__version__)" 2>/dev/null || true)
if [ "$installed" != "$ANTHROPIC_VERSION" ]; then
  if ! { python3 -m venv "$venv" && "$venv/bin/pip" install -q "anthropic==$ANTHROPIC_VERSION"; }; then
    if [ "${TOWER402_REQUIRE_SDK:-0}" = 1 ]; then
      echo "the Anthropic SDK could not be installed" >&2; exit 1
    fi
    echo "SKIPPED: the Anthropic SDK (anthropic==$ANTHROPIC_VERSION) could not be installed" \
      "(PyPI unreachable?); Anthropic SDK check NOT RUN" >&2
    exit 0
  fi
fi
cargo build -q --example llm_proxy
log=$(mktemp)
PORT=0 "${CARGO_TARGET_DIR:-target}/debug/examples/llm_proxy" >"$log" 2>/dev/null &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -f "$log"' EXIT
url=""
for _ in $(seq 1 100); do
  url=$(grep -oE 'http://127\.0\.0\.1:[0-9]+/v1' "$log" || true)
  [ -n "$url" ] && break
  kill -0 $pid 2>/dev/null || { echo "llm_proxy exited" >&2; exit 1; }
  sleep 0.1
done
[ -n "$url" ] || { echo "llm_proxy did not start" >&2; exit 1; }
# The Anthropic SDK takes the server's root and adds /v1/messages itself.
TOWER402_LLM_BASE="${url%/v1}" "$venv/bin/python" tests/sdk/anthropic_sdk.py
