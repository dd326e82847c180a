#!/usr/bin/env bash
# More tasks than memory: COUNT tasks served under --max-resident-bytes against the first 10,000
# of them all resident, same machine, same run. Measures start → ready, a request for a cold
# task (p50/p99, vs a hot one), throughput with a Zipf-distributed task mix (8 clients), the
# hit rate, and RSS sampled through the run against the budget.
#
#   bench/more-tasks.sh [count=100000] [prefix_len=20] [budget_bytes=2147483648]
#
# Writes count × P-dependent (~370 KB at P = 20) random prefixes into a temp folder, deleted at
# exit; set PREFIXD_SYNTH_DIR to reuse a folder made by `prefixd synth` instead.
set -euo pipefail
cd "$(dirname "$0")/.."
count=${1:-100000}; plen=${2:-20}; budget=${3:-2147483648}
scripts/fetch-model >/dev/null
cargo build --release --quiet
bin=target/release/prefixd
work=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
many=${PREFIXD_SYNTH_DIR:-$work/many}
if [ -z "${PREFIXD_SYNTH_DIR:-}" ]; then
  $bin synth --device cpu --count "$count" --prefix-len "$plen" -o "$many" >/dev/null
fi
ls "$many" | sed 's/\.safetensors$//' | sort > "$work/all.tasks"
mkdir "$work/ten" && head -10000 "$work/all.tasks" | while read -r t; do ln "$many/$t.safetensors" "$work/ten/"; done
head -10000 "$work/all.tasks" > "$work/ten.tasks"
tail -200 "$work/all.tasks" > "$work/cold.tasks"   # warm-up loads in name order: these stay cold
prefix_bytes=$(du -sbL "$many" | cut -f1)
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs); tasks: $(wc -l < "$work/all.tasks"); prefix bytes: $prefix_bytes; budget: $budget"

rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }   # KiB
measure() { # name dir tasks_file extra-args…
  local name=$1 dir=$2 tasks=$3; shift 3
  local port=$((20000 + RANDOM % 20000)) start; start=$(date +%s.%N)
  $bin serve --device cpu --prefixes "$dir" --addr 127.0.0.1:$port --max-length 128 --no-watch \
    --rescan-interval 0 "$@" >/dev/null 2>"$work/$name.err" &
  local pid=$!
  until curl -sf -o /dev/null http://127.0.0.1:$port/ready; do sleep 0.02; done
  local ready; ready=$(python3 -c "print(round($(date +%s.%N) - $start, 3))")
  # Let the warm-up finish (resident count stable for a second).
  local last=-1 now=0
  while :; do
    now=$(curl -s http://127.0.0.1:$port/info | python3 -c "import json,sys; print(json.load(sys.stdin)['resident_tasks'])")
    [ "$now" = "$last" ] && break; last=$now; sleep 1
  done
  local peak=0 stop="$work/$name.stop"
  ( while [ ! -e "$stop" ]; do r=$(rss $pid); [ "$r" -gt "$peak" ] && peak=$r; echo "$peak" > "$work/$name.peak"; sleep 0.2; done ) &
  local extra=(); [ "$name" = many ] && extra=(--cold "$work/cold.tasks")
  local load; load=$(python3 bench/zipf_load.py http://127.0.0.1:$port "$tasks" "${extra[@]}")
  touch "$stop"; sleep 0.3
  local hits misses evicted
  hits=$(curl -s http://127.0.0.1:$port/metrics | awk '/^prefixd_task_lookups_total\{result="hit"\}/ {print $2}')
  misses=$(curl -s http://127.0.0.1:$port/metrics | awk '/^prefixd_task_lookups_total\{result="miss"\}/ {print $2}')
  evicted=$(curl -s http://127.0.0.1:$port/metrics | awk '/^prefixd_tasks_evicted_total/ {print $2}')
  kill $pid; wait $pid 2>/dev/null || true
  echo "$name {\"ready_s\": $ready, \"resident_tasks\": $now, \"peak_rss_kib\": $(cat "$work/$name.peak"), \"hits\": ${hits:-0}, \"misses\": ${misses:-0}, \"evicted\": ${evicted:-0}, \"load\": $load}"
}
ten=$(measure ten "$work/ten" "$work/ten.tasks"); echo "$ten"
more=$(measure many "$many" "$work/all.tasks" --max-resident-bytes "$budget"); echo "$more"
model_bytes=$(stat -c %s models/all-minilm-l6-v2/model.safetensors)
python3 - "$ten" "$more" "$budget" "$model_bytes" <<'PY'
import json, sys
ten = json.loads(sys.argv[1].split(" ", 1)[1]); more = json.loads(sys.argv[2].split(" ", 1)[1])
budget, mb = int(sys.argv[3]), int(sys.argv[4])
hit = more["hits"] / max(1, more["hits"] + more["misses"])
rows = [
  ("start → ready (s)", f"{ten['ready_s']:.2f}", f"{more['ready_s']:.2f}", ""),
  ("tasks with weights in memory", ten["resident_tasks"], more["resident_tasks"], ""),
  ("request for a cold task, p50 / p99 (ms)", "", f"{more['load']['cold_p50_ms']:.1f} / {more['load']['cold_p99_ms']:.1f}",
   f"hot p50 {more['load']['hot_p50_ms']:.1f}"),
  (f"Zipf (s = {more['load']['zipf_s']}) mix, 8 clients (rows/s)", f"{ten['load']['rows_per_s']:.0f}", f"{more['load']['rows_per_s']:.0f}",
   f"**{more['load']['rows_per_s'] / ten['load']['rows_per_s']:.2f}×**"),
  ("hit rate (whole run)", "", f"{hit:.3f}", f"{int(more['evicted'])} evictions"),
  ("peak RSS (MB)", f"{ten['peak_rss_kib']*1024/1e6:.0f}", f"{more['peak_rss_kib']*1024/1e6:.0f}",
   f"model {mb/1e6:.0f} + budget {budget/1e6:.0f}"),
]
print(f"\n| measure | 10,000 tasks, all resident | {more['load']['tasks']:,} tasks, budget | note |\n|---|---:|---:|---|")
for r in rows:
    print("| " + " | ".join(str(x) for x in r) + " |")
PY
