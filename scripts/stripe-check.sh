#!/usr/bin/env bash
# Checks the Stripe webhook against Stripe's own Node library (npm `stripe`, pinned): headers
# made by `stripe.webhooks.generateTestHeaderString` are accepted (a rotated secret too) and a
# tampered body, another secret or a stale timestamp refused (examples/stripe_verify.rs); and
# a header made by tower-402 passes the library's `constructEvent`. Installs the package into
# target/stripe-node. If npm or the registry is unreachable, says SKIPPED and exits 0, unless
# TOWER402_REQUIRE_SDK=1.
set -euo pipefail
cd "$(dirname "$0")/.."
STRIPE_VERSION=23.1.0
dir=target/stripe-node
skip() {
  if [ "${TOWER402_REQUIRE_SDK:-0}" = 1 ]; then
    echo "the npm stripe package could not be installed: $1" >&2; exit 1
  fi
  echo "SKIPPED: the npm stripe package could not be installed ($1); Stripe signature check not run" >&2
  exit 0
}
command -v node >/dev/null || skip "no node"
command -v npm >/dev/null || skip "no npm"
installed=$(node -p "require('./$dir/node_modules/stripe/package.json').version" 2>/dev/null || true)
if [ "$installed" != "$STRIPE_VERSION" ]; then
  mkdir -p "$dir"
  [ -f "$dir/package.json" ] || echo '{"private": true}' >"$dir/package.json"
  npm install --prefix "$dir" --no-audit --no-fund --silent --fetch-timeout=20000 --fetch-retries=1 \
    "stripe@$STRIPE_VERSION" || skip "npm install failed"
fi
cargo build -q --example stripe_verify
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export NODE_PATH="$PWD/$dir/node_modules"
node tests/sdk/stripe_signatures.js generate "$work/cases.json"
"${CARGO_TARGET_DIR:-target}/debug/examples/stripe_verify" "$work/cases.json" "$work/ours.json"
node tests/sdk/stripe_signatures.js check "$work/ours.json"
