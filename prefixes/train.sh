#!/usr/bin/env bash
# Trains the prefixes shipped in prefixes/ with `prefixd train`, then scores each on its held-out
# split with `prefixd eval`. Training is deterministic (seed 42): rerunning gives the same files.
#
#   prefixes/train.sh [task...]     # default: sst2 trec sms_spam rte
#
# Data: ../shared/data (override with PREFIXD_DATA). The numbers in prefixes/README.md come from
# the .metrics.json and .eval.json files this writes beside each prefix.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${PREFIXD_DATA:-../shared/data}
scripts/fetch-model >/dev/null
cargo build --release --quiet
bin=target/release/prefixd
# A fixed place for derived data, so the paths recorded in each file's provenance (and so the
# files' bytes) do not change from run to run.
work=target/prefix-training
mkdir -p "$work"

train() { # name train-file eval-file [extra train flags...]
  local name=$1 train=$2 eval=$3; shift 3
  local start; start=$(date +%s.%N)
  $bin train --train "$train" --eval "$eval" --task "$name" -o "prefixes/$name.safetensors" --quiet "$@"
  python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" "$start" "$(date +%s.%N)" > "$work/$name.seconds"
  $bin eval --prefix "prefixes/$name.safetensors" --data "$eval" --json > "prefixes/$name.eval.json"
  echo "$name: $(cat "$work/$name.seconds") s wall, accuracy $(python3 -c "import json,sys; print(round(json.load(open(sys.argv[1]))['accuracy'], 4))" "prefixes/$name.eval.json")"
}

for task in "${@:-sst2 trec sms_spam rte}"; do
  for t in $task; do
    case $t in
      # The default recipe on the seed's 8,000-row SST-2 subset, scored on the full dev set.
      sst2) scripts/sst2-splits "$work/sst2" >/dev/null
            train sst2 "$work/sst2/train_8000.tsv" "$data/sst2/dev.tsv" ;;
      trec) train trec "$data/trec/train.tsv" "$data/trec/test.tsv" ;;
      sms_spam) train sms_spam "$data/sms_spam/train.tsv" "$data/sms_spam/test.tsv" --epochs 2 ;;
      # Sentence pairs. See prefixes/README.md for why these settings.
      rte) train rte "$data/rte/train.tsv" "$data/rte/dev.tsv" ${RTE_FLAGS:---lr 3e-2 --epochs 10 --warmup-ratio 0.1} ;;
      *) echo "unknown task $t" >&2; exit 1 ;;
    esac
  done
done
