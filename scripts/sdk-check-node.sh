#!/usr/bin/env bash
# Runs the official OpenAI Node SDK (tests/sdk/openai_sdk.mjs) against the llm_proxy example.
# Two pinned versions, each installed into target/sdk-node/<version> with npm: 5.x reads only
# an `error` member from an error body (without one it says "402 status code (no body)");
# 7.x wraps a body without one. Starts and stops the example by process id. If node or npm is missing or the registry is unreachable, says SKIPPED and
# exits 0, unless TOWER402_REQUIRE_SDK=1.
set -euo pipefail
cd "$(dirname "$0")/.."
OPENAI_NODE_VERSIONS="5.23.2 7.59.0"
skip() {
  if [ "${TOWER402_REQUIRE_SDK:-0}" = 1 ]; then
    echo "the OpenAI Node SDK could not be installed: $1" >&2; exit 1
  fi
  echo "SKIPPED: the OpenAI Node SDK could not be installed ($1); Node SDK check not run" >&2
  exit 0
}
command -v node >/dev/null && command -v npm >/dev/null || skip "node or npm missing"
for version in $OPENAI_NODE_VERSIONS; do
  dir=target/sdk-node/$version
  mkdir -p "$dir"
  [ -f "$dir/package.json" ] || echo '{"private": true, "type": "module"}' >"$dir/package.json"
  installed=$(cd "$dir" && node -p "require('./node_modules/openai/package.json').version" 2>/dev/null || true)
  if [ "$installed" != "$version" ]; then
    (cd "$dir" && npm install --no-audit --no-fund --silent "openai@$version") \
      || skip "npm install openai@$version failed"
  fi
  cp tests/sdk/openai_sdk.mjs "$dir/openai_sdk.mjs"
done
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
status=0
for version in $OPENAI_NODE_VERSIONS; do
  echo "== openai (Node) $version"
  TOWER402_LLM_URL="$url" node "target/sdk-node/$version/openai_sdk.mjs" || status=1
done
exit $status
