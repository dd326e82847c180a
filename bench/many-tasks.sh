#!/usr/bin/env bash
# 10,000 tasks in one replica against a one-task server, same machine, same run:
# start → ready (every task known and servable), start → every task's weights in memory, RSS, one client's p50 over random tasks, 8 clients' throughput, the size of
# /v1/tasks and /metrics, upload → servable. Prints the JSON lines, then the table.
#
#   bench/many-tasks.sh [count=10000]
#
# Extra environment for both servers passes through (e.g. MIMALLOC_ARENA_EAGER_COMMIT=0).
#
# Writes count × ~370 KB of random prefixes (prefixd synth) into a temp folder, deleted at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
count=${1:-10000}
scripts/fetch-model >/dev/null
cargo build --release --quiet
bin=target/release/prefixd
work=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
$bin synth --device cpu --count "$count" -o "$work/many" >/dev/null
mkdir "$work/one" && cp "$work/many/task000.safetensors" "$work/one/"
prefix_bytes=$(du -sb "$work/many" | cut -f1)
model_bytes=$(stat -c %s models/all-minilm-l6-v2/model.safetensors)
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs); tasks: $count; prefix bytes: $prefix_bytes; model bytes: $model_bytes"

measure() { # name dir
  local name=$1 dir=$2 port=$((20000 + RANDOM % 20000))
  sync; local start; start=$(date +%s.%N)
  PREFIXD_ADMIN_TOKEN=bench $bin serve --device cpu --prefixes "$dir" --addr 127.0.0.1:$port \
    --max-length 128 --no-watch --rescan-interval 0 >/dev/null 2>"$work/$name.err" &
  local pid=$!
  until curl -sf -o /dev/null http://127.0.0.1:$port/ready; do sleep 0.02; done
  local ready; ready=$(python3 -c "print(round($(date +%s.%N) - $start, 3))")
  local rss_ready; rss_ready=$(awk '/VmRSS/ {print $2}' /proc/$pid/status)
  # Ready means every task is known and servable; the weights load behind it. The load test
  # runs once all are in memory, so both servers are compared in their steady state.
  until python3 -c "import json,sys,urllib.request as u; i=json.load(u.urlopen('http://127.0.0.1:$port/info')); sys.exit(i['resident_tasks'] < i['tasks'])"; do sleep 0.1; done
  local all_in; all_in=$(python3 -c "print(round($(date +%s.%N) - $start, 3))")
  ls "$dir" | sed 's/\.safetensors$//' > "$work/$name.tasks"
  local load; load=$(python3 bench/many_tasks.py http://127.0.0.1:$port "$work/$name.tasks")
  local rss_after; rss_after=$(awk '/VmRSS/ {print $2}' /proc/$pid/status)
  local list_bytes; list_bytes=$(curl -s http://127.0.0.1:$port/v1/tasks | wc -c)
  local metrics_bytes; metrics_bytes=$(curl -s http://127.0.0.1:$port/metrics | wc -c)
  local t0; t0=$(date +%s.%N)
  curl -sf -o /dev/null -X PUT -H 'authorization: Bearer bench' -H 'content-type: application/octet-stream' \
    --data-binary @"$work/many/task001.safetensors" http://127.0.0.1:$port/v1/admin/tasks/fresh
  curl -sf -o /dev/null -H 'content-type: application/json' -d '{"task":"fresh","inputs":["x"]}' http://127.0.0.1:$port/v1/classify
  local upload_ms; upload_ms=$(python3 -c "print(round(($(date +%s.%N) - $t0) * 1000, 1))")
  kill $pid; wait $pid 2>/dev/null || true
  echo "$name {\"ready_s\": $ready, \"all_resident_s\": $all_in, \"rss_ready_kib\": $rss_ready, \"rss_after_load_kib\": $rss_after, \"list_bytes\": $list_bytes, \"metrics_bytes\": $metrics_bytes, \"upload_to_servable_ms\": $upload_ms, \"load\": $load}"
}
one=$(measure one "$work/one"); echo "$one"
many=$(measure many "$work/many"); echo "$many"
python3 - "$one" "$many" "$prefix_bytes" "$model_bytes" <<'PY'
import json, sys
one = json.loads(sys.argv[1].split(" ", 1)[1]); many = json.loads(sys.argv[2].split(" ", 1)[1])
pb, mb = int(sys.argv[3]), int(sys.argv[4])
budget = mb + 150 * 2**20 + 1.05 * pb
rows = [
  ("start → ready (s)", f"{one['ready_s']:.2f}", f"{many['ready_s']:.2f}", "", "≤ 5 s"),
  ("start → every task in memory (s)", f"{one['all_resident_s']:.2f}", f"{many['all_resident_s']:.2f}", "", ""),
  ("RSS after the load test (MB)", f"{one['rss_after_load_kib']*1024/1e6:.0f}", f"{many['rss_after_load_kib']*1024/1e6:.0f}",
   f"budget {budget/1e6:.0f}", "≤ model + 150 MiB + 1.05 × prefixes"),
  ("one client, random tasks, p50 (ms)", f"{one['load']['p50_ms']:.2f}", f"{many['load']['p50_ms']:.2f}",
   f"**{many['load']['p50_ms']/one['load']['p50_ms']:.2f}×**", "≤ 1.1×"),
  ("8 clients, random tasks (rows/s)", f"{one['load']['rows_per_s']:.0f}", f"{many['load']['rows_per_s']:.0f}",
   f"**{many['load']['rows_per_s']/one['load']['rows_per_s']:.2f}×**", "≥ 0.95×"),
  ("GET /v1/tasks (bytes, first page)", one['list_bytes'], many['list_bytes'], "", "paginated"),
  ("GET /metrics (bytes)", one['metrics_bytes'], many['metrics_bytes'], "", "< 1 MiB"),
  ("upload → servable (ms)", f"{one['upload_to_servable_ms']:.0f}", f"{many['upload_to_servable_ms']:.0f}", "", ""),
]
print("\n| measure | 1 task | %d tasks | ratio | goal |\n|---|---:|---:|---:|---|" % many['load']['tasks'])
for r in rows:
    print("| " + " | ".join(str(x) for x in r) + " |")
PY
