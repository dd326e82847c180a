#!/usr/bin/env bash
# Accuracy of the shipped prefixes in half precision (--dtype bf16 / f16) against f32, on each
# task's held-out split. Runs the fused device path; on a machine without a GPU its ops are
# composed of candle's CPU kernels, which store and round in the same places as the CUDA kernels
# (f32 arithmetic inside each op, one rounding at its output).
#
#   bench/half-accuracy.sh [--device cpu|cuda]
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || set -- --device cpu
data=${PREFIXD_DATA:-../shared/data}
scripts/fetch-model >/dev/null
cargo build --release --quiet
bin=${PREFIXD_BIN:-target/release/prefixd}
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
declare -A split=([sst2]=sst2/dev.tsv [trec]=trec/test.tsv [sms_spam]=sms_spam/test.tsv [rte]=rte/dev.tsv)
for task in sst2 trec sms_spam rte; do
  for dtype in f32 bf16 f16; do
    "$bin" eval --prefix "prefixes/$task.safetensors" --data "$data/${split[$task]}" --dtype "$dtype" \
      "$@" --json > "$out/$task.$dtype.json"
  done
done
python3 - "$out" <<'PY'
import json, sys
d = sys.argv[1]
print("| task | examples | f32 | bf16 | Δ bf16 | f16 | Δ f16 |")
print("|---|---:|---:|---:|---:|---:|---:|")
for t in ["sst2", "trec", "sms_spam", "rte"]:
    r = {k: json.load(open(f"{d}/{t}.{k}.json")) for k in ["f32", "bf16", "f16"]}
    a = {k: 100 * v["accuracy"] for k, v in r.items()}
    print(f"| {t} | {r['f32']['examples']} | {a['f32']:.2f}% | {a['bf16']:.2f}% | {a['bf16'] - a['f32']:+.2f} | "
          f"{a['f16']:.2f}% | {a['f16'] - a['f32']:+.2f} |")
PY
