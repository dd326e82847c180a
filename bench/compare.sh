#!/usr/bin/env bash
# prefixd vs PyTorch + PEFT vs ONNX Runtime on this machine, side by side: same shapes, same
# threads, one run (P = 20, MiniLM-L6, fp32). Prints each engine's JSON lines, then the table.
#
#   bench/compare.sh [--isa native|avx2] [seconds=5] [rounds=2]
#
# Every engine runs once per round, the rounds one after another, and the table takes each
# engine's best round: on a shared machine a neighbour's burst then costs a round, not a claim.
#
# --isa avx2 makes all three engines see an AVX2 + FMA CPU (bench/isa.sh: CPUID itself is capped),
# so an AVX-512 machine measures what an AVX2-only one runs. Each engine reports the kernels it
# ran: prefixd its dispatch, PyTorch its ATen capability, ONNX Runtime the ISA its process sees.
#
# Needs the yardsticks' environment (outside the repository):
#   python3 -m venv /tmp/torchref && /tmp/torchref/bin/pip install -r ../shared/bench/requirements.txt
# Override its interpreter with TORCH_PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
isa=native
if [ "${1:-}" = "--isa" ]; then isa=$2; shift 2; fi
secs=${1:-5}
rounds=${2:-2}
py=${TORCH_PYTHON:-/tmp/torchref/bin/python}
[ -x "$py" ] || { echo "no PyTorch environment at $py (see the header of this script)" >&2; exit 1; }
scripts/fetch-model >/dev/null
cargo build --release --quiet
model=models/all-minilm-l6-v2
adapter=../shared/fixtures/peft/multi4-p20   # P = 20
out=$(mktemp); trap 'rm -f "$out"' EXIT
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2}
source bench/isa.sh
use_isa "$isa"
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs); avx512f: $(grep -qw avx512f /proc/cpuinfo && echo yes || echo no); isa: $isa"
"$py" -c "import torch; print('pytorch kernels:', torch.backends.cpu.get_cpu_capability())"

run() { echo "$1 $("${@:2}")" | tee -a "$out"; }
torch_() { "$py" ../shared/bench/torch_baseline.py --model $model --adapter $adapter --seconds "$secs" "$@"; }
ort_() { "$py" bench/ort_baseline.py --model $model --adapter $adapter --seconds "$secs" "$@" 2>/dev/null; }
pfx_() { target/release/prefixd bench --model $model --prefix-len 20 --seconds "$secs" "$@"; }
for round in $(seq "$rounds"); do
  echo "round $round of $rounds"
  for shape in "32 64" "8 16"; do
    set -- $shape
    run "torch-$1x$2" torch_ --batch "$1" --seq-len "$2"
    run "ort-$1x$2" ort_ --variant prefix --batch "$1" --seq-len "$2"
    run "ortplain-$1x$2" ort_ --variant plain --batch "$1" --seq-len "$2"
    run "prefixd-$1x$2" pfx_ --batch "$1" --seq-len "$2"
  done
  run "prefixd-32x64-32tasks" pfx_ --batch 32 --seq-len 64 --tasks 32
  run "torch-latency" torch_ --latency
  run "ort-latency" ort_ --variant prefix --latency
  run "ortplain-latency" ort_ --variant plain --latency
  run "prefixd-latency" pfx_ --latency
done

python3 - "$out" <<'PY'
import json, sys
r = {}
for line in open(sys.argv[1]):
    name, js = line.split(" ", 1)
    x = json.loads(js)
    # Best round: highest throughput, lowest latency.
    if name in r:
        better = (x["median_ms"] < r[name]["median_ms"]) if "latency" in name else (x["seq_per_s"] > r[name]["seq_per_s"])
        if not better:
            continue
    r[name] = x
print()
print("| measure | PyTorch + PEFT | ORT (prefix) | ORT (plain) | prefixd | prefixd / PyTorch | prefixd / ORT (prefix) | prefixd / ORT (plain) |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for shape in ["32x64", "8x16"]:
    t, o, op, p = (r[f"{e}-{shape}"]["seq_per_s"] for e in ["torch", "ort", "ortplain", "prefixd"])
    print(f"| throughput {shape.replace('x', ' × ')} (seq/s) | {t:.1f} | {o:.1f} | {op:.1f} | {p:.1f} | **{p / t:.2f}×** | **{p / o:.2f}×** | {p / op:.2f}× |")
t, o, op, p = (r[f"{e}-latency"]["median_ms"] for e in ["torch", "ort", "ortplain", "prefixd"])
print(f"| latency, one {r['prefixd-latency']['tokens']}-token request (median ms, lower is better) | {t:.2f} | {o:.2f} | {op:.2f} | {p:.2f} | **{p / t:.2f}×** | **{p / o:.2f}×** | {p / op:.2f}× |")
s, m = r["prefixd-32x64"]["seq_per_s"], r["prefixd-32x64-32tasks"]["seq_per_s"]
print(f"| 32 tasks in one 32 × 64 batch vs one task (prefixd) | | | | {m:.1f} vs {s:.1f} | **{m / s:.2f}×** | | |")
print(f"\nprefixd kernels: {r['prefixd-32x64']['placement']['isa']} (CPU: {r['prefixd-32x64']['placement']['cpu_isa']}); "
      f"ORT sees: {r['ort-latency'].get('cpu_isa_seen', 'n/a')}; "
      f"ORT prefix export vs PEFT: {r['ort-latency'].get('ort_max_abs_logit_diff_vs_peft', 'n/a')}")
PY
