#!/usr/bin/env bash
# HTTP load test: 64 concurrent clients, 100 tasks, short SST-2 sentences, against a local
# `prefixd serve`. Prints the client-side figures (wrk) and the engine-side figures from the
# server's own metrics over the same run.
#
#   bench/http.sh [seconds=30] [connections=64] [tasks=100]
#
# Needs wrk (Debian: apt-get install wrk). The load generator shares the machine's cores with the
# server, so absolute numbers understate a dedicated server; compare runs on the same machine.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-30}; conns=${2:-64}; tasks=${3:-100}
command -v wrk >/dev/null || { echo "bench/http.sh needs wrk (apt-get install wrk)" >&2; exit 1; }
scripts/fetch-model >/dev/null
cargo build --release --quiet
bin=target/release/prefixd
work=$(mktemp -d); trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT

# Inputs: SST-2 dev sentences (short: ~13 tokens on average), as JSON strings.
python3 - "$work/inputs.jsonl" <<'PY'
import json, sys
rows = open("../shared/data/sst2/dev.tsv", encoding="utf-8").read().splitlines()[1:]
with open(sys.argv[1], "w") as f:
    for r in rows:
        f.write(json.dumps(r.split("\t")[0]) + "\n")
PY
$bin synth --count "$tasks" --prefix-len 20 -o "$work/prefixes" >/dev/null
$bin serve --prefixes "$work/prefixes" --addr 127.0.0.1:0 --no-watch >"$work/addr" 2>"$work/log" &
pid=$!
for _ in $(seq 100); do grep -q listening "$work/addr" 2>/dev/null && break; sleep 0.1; done
url=$(sed -n 's/^prefixd listening on //p' "$work/addr")
[ -n "$url" ] || { cat "$work/log"; exit 1; }

metric() { curl -s "$url/metrics" | awk -v m="$1" '$1 == m { print $2 }'; }
read -r rows0 infer0 batches0 tasks0 < <(echo "$(metric prefixd_batch_size_sum) $(metric prefixd_inference_duration_seconds_sum) $(metric prefixd_batch_size_count) $(metric prefixd_batch_tasks_sum)")
client=$(BENCH_INPUTS="$work/inputs.jsonl" BENCH_TASKS="$tasks" wrk -t2 -c"$conns" -d"${secs}s" --latency \
  -s bench/classify.lua "$url" | tail -n 1)
read -r rows1 infer1 batches1 tasks1 < <(echo "$(metric prefixd_batch_size_sum) $(metric prefixd_inference_duration_seconds_sum) $(metric prefixd_batch_size_count) $(metric prefixd_batch_tasks_sum)")
python3 - "$client" "$rows0" "$rows1" "$infer0" "$infer1" "$batches0" "$batches1" "$tasks0" "$tasks1" "$conns" "$tasks" <<'PY'
import json, sys
c = json.loads(sys.argv[1])
r0, r1, i0, i1, b0, b1, t0, t1 = map(float, sys.argv[2:10])
rows, infer, batches = r1 - r0, i1 - i0, b1 - b0
print(json.dumps({
    "connections": int(sys.argv[10]), "tasks": int(sys.argv[11]), **c,
    "engine_rows_per_s": round(rows / infer, 1) if infer else None,
    "engine_busy_fraction": round(infer / c["duration_s"], 3),
    "mean_batch_rows": round(rows / batches, 2) if batches else None,
    "mean_batch_tasks": round((t1 - t0) / batches, 2) if batches else None,
}))
PY
