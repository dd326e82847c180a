#!/usr/bin/env bash
# prefixd vs PyTorch + PEFT on this machine, side by side, same shapes and threads (P = 20,
# MiniLM-L6, fp32). Prints each engine's JSON lines, then the ratio table.
#
#   bench/compare.sh [seconds=5]
#
# Needs the PyTorch yardstick's environment (see ../shared/bench/torch_baseline.py):
#   python3 -m venv /tmp/torchref && /tmp/torchref/bin/pip install -r ../shared/bench/requirements.txt
# Override its interpreter with TORCH_PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
py=${TORCH_PYTHON:-/tmp/torchref/bin/python}
[ -x "$py" ] || { echo "no PyTorch environment at $py (see the header of this script)" >&2; exit 1; }
scripts/fetch-model >/dev/null
cargo build --release --quiet
model=models/all-minilm-l6-v2
adapter=../shared/fixtures/peft/multi4-p20   # P = 20
out=$(mktemp); trap 'rm -f "$out"' EXIT
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2}

run() { echo "$1 $("${@:2}")" | tee -a "$out"; }
for shape in "32 64" "8 16"; do
  set -- $shape
  run "torch-$1x$2" "$py" ../shared/bench/torch_baseline.py --model $model --adapter $adapter --batch "$1" --seq-len "$2" --seconds "$secs"
  run "prefixd-$1x$2" target/release/prefixd bench --model $model --batch "$1" --seq-len "$2" --prefix-len 20 --seconds "$secs"
done
run "prefixd-32x64-32tasks" target/release/prefixd bench --model $model --batch 32 --seq-len 64 --prefix-len 20 --tasks 32 --seconds "$secs"
run "torch-latency" "$py" ../shared/bench/torch_baseline.py --model $model --adapter $adapter --latency --seconds "$secs"
run "prefixd-latency" target/release/prefixd bench --model $model --prefix-len 20 --latency --seconds "$secs"

python3 - "$out" <<'PY'
import json, sys
r = {}
for line in open(sys.argv[1]):
    name, js = line.split(" ", 1)
    r[name] = json.loads(js)
print()
print("| measure | PyTorch + PEFT | prefixd | prefixd / PyTorch |")
print("|---|---:|---:|---:|")
for shape in ["32x64", "8x16"]:
    t, p = r[f"torch-{shape}"]["seq_per_s"], r[f"prefixd-{shape}"]["seq_per_s"]
    print(f"| throughput {shape.replace('x', ' rows x ')} tokens (seq/s) | {t:.1f} | {p:.1f} | **{p / t:.2f}x** |")
t, p = r["torch-latency"]["median_ms"], r["prefixd-latency"]["median_ms"]
print(f"| latency, one {r['prefixd-latency']['tokens']}-token request (median ms) | {t:.2f} | {p:.2f} | **{p / t:.2f}x** (lower is better) |")
s, m = r["prefixd-32x64"]["seq_per_s"], r["prefixd-32x64-32tasks"]["seq_per_s"]
print(f"| 32 tasks in one 32 x 64 batch vs one task (prefixd) | | {m:.1f} vs {s:.1f} | **{m / s:.2f}x** |")
PY
