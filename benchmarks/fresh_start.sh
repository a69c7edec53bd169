#!/usr/bin/env bash
# Fresh start, as a newcomer does it: a clean clone (committed work only) with ../shared beside
# it, `make run` (a fresh .venv, then the worker on embedded Tansu + valkey), then `tail` and
# `send` from the clone's venv. Writes the transcript (commands and their output) to $1, stops
# the worker with SIGTERM, and ends whatever it started that is still running, by pid.
#
#   bash benchmarks/fresh_start.sh benchmarks/results/fresh_start.txt
#
# FRESH_BASE (default /tmp/fresh) is deleted and recreated. The last line of stdout is a summary.
set -u

HERE=$(cd "$(dirname "$0")/.." && pwd)
TRANSCRIPT=$(realpath -m "${1:-$HERE/benchmarks/results/fresh_start.txt}")
BASE=${FRESH_BASE:-/tmp/fresh}
SHARED=$(realpath "${FRESH_SHARED:-$HERE/../shared}")
TEXT="book a table for two"
EXPECTED=Action
SETUP_TIMEOUT_S=${FRESH_SETUP_TIMEOUT_S:-1200}

: >"$TRANSCRIPT"
say() { printf '%s\n' "$*" | tee -a "$TRANSCRIPT"; }
shell() {  # run a command in $BASE/main, echoing it and its output into the transcript
    say "\$ $*"
    (cd "$BASE/main" && eval "$*") 2>&1 | tee -a "$TRANSCRIPT"
    return "${PIPESTATUS[0]}"
}
started=$(date +%s)
MAKE_PID=""
TAIL_PID=""

plain() { sed 's/\x1b\[[0-9;]*m//g' "$@"; }  # the console log renderer colours its output
run_pids() { plain "$BASE/run.log" | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u; }

cleanup() {
    for pid in $TAIL_PID; do kill "$pid" 2>/dev/null; done
    if [ -n "$MAKE_PID" ] && kill -0 "$MAKE_PID" 2>/dev/null; then
        kill -TERM -- "-$MAKE_PID" 2>/dev/null  # the process group setsid gave `make run`
        sleep 5
        kill -KILL -- "-$MAKE_PID" 2>/dev/null
    fi
    # The embedded services run in sessions of their own: end them by the pids the worker logged.
    if [ -f "$BASE/run.log" ]; then
        for pid in $(run_pids); do
            if kill -0 "$pid" 2>/dev/null && grep -q "$BASE/main" "/proc/$pid/cmdline" 2>/dev/null; then
                say "# left running: pid $pid ($(tr '\0' ' ' <"/proc/$pid/cmdline" | cut -c1-80)); killed"
                kill -KILL "$pid" 2>/dev/null
            fi
        done
    fi
}
trap cleanup EXIT

say "# Fresh start of intent-worker, $(date -u +%Y-%m-%dT%H:%M:%SZ), on $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'))"
say "# Shell 1: a clean clone, ../shared beside it, then make run (it creates .venv itself)"
rm -rf "$BASE" && mkdir -p "$BASE"
say "\$ git clone $HERE $BASE/main && ln -s $SHARED $BASE/shared && cd $BASE/main"
git clone --quiet "$HERE" "$BASE/main" 2>&1 | tee -a "$TRANSCRIPT"
ln -s "$SHARED" "$BASE/shared"
say "\$ ls; test -d .venv || echo 'no .venv yet'"
(cd "$BASE/main" && ls | tr '\n' ' ' && echo && { test -d .venv || echo "no .venv yet"; }) 2>&1 | tee -a "$TRANSCRIPT"
say "\$ make run        # in the background here; its output follows below"
(cd "$BASE/main" && exec setsid make run >"$BASE/run.log" 2>&1) &
MAKE_PID=$!

state="$BASE/main/.run/services.json"
web=""
deadline=$((started + SETUP_TIMEOUT_S))
while [ "$(date +%s)" -lt "$deadline" ]; do
    if ! kill -0 "$MAKE_PID" 2>/dev/null; then break; fi
    if [ -f "$state" ]; then
        web=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["web_url"])' "$state" 2>/dev/null)
        if [ -n "$web" ] && curl -fsS "$web/health" >/dev/null 2>&1; then break; fi
    fi
    sleep 2
done
ready_s=$(($(date +%s) - started))
# pip warns once per package about this machine's local index folders that do not exist: not ours.
noise="WARNING: Location 'file://.*' is ignored: it is neither a file nor a directory."
plain "$BASE/run.log" | grep -v -x "$noise" >>"$TRANSCRIPT"
say "# ($(plain "$BASE/run.log" | grep -c -x "$noise") pip warnings about missing local index folders of this machine left out)"
if [ -z "$web" ] || ! curl -fsS "$web/health" >/dev/null 2>&1; then
    say "# the worker was not healthy after ${ready_s}s"
    echo "fresh start: FAILED (worker not healthy after ${ready_s}s; see $TRANSCRIPT)"
    exit 1
fi
say "# ... make run: set up and healthy after ${ready_s}s (fresh .venv included)"
say "\$ curl -s $web/health"
curl -sS "$web/health" | tee -a "$TRANSCRIPT"
say ""

say "# Shell 2: labels as they arrive"
say "\$ .venv/bin/intent-worker tail --count 1 --timeout 60"
(cd "$BASE/main" && exec .venv/bin/intent-worker tail --count 1 --timeout 60 >"$BASE/tail.out" 2>&1) &
TAIL_PID=$!
sleep 4  # tail starts at the end of the topic: let it get there before the send
say "# Shell 3: one utterance"
shell ".venv/bin/intent-worker send \"$TEXT\" --locale en"
wait "$TAIL_PID"
TAIL_PID=""
say "# Shell 2 printed:"
tee -a "$TRANSCRIPT" <"$BASE/tail.out"
label=$(grep -P '\t' "$BASE/tail.out" | head -1 | cut -f2)

say "# Shell 1: SIGTERM to the worker (as Ctrl-C would), then make returns"
worker_pid=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$state" 2>/dev/null)
say "\$ kill -TERM $worker_pid"
kill -TERM "$worker_pid"
for _ in $(seq 60); do kill -0 "$MAKE_PID" 2>/dev/null || break; sleep 1; done
wait "$MAKE_PID"
make_code=$?
MAKE_PID=""
say "# the worker's last lines:"
plain "$BASE/run.log" | tail -n 6 | tee -a "$TRANSCRIPT"
say "# make run exited with $make_code"
leftover=""
for pid in $(run_pids); do
    if kill -0 "$pid" 2>/dev/null && grep -q "$BASE/main" "/proc/$pid/cmdline" 2>/dev/null; then leftover="$leftover $pid"; fi
done
say "# processes of the run still alive after it stopped:${leftover:- none}"
total_s=$(($(date +%s) - started))
if [ "$label" = "$EXPECTED" ]; then
    echo "fresh start: OK, '$TEXT' -> $label (expected $EXPECTED); healthy after ${ready_s}s; make exit $make_code; leftovers:${leftover:- none}; ${total_s}s in all"
else
    echo "fresh start: FAILED, '$TEXT' -> '${label}' (expected $EXPECTED); make exit $make_code; see $TRANSCRIPT"
    exit 1
fi
