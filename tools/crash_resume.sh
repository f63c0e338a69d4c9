#!/usr/bin/env bash
# Crash-and-resume trials for local copies: start `tern copy`, SIGKILL it at a
# random moment, check that no file at its final name has wrong content, and
# rerun the same command until it succeeds; then compare the whole tree by
# BLAKE3 (`tern check`) and require that no temporary or journal file is left.
#
# Usage: tools/crash_resume.sh [TRIALS] [SEED]      (defaults: 25 trials, seed 1)
# The workload (two large files, 2,000 small ones) is generated under
# ${TMPDIR:-/tmp}/tern-crash. Prints one line per trial and a summary; exits
# non-zero on any failure.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TRIALS=${1:-25}
RANDOM=${2:-1}
WORK=${TMPDIR:-/tmp}/tern-crash
(cd "$ROOT" && cargo build --release -q -p tern)
T=$ROOT/target/release/tern

mkdir -p "$WORK"
cd "$WORK"
if [ ! -f src/.ready ]; then
  rm -rf src && mkdir src
  head -c 40M /dev/urandom >src/big1
  head -c 9M /dev/urandom >src/big2
  python3 "$ROOT/bench/gen_small.py" src/small 2000
  touch src/.ready
fi

failures=0 kills=0
for trial in $(seq 1 "$TRIALS"); do
  rm -rf dst
  attempts=0
  while :; do
    attempts=$((attempts + 1))
    # Throttled so that a kill lands mid-transfer; a resumed run continues.
    "$T" copy -q --chunk-size 1M --bwlimit 40M src/ dst &
    pid=$!
    sleep "0.$((RANDOM % 5))$((RANDOM % 10))"
    if kill -0 "$pid" 2>/dev/null; then
      kill -9 "$pid"
      wait "$pid" 2>/dev/null || true
      kills=$((kills + 1))
      for f in big1 big2; do
        if [ -f "dst/$f" ] && ! cmp -s "dst/$f" "src/$f"; then
          echo "trial $trial: wrong content at final name $f"
          failures=$((failures + 1))
        fi
      done
    else
      rc=0
      wait "$pid" || rc=$?
      [ "$rc" = 0 ] && break
      echo "trial $trial: tern exited $rc"
      failures=$((failures + 1))
    fi
    if [ "$attempts" -gt 60 ]; then
      echo "trial $trial: no progress after $attempts attempts"
      failures=$((failures + 1))
      break
    fi
  done
  "$T" check -q src dst || { echo "trial $trial: check found differences"; failures=$((failures + 1)); }
  left=$(find dst -name '*.tern.*' | wc -l)
  [ "$left" = 0 ] || { echo "trial $trial: $left temporary files left"; failures=$((failures + 1)); }
  echo "trial $trial: done after $attempts runs"
done
echo "crash_resume: $TRIALS trials, $kills kills, $failures failures"
[ "$failures" = 0 ]
