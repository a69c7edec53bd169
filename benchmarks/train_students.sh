#!/usr/bin/env bash
# Train every student of the comparison table and the data-volume curve.
#   bash benchmarks/train_students.sh DATASET_DIR OUT_DIR
# The shipped student (models/student) is the `cnn` run; `make student` reproduces it alone.
set -euo pipefail
DATA=${1:-.cache/datasets/dev}
OUT=${2:-build/students}
BIN=${BIN:-.venv/bin}
EPOCHS=${EPOCHS:-30}
CNN_ARGS="--filters 128 --min-count 2 --epochs $EPOCHS"
mkdir -p "$OUT"
run() { local name=$1; shift; [ -f "$OUT/$name/card.json" ] && { echo "skip $name"; return; }; "$BIN/intent-worker" train --out "$OUT/$name" "$@"; }
run cnn --arch cnn $CNN_ARGS --data "$DATA"
run bag --arch bag --min-count 2 --epochs "$EPOCHS" --data "$DATA"
run s_sup --arch cnn $CNN_ARGS --supervised
for f in 0.1 0.25 0.5; do
  run "cnn-frac$f" --arch cnn $CNN_ARGS --fraction "$f" --data "$DATA"
done
