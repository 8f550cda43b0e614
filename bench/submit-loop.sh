#!/usr/bin/env bash
# 1,000 sequential `muster submit` calls from a shell loop, as a user would
# script them; prints jobs per second. Each job asks for every GPU of a
# 2 x 8-GPU dev cluster, so the first runs and the rest queue behind it.
#   bench/submit-loop.sh [MUSTER_BINARY] [COUNT]
set -euo pipefail
muster=${1:-target/release/muster}
count=${2:-1000}
start=$(date +%s.%N)
for _ in $(seq "$count"); do
    "$muster" submit --tasks 2 --gpus 8 --cpus 0.1 --mem 64M -- sleep 600 >/dev/null
done
end=$(date +%s.%N)
awk -v n="$count" -v s="$start" -v e="$end" \
    'BEGIN { printf "{\"bench\":\"shell_submit_loop\",\"submits\":%d,\"seconds\":%.3f,\"per_second\":%.1f}\n", n, e - s, n / (e - s) }'
