#!/usr/bin/env bash
# Two prefixd binaries side by side (before / after a change): same shapes, same threads,
# alternating rounds, so both see the same machine noise. Prints the JSON lines, then each
# measure's best-of-rounds ratio (after / before, higher is better; latency: lower).
#
#   git worktree add /tmp/before <commit> && (cd /tmp/before && CARGO_TARGET_DIR=/tmp/before-target cargo build --release)
#   bench/versus.sh /tmp/before-target/release/prefixd [rounds=2] [seconds=4]
#
# "after" is this checkout's target/release/prefixd. PREFIXD_ISA=avx2 caps both.
set -euo pipefail
cd "$(dirname "$0")/.."
before=${1:?usage: bench/versus.sh BEFORE_BINARY [rounds] [seconds]}
rounds=${2:-2}
secs=${3:-4}
scripts/fetch-model >/dev/null
cargo build --release --quiet
after=target/release/prefixd
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2}
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs); avx512f: $(grep -qw avx512f /proc/cpuinfo && echo yes || echo no); PREFIXD_ISA=${PREFIXD_ISA:-native}"
out=$(mktemp); trap 'rm -f "$out"' EXIT
for _ in $(seq "$rounds"); do
  for args in "--batch 32 --seq-len 64" "--batch 8 --seq-len 16" "--latency"; do
    for who in before after; do
      bin=$before; [ $who = after ] && bin=$after
      echo "$who ${args// /_} $("$bin" bench --model models/all-minilm-l6-v2 --prefix-len 20 --seconds "$secs" $args 2>/dev/null | tail -1)" | tee -a "$out"
    done
  done
done
python3 - "$out" <<'PY'
import json, sys
best = {}
for line in open(sys.argv[1]):
    who, what, js = line.split(" ", 2)
    r = json.loads(js)
    lat = "latency" in what
    v = r["median_ms"] if lat else r["seq_per_s"]
    k = (who, what)
    if k not in best or (v < best[k] if lat else v > best[k]):
        best[k] = v
print()
print("| measure | before | after | after / before |")
print("|---|---:|---:|---:|")
for what in sorted({w for _, w in best}):
    b, a = best[("before", what)], best[("after", what)]
    unit = "ms" if "latency" in what else "seq/s"
    print(f"| {what.replace('_', ' ')} ({unit}) | {b:.2f} | {a:.2f} | {a / b:.2f}× |")
PY
