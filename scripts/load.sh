#!/usr/bin/env bash
# Load test: the same route served bare, behind tower-402's three layers (in-memory, Redis,
# PostgreSQL, and on both through leases: `redis-leased`, `postgres-leased`; in memory also `observed`: metrics recorded and a usage event exported per
# request, against `layers` with neither), behind tower_governor, behind a hand-written minimal paid-API check (the
# "floor": what any implementation must at least do), and behind an nginx reverse proxy, each
# under the same wrk load on loopback, in alternating rounds. Prints medians of requests/s and p99 latency
# and the ratio to the bare app, then the Redis and PostgreSQL ceilings measured with
# redis-benchmark (the ledger's own reserve script) and pgbench (the same conditional debit).
#
#   bash scripts/load.sh                 # ROUNDS=3 DURATION=10 CONNECTIONS=64 THREADS=1
#   MODES="layers redis-leased" bash scripts/load.sh   # only these (and bare), no nginx
#   PIN=1 MODES="layers floor" bash scripts/load.sh    # servers on core 0, wrk on core 1
#
# With PIN=1 each server runs on one core and wrk on another, so the server's core is the
# bottleneck and 1 / (requests/s) is its CPU time per request: the table adds that column
# (µs/request), and the difference between two lines is what one stack costs over the other.
#
# Installs wrk and nginx with apt-get if missing, starts Redis and PostgreSQL if stopped,
# builds the servers (scripts/loadtest) in release mode, and stops everything it started by
# process id. Only loopback addresses are used.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-1}
BASE_PORT=${BASE_PORT:-18080}

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need nginx; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx-light >/dev/null
fi
bash scripts/services.sh >/dev/null

export CARGO_TARGET_DIR=target/loadtest
cargo build -q --release --manifest-path scripts/loadtest/Cargo.toml
bin=target/loadtest/release/tower-402-loadtest

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

modes=(bare layers layers-once observed governor floor redis redis-once redis-leased postgres postgres-once
       postgres-leased)
# MODES="bare layers redis-leased" runs only those (bare is always run: the ratios need it).
if [[ -n ${MODES:-} ]]; then
  read -r -a modes <<<"bare ${MODES//bare/}"
fi
declare -A port pid_of
server_cpu="" load_cpu=""
if [[ -n ${PIN:-} ]]; then server_cpu="taskset -c 0" load_cpu="taskset -c 1"; fi
i=0
for m in "${modes[@]}"; do
  i=$((i + 1)); port[$m]=$((BASE_PORT + i))
  $server_cpu "$bin" serve "$m" "${port[$m]}" >"$work/$m.log" 2>&1 &
  pids+=($!); pid_of[$m]=$!
done
port[nginx]=$((BASE_PORT + i + 1))
cat >"$work/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  upstream app { server 127.0.0.1:${port[bare]}; keepalive 128; }
  server {
    listen 127.0.0.1:${port[nginx]};
    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
CONF
if [[ -z ${MODES:-} ]]; then
  nginx -c "$work/nginx.conf" -p "$work" >/dev/null 2>&1 &
  pids+=($!)
  modes+=(nginx)
fi

for m in "${modes[@]}"; do
  for _ in $(seq 1 100); do
    if curl -sf -o /dev/null "http://127.0.0.1:${port[$m]}/v1/forecast" -H 'x-api-key: k'; then continue 2; fi
    sleep 0.2
  done
  echo "server $m did not come up:" >&2; cat "$work/$m.log" >&2 || true; exit 1
done

# wrk's p99 in microseconds.
p99_us() {
  awk '/^ +99%/ { v=$2; u=v; sub(/[0-9.]+/, "", u); sub(/[a-z]+$/, "", v);
       f = (u=="us") ? 1 : (u=="ms") ? 1000 : (u=="s") ? 1000000 : 1; printf "%.0f", v*f }' "$1"
}

echo "rounds=$ROUNDS duration=${DURATION}s connections=$CONNECTIONS wrk-threads=$THREADS cores=$(nproc)"
for r in $(seq 1 "$ROUNDS"); do
  for m in "${modes[@]}"; do
    out="$work/wrk-$m-$r.txt"
    if [[ -n ${pid_of[$m]:-} ]] && ! kill -0 "${pid_of[$m]}" 2>/dev/null; then
      echo "server $m exited; its output:" >&2; cat "$work/$m.log" >&2; exit 1
    fi
    # This machine's PostgreSQL runs with autovacuum off: vacuum the bench tables before a
    # round, as autovacuum would, so that it does not measure the dead rows of the last one.
    case $m in
      postgres*) psql -q -h 127.0.0.1 -U postgres -d test \
                   -c "VACUUM loadtest.tower402_reservations, loadtest.tower402_balances" \
                   >/dev/null 2>&1 || true ;;
    esac
    $load_cpu wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency \
      -H 'x-api-key: k' "http://127.0.0.1:${port[$m]}/v1/forecast" >"$out"
    rps=$(awk '/^Requests\/sec:/ { print $2 }' "$out")
    non2xx=$(awk '/Non-2xx/ { print $NF }' "$out")
    echo "$m $rps $(p99_us "$out") ${non2xx:-0}" >>"$work/results"
    echo "round $r $m: $rps req/s, p99 $(p99_us "$out") us, non-2xx ${non2xx:-0}"
  done
done

python3 - "$work/results" "${PIN:-}" <<'PY'
import statistics, sys
pinned = bool(sys.argv[2])
rows = {}
for line in open(sys.argv[1]):
    m, rps, p99, bad = line.split()
    rows.setdefault(m, []).append((float(rps), float(p99), int(bad)))
bare = statistics.median(r for r, _, _ in rows["bare"])
print()
cpu = " µs/request (one core) |" if pinned else ""
print(f"| server | req/s (median) | p99 µs (median) | ratio to bare | non-2xx |{cpu}")
print(f"|---|---:|---:|---:|---:|{'---:|' if pinned else ''}")
for m in ["bare", "layers", "layers-once", "layers-around", "observed", "metrics", "problem-only",
          "gate-only", "no-problem", "governor", "floor", "nginx", "redis", "redis-once",
          "redis-leased", "postgres", "postgres-once", "postgres-leased"]:
    if m not in rows: continue
    rps = statistics.median(r for r, _, _ in rows[m])
    p99 = statistics.median(p for _, p, _ in rows[m])
    bad = sum(b for _, _, b in rows[m])
    per = f" {1e6 / rps:.2f} |" if pinned else ""
    print(f"| {m} | {rps:,.0f} | {p99:,.0f} | {rps / bare:.3f} | {bad} |{per}")
PY

echo
echo "== Redis ceiling: redis-benchmark running the ledger's reserve script"
line=$("$bin" redis-prepare "$work/reserve.lua")
sha=$(redis-cli -h 127.0.0.1 -p 6379 SCRIPT LOAD "$(cat "$work/reserve.lua")")
key=${line%% *}; argv=${line#* }
# shellcheck disable=SC2086
redis-benchmark -h 127.0.0.1 -p 6379 -q -n 200000 -c "$CONNECTIONS" -r 1000000000 \
  EVALSHA "$sha" 1 "$key" $argv | tr '\r' '\n' | tail -1
echo "(one tower-402 request runs two scripts, reserve and settle)"
redis-cli -h 127.0.0.1 -p 6379 --scan --pattern 'loadtest:*' | xargs -r -n 500 redis-cli -h 127.0.0.1 -p 6379 DEL >/dev/null

echo
echo "== PostgreSQL ceiling: pgbench running the same conditional debit on one hot row"
"$bin" postgres-prepare
cat >"$work/debit.sql" <<'SQL'
UPDATE loadtest.tower402_balances
   SET available = available - 1, settled = settled + 1
 WHERE account = 'bench' AND available >= 1;
SQL
pgbench -h 127.0.0.1 -U postgres -n -c 16 -j 2 -T "$DURATION" -f "$work/debit.sql" test 2>&1 \
  | grep -E "^tps" || true
echo "(one tower-402 request is two ledger operations, reserve and settle; on a busy account many"
echo " operations share one transaction)"
