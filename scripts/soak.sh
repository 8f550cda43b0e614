#!/usr/bin/env bash
# Soak of the fault-injection suite (tests/tests/faults.rs): one cluster of
# 3 schedulers and 2 agents on loopback, two submitters, and random faults
# (leader kill -9, symmetric and one-way leader partitions, agent kill -9
# under running tasks, leader SIGSTOP past the agent lease) for MINUTES.
# Prints the faults injected, jobs acknowledged, lost and duplicated, and the
# longest time an agent went without a session; fails on any breach.
#
#   scripts/soak.sh [MINUTES]        default 3, at most 120
#   MUSTER_SOAK_FAULTS=kill-leader,partition,partition-out,partition-in,kill-agent,stall-leader
#   PROFILE=release scripts/soak.sh  release binaries (a longer first build)
#
# Needs root for real cgroups (otherwise the agents run without them).
set -euo pipefail
cd "$(dirname "$0")/.."
minutes="${1:-3}"
if ! [[ "$minutes" =~ ^[0-9]+$ ]] || ((minutes < 1 || minutes > 120)); then
    echo "usage: $0 [MINUTES] (1 to 120)" >&2
    exit 2
fi
profile="${PROFILE:-debug}"
flag=()
[[ "$profile" == release ]] && flag=(--release)
echo "building ($profile)..." >&2
cargo build "${flag[@]}" --bins >&2
log="$(mktemp -t muster-soak.XXXXXX.log)"
echo "soak: $minutes min, faults: ${MUSTER_SOAK_FAULTS:-all}; output in $log" >&2
set +e
MUSTER_SOAK_SECS=$((minutes * 60)) timeout $((minutes * 60 + 600)) \
    cargo test "${flag[@]}" -p muster-tests --test faults -- --ignored --exact soak --nocapture \
    >"$log" 2>&1
rc=$?
set -e
grep -E '^\[ *[0-9.]+s' "$log" | tail -n 20 || true
echo
grep -E '^FIGURES' "$log" | tr ' ' '\n' | sed -n '2,$p' || echo "no figures: the run did not finish; see $log"
if ((rc != 0)); then
    echo
    grep -E -A40 '^breaches:' "$log" | grep -E '^\((a|b|c|d|e|f)\)|kept in' || true
    echo "soak FAILED (exit $rc); full output: $log"
fi
exit "$rc"
