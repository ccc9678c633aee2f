#!/usr/bin/env bash
# The statsd benchmark (`make bench`): statsd vs json-server 0.17.4 vs a bare
# aiohttp app, on generated MONARC-shaped databases, all on 127.0.0.1.
#
#   bash bench/run.sh [bench.py options]      from the repo root or anywhere
#
# Environment:
#   BENCH_DURATION=N  seconds per wrk run (default 10)
#   BENCH_QUICK=1     smoke test: 2 s runs, fewer repeats
#   BENCH_SIZES=...   stat counts, comma-separated (default 1000,100000)
#   BENCH_PROFILE=full  heavy data (~3.5 KB a stat) instead of compact (~450 B)
#   BENCH_MILLION=1   also 1,000,000 stats (about 3.5 GB of JSON; skipped if memory is short)
#   PYTHON=...        the python that has the project installed (default .venv/bin/python)
#
# Writes bench/results.md; generated files go to bench/.data, servers' logs to bench/.run/logs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BENCH="$PWD/bench"
PY="${PYTHON:-.venv/bin/python}"
SIZES="${BENCH_SIZES:-1000,100000}"
if [ -n "${BENCH_MILLION:-}" ] && [ "${BENCH_MILLION}" != 0 ]; then SIZES="$SIZES,1000000"; fi

# On any exit: stop bench.py (it stops its servers), then whatever it left behind.
BENCH_PID=""
running() {  # a live process, not a zombie
    local state
    state=$(ps -o stat= -p "$1" 2>/dev/null) && [ "${state:0:1}" != Z ]
}
cleanup() {
    local pids=() pid
    if [ -n "$BENCH_PID" ] && kill -TERM "$BENCH_PID" 2>/dev/null; then
        for _ in $(seq 1 600); do  # at most 60 s: statsd may be folding its journal
            running "$BENCH_PID" || break
            sleep 0.1
        done
    fi
    [ -f "$BENCH/.run/pids" ] || return 0
    while read -r pid; do
        # only our own servers: their command lines name a file under bench/
        if [ -n "$pid" ] && grep -qaF "$BENCH/" "/proc/$pid/cmdline" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
        fi
    done < "$BENCH/.run/pids"
    for _ in $(seq 1 300); do  # at most 30 s, then SIGKILL
        local left=()
        for pid in "${pids[@]}"; do running "$pid" && left+=("$pid"); done
        [ ${#left[@]} -eq 0 ] && return 0
        pids=("${left[@]}")
        sleep 0.1
    done
    kill -KILL "${pids[@]}" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

if [ ! -x "$PY" ]; then
    echo "bench: no $PY; install the project first (python3 -m venv .venv && .venv/bin/pip install -e .)" >&2
    exit 1
fi

# 1. Tools: wrk from Debian, json-server 0.17.4 from npm into bench/.peer.
if ! command -v wrk >/dev/null; then
    echo "bench: installing wrk"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq wrk >/dev/null
fi
if ! grep -qs '"version": "0.17.4"' "$BENCH/.peer/node_modules/json-server/package.json"; then
    echo "bench: installing json-server 0.17.4"
    npm install --prefix "$BENCH/.peer" --no-audit --no-fund --loglevel=error json-server@0.17.4 >/dev/null
fi

# 2. Data (kept in bench/.data and reused while seed and sizes match).
"$PY" "$BENCH/gen.py" --sizes "$SIZES"

# 3-6. Servers, wrk, table.  In the background, so that a signal reaches the traps at once.
"$PY" "$BENCH/bench.py" --sizes "$SIZES" "$@" &
BENCH_PID=$!
wait "$BENCH_PID" && status=0 || status=$?
BENCH_PID=""
exit "$status"
