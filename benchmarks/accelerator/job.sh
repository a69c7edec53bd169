#!/usr/bin/env bash
# On the lent accelerator machine, from the repository root: unpack what pack.py packed into
# .gpu/, then label and train (job.py), which puts the datasets, the students and job.json under $OUT.
# Usage: OUT=... bash benchmarks/accelerator/job.sh [job.py options]
# A dry run here: PY=.venv/bin/python SKIP_WHEELS=1 OUT=/tmp/out bash benchmarks/accelerator/job.sh --device cpu --per-file 200 ...
set -euo pipefail
PY=${PY:-python3}
WORK=${WORK:-/tmp/job}
export PYTHONUNBUFFERED=1
mkdir -p "$WORK" "$OUT"
if [ -z "${SKIP_WHEELS:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" .gpu/whl/*.whl
  export PYTHONPATH="$WORK/site:$PWD"
fi
tar xzf .gpu/data.tar.gz -C "$WORK"
gunzip -c .gpu/e5.bin.gz > "$WORK/e5.bin"
export INTENT_TEACHER_WEIGHTS="$WORK/e5.bin" INTENT_CACHE_DIR="$WORK/cache" INTENT_SHARED_DATA_DIR="$WORK/data"
# job.py ships each dataset and student to $OUT as soon as it is done; stop it in time to return.
status=0
timeout "${JOB_SECONDS:-540}" $PY benchmarks/accelerator/job.py --work "$WORK" --out "$OUT" "$@" 2>&1 | tee "$OUT/job.log" || status=$?
ls -la "$OUT"
exit $status
