#!/usr/bin/env bash
# A local three-master Redis Cluster for the cluster tests (tests/backend_redis_cluster.rs,
# tests/fleet_processes.rs), on loopback only.
#
#   eval "$(bash scripts/redis-cluster.sh start)"   # starts it, prints
#                                                   # export TOWER402_REDIS_CLUSTER_URLS=...
#   bash scripts/redis-cluster.sh stop              # stops its nodes by process id
#   bash scripts/redis-cluster.sh urls              # prints the URLs of a running cluster
#
# Ports REDIS_CLUSTER_PORT (default 7101) and the next two; state (configs, pid files, logs) in
# REDIS_CLUSTER_DIR (default /tmp/tower402-redis-cluster-<first port>). `start` on a cluster it
# already runs only prints the export line. Nothing is written to disk by the nodes beyond
# their cluster configuration (no RDB, no AOF). Messages go to stderr; stdout is the export
# line alone, for `eval`.
set -euo pipefail

FIRST=${REDIS_CLUSTER_PORT:-7101}
PORTS=("$FIRST" "$((FIRST + 1))" "$((FIRST + 2))")
DIR=${REDIS_CLUSTER_DIR:-/tmp/tower402-redis-cluster-$FIRST}

say() { echo "redis-cluster: $*" >&2; }

urls() {
  local out="" p
  for p in "${PORTS[@]}"; do out+="${out:+,}redis://127.0.0.1:$p"; done
  echo "$out"
}

# The pid a node's pid file names, if that process is alive.
live_pid() { # port
  local f="$DIR/$1/redis.pid" pid
  [[ -s $f ]] || return 1
  pid=$(cat "$f")
  kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

cluster_ok() {
  local p
  for p in "${PORTS[@]}"; do
    redis-cli -h 127.0.0.1 -p "$p" cluster info 2>/dev/null | grep -q '^cluster_state:ok' || return 1
  done
}

# Waits, with a deadline, for `cond` (a command) to hold.
wait_until() { # seconds, what, command...
  local secs=$1 what=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@"; do
    if ((SECONDS >= deadline)); then say "$what: not after ${secs}s"; return 1; fi
    sleep 0.2
  done
}

start() {
  if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >&2
  fi
  local p running=0
  for p in "${PORTS[@]}"; do
    if live_pid "$p" >/dev/null; then running=$((running + 1)); fi
  done
  if ((running == ${#PORTS[@]})) && cluster_ok; then
    say "already running on ports ${PORTS[*]} ($DIR)"
    echo "export TOWER402_REDIS_CLUSTER_URLS=$(urls)"
    return 0
  fi
  if ((running > 0)); then
    say "a partial cluster is left in $DIR: stopping it first"
    stop
  fi
  for p in "${PORTS[@]}"; do
    if redis-cli -h 127.0.0.1 -p "$p" ping >/dev/null 2>&1; then
      say "port $p is taken by a server this script did not start; set REDIS_CLUSTER_PORT"
      return 1
    fi
  done
  rm -rf "$DIR"
  for p in "${PORTS[@]}"; do
    mkdir -p "$DIR/$p"
    redis-server --port "$p" --bind 127.0.0.1 --protected-mode yes \
      --cluster-enabled yes --cluster-config-file "$DIR/$p/nodes.conf" \
      --cluster-node-timeout 5000 --save "" --appendonly no --dir "$DIR/$p" \
      --daemonize yes --pidfile "$DIR/$p/redis.pid" --logfile "$DIR/$p/redis.log"
  done
  for p in "${PORTS[@]}"; do
    wait_until 20 "node $p answering" redis-cli -h 127.0.0.1 -p "$p" ping >/dev/null 2>&1 ||
      { cat "$DIR/$p/redis.log" >&2 || true; return 1; }
    wait_until 10 "node $p pid file" live_pid "$p" >/dev/null
  done
  local nodes=()
  for p in "${PORTS[@]}"; do nodes+=("127.0.0.1:$p"); done
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >"$DIR/create.log" 2>&1 ||
    { cat "$DIR/create.log" >&2; return 1; }
  wait_until 30 "cluster_state:ok on every node" cluster_ok
  say "three masters up on ports ${PORTS[*]} ($DIR)"
  echo "export TOWER402_REDIS_CLUSTER_URLS=$(urls)"
}

stop() {
  local p pid
  for p in "${PORTS[@]}"; do
    if pid=$(live_pid "$p"); then
      kill "$pid"
      wait_until 20 "node $p (pid $pid) exiting" bash -c "! kill -0 $pid 2>/dev/null" || kill -9 "$pid" || true
      say "stopped node $p (pid $pid)"
    fi
  done
  rm -rf "$DIR"
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  urls) urls ;;
  *) echo "usage: $0 start|stop|urls" >&2; exit 2 ;;
esac
