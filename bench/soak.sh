#!/usr/bin/env bash
# Soak test (see bench/soak.py): twice the load prefixd can serve for N minutes, with uploads,
# deletes and hand edits racing the classify traffic; wrong, lost and 5xx answers must be 0 and
# RSS flat. Exit status 0 when they are.
#
#   bench/soak.sh [minutes=10] [summary.json]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-model >/dev/null
cargo build --release --quiet
exec python3 bench/soak.py --bin target/release/prefixd --model models/all-minilm-l6-v2 \
  --minutes "${1:-10}" ${2:+--out "$2"}
