#!/usr/bin/env bash
# Training speed and memory: prefixd vs PyTorch + PEFT, same shapes, same threads, one run.
# Each engine trains a P = 20 prefix (and head) on MiniLM-L6 with dropout on: forward, backward,
# AdamW, clipping, per timed step. Prints the JSON lines, then the table with peak RSS.
#
#   bench/train-compare.sh [--isa native|avx2] [rounds=2]
#
# Rounds alternate the engines, so both see the same machine noise; the table keeps each engine's
# best round. --isa avx2 makes both see an AVX2 + FMA CPU (bench/isa.sh, as bench/compare.sh does).
# Needs the yardsticks' environment (see bench/compare.sh); override with TORCH_PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
isa=native
if [ "${1:-}" = "--isa" ]; then isa=$2; shift 2; fi
rounds=${1:-2}
py=${TORCH_PYTHON:-/tmp/torchref/bin/python}
[ -x "$py" ] || { echo "no PyTorch environment at $py (see bench/compare.sh)" >&2; exit 1; }
scripts/fetch-model >/dev/null
cargo build --release --quiet
model=models/all-minilm-l6-v2
source bench/isa.sh
use_isa "$isa"
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs); avx512f: $(grep -qw avx512f /proc/cpuinfo && echo yes || echo no); isa: $isa"
out=$(mktemp); trap 'rm -f "$out" "$out.rss"' EXIT
# run NAME CMD...: the command's JSON line and its peak RSS, on one line of $out.
run() {
  local js
  js=$(/usr/bin/time -f '%M' -o "$out.rss" "${@:2}" 2>/dev/null | tail -1)
  echo "$1 $(cat "$out.rss") $js" | tee -a "$out"
}
for _ in $(seq "$rounds"); do
  for sl in 64 128; do
    run "torch-32x$sl" "$py" bench/torch_train_speed.py --model $model --batch 32 --seq-len $sl
    run "prefixd-32x$sl" target/release/prefixd bench --train --model $model --prefix-len 20 --batch 32 --seq-len $sl
  done
done
python3 - "$out" <<'PY'
import json, sys
best = {}
for line in open(sys.argv[1]):
    name, rss, js = line.split(" ", 2)
    r = json.loads(js)
    r["rss_mb"] = int(rss) / 1024
    if name not in best or r["examples_per_s"] > best[name]["examples_per_s"]:
        best[name] = r
print()
print("| shape | PyTorch + PEFT ex/s | prefixd ex/s | prefixd / PyTorch | PyTorch peak RSS | prefixd peak RSS |")
print("|---|---|---|---|---|---|")
for sl in (64, 128):
    t, p = best[f"torch-32x{sl}"], best[f"prefixd-32x{sl}"]
    print(f"| 32 × {sl} | {t['examples_per_s']:.1f} | {p['examples_per_s']:.1f} | {p['examples_per_s'] / t['examples_per_s']:.2f}× | {t['rss_mb']:.0f} MB | {p['rss_mb']:.0f} MB |")
PY
