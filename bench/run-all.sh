#!/usr/bin/env bash
# Runs every issue-#2 benchmark against a fresh `muster dev` per run, three
# runs each, and prints one JSON line per run. Build first:
#   cargo build --release --locked
#   bench/run-all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release
runs=${RUNS:-3}
port=${PORT:-7470}
addr="http://127.0.0.1:$port"
dev_pid=""
data=""

start_dev() {
    data=$(mktemp -d /tmp/muster-bench.XXXXXX)
    "$bin/muster" dev --listen "127.0.0.1:$port" --data-dir "$data" >"$data/dev.log" 2>&1 &
    dev_pid=$!
    for _ in $(seq 100); do
        kill -0 "$dev_pid" 2>/dev/null || { echo "muster dev exited; see $data/dev.log" >&2; cat "$data/dev.log" >&2; exit 1; }
        "$bin/muster" --addr "$addr" nodes 2>/dev/null | grep -q "dev-1 .*ready" && return 0
        sleep 0.1
    done
    echo "muster dev did not come up; see $data/dev.log" >&2
    exit 1
}

stop_dev() {
    # Cancel what is left so no task outlives the run, then stop the cluster.
    { "$bin/muster" --addr "$addr" --json queue | grep -o '"id":[0-9]*' || true; } | cut -d: -f2 |
        while read -r id; do "$bin/muster" --addr "$addr" cancel "$id" >/dev/null 2>&1 || true; done
    sleep 1
    kill -INT "$dev_pid"
    wait "$dev_pid" || true
    dev_pid=""
    rm -rf "$data"
}
trap '[ -n "$dev_pid" ] && stop_dev' EXIT

for _ in $(seq "$runs"); do
    start_dev
    "$bin/muster-bench" latency --addr "$addr" --jobs 200
    stop_dev
done
for _ in $(seq "$runs"); do
    start_dev
    MUSTER_ADDR=$addr bench/submit-loop.sh "$bin/muster" 1000
    stop_dev
done
for _ in $(seq "$runs"); do
    start_dev
    "$bin/muster-bench" submit --addr "$addr" --jobs 1000
    stop_dev
done
