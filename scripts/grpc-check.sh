#!/usr/bin/env bash
# Runs a Python gRPC client (grpcio + grpcio-status: tests/sdk/grpc_client.py) against the gRPC
# example. Compiles the schema printed in examples/grpc.rs's docs with grpcio-tools (protoc),
# so the printed schema is checked too. Installs the packages (pinned) into target/grpc-venv;
# starts and stops the example by process id. If they cannot be installed (no PyPI), says
# SKIPPED and exits 0, unless TOWER402_REQUIRE_SDK=1.
set -euo pipefail
cd "$(dirname "$0")/.."
GRPCIO_VERSION=1.85.3
GRPCIO_TOOLS_VERSION=1.85.1
venv=target/grpc-venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import grpc, grpc_status, grpc_tools" 2>/dev/null; then
  if ! { python3 -m venv "$venv" && "$venv/bin/pip" install -q "grpcio==$GRPCIO_VERSION" \
      "grpcio-status==$GRPCIO_VERSION" "grpcio-tools==$GRPCIO_TOOLS_VERSION"; }; then
    if [ "${TOWER402_REQUIRE_SDK:-0}" = 1 ]; then
      echo "grpcio could not be installed" >&2; exit 1
    fi
    echo "SKIPPED: grpcio could not be installed; gRPC client check not run" >&2
    exit 0
  fi
fi
out=target/grpc-python
mkdir -p "$out"
# The ```proto block of the example's docs, without the `//! ` prefix.
sed -n '/^\/\/! ```proto$/,/^\/\/! ```$/p' examples/grpc.rs | sed -e '1d' -e '$d' -e 's|^//! \{0,1\}||' >"$out/weather.proto"
grep -q 'service Weather' "$out/weather.proto" || { echo "no proto block in examples/grpc.rs" >&2; exit 1; }
"$venv/bin/python" -m grpc_tools.protoc -I "$out" --python_out="$out" --grpc_python_out="$out" "$out/weather.proto"
cargo build -q --example grpc
log=$(mktemp)
PORT=0 "${CARGO_TARGET_DIR:-target}/debug/examples/grpc" >"$log" 2>/dev/null &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -f "$log"' EXIT
addr=""
for _ in $(seq 1 100); do
  addr=$(grep -oE '127\.0\.0\.1:[0-9]+' "$log" | head -1 || true)
  [ -n "$addr" ] && break
  kill -0 $pid 2>/dev/null || { echo "the gRPC example exited" >&2; exit 1; }
  sleep 0.1
done
[ -n "$addr" ] || { echo "the gRPC example did not start" >&2; exit 1; }
PYTHONPATH="$out" TOWER402_GRPC_ADDR="$addr" "$venv/bin/python" tests/sdk/grpc_client.py
