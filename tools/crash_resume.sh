#!/usr/bin/env bash
# Crash-and-resume trials: start a transfer, SIGKILL the client or the daemon
# at a random moment, and rerun the same command (restarting a killed
# daemon) until it succeeds; meanwhile a watcher (tools/watch_final.py)
# checks that no file ever appears at its final name with wrong content;
# then compare the whole tree by BLAKE3 (`tern check`) and require that no
# temporary or journal file is left.
#
# Usage: tools/crash_resume.sh [TRIALS] [SEED]      (defaults: 25 trials, seed 1)
#   MODE=local|push|pull    what is copied where (default local)
#   TRANSPORT=tcp|quic      for push and pull (default tcp)
#   WORKLOAD=large|small|mixed   one workload for every trial (default: the
#                           three in turn)
#   TERN=path               a tern binary to use instead of building one
# In push and pull mode each kill picks its victim at random: the client
# (`tern copy`) or the daemon (`tern serve`, restarted on the same port with
# the same identity).
# Workloads, generated under ${TMPDIR:-/tmp}/tern-crash: `large` (40 MiB and
# 9 MiB files), `small` (2,000 files of 1-16 KiB in 20 directories) and
# `mixed` (a tree with one large file and 100 small ones). Prints one line per
# trial and a summary; exits non-zero on any failure.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/tools/lib.sh"
TRIALS=${1:-25}
RANDOM=${2:-1}
MODE=${MODE:-local}
TRANSPORT=${TRANSPORT:-tcp}
WORK=${TMPDIR:-/tmp}/tern-crash
PORT=${PORT:-17474}
T=$(tern_binary "$ROOT")

mkdir -p "$WORK"
cd "$WORK"
if [ ! -f src/.ready-workloads ]; then
  rm -rf src && mkdir -p src/large src/mixed/docs
  head -c 40M /dev/urandom >src/large/big1
  head -c 9M /dev/urandom >src/large/big2
  python3 "$ROOT/bench/gen_small.py" src/small 2000
  ln src/large/big2 src/mixed/big2
  cp -al src/small/d000/s0 src/mixed/docs/s0
  touch src/.ready-workloads
fi
case ${WORKLOAD:-} in
  '') WORKLOADS=(large small mixed) ;;
  large | small | mixed) WORKLOADS=("$WORKLOAD") ;;
  *) echo "WORKLOAD must be large, small or mixed" >&2; exit 2 ;;
esac

DPID=
stop_daemon() {
  if [ -n "$DPID" ]; then
    kill "$DPID" 2>/dev/null || true
    wait "$DPID" 2>/dev/null || true
    DPID=
  fi
}
cleanup() {
  stop_daemon
  if [ -n "${WPID:-}" ]; then kill "$WPID" 2>/dev/null || true; fi
}
trap cleanup EXIT

# The daemon exports this directory: it holds `dst` for a push and a link
# to the source for a pull.
MOD=$WORK/module
export TERN_CONFIG_DIR=$WORK/client
start_daemon() {
  # Emptied here, not only by the daemon's redirect: the banner of an
  # earlier daemon must not be taken for this one's.
  : >"$WORK/daemon.out"
  "$T" serve --listen "127.0.0.1:$PORT" --module "m=$MOD" --read-write \
    --token-file "$WORK/token" --state-dir "$WORK/state" >"$WORK/daemon.out" 2>>"$WORK/daemon.log" &
  DPID=$!
  FP=$(daemon_fingerprint "$WORK/daemon.out" "$DPID") || {
    echo "daemon did not start" >&2
    cat "$WORK/daemon.log" >&2
    exit 1
  }
}

case $MODE in
  local) DST=$WORK/dst ;;
  push) DST=$MOD/dst ;;
  pull) DST=$WORK/dst ;;
  *) echo "MODE must be local, push or pull" >&2; exit 2 ;;
esac
if [ "$MODE" != local ]; then
  rm -rf "$MOD" && mkdir -p "$MOD"
  [ "$MODE" = pull ] && cp -a src "$MOD/src"
  start_daemon
  REMOTE=(--transport "$TRANSPORT" --fingerprint "$FP" --token-file "$WORK/token" --retries 1)
fi

copy_cmd() { # WORKLOAD
  case $MODE in
    local) echo "$T copy -q --chunk-size 1M --bwlimit 40M src/$1/ $DST" ;;
    push) echo "$T copy -q --chunk-size 1M --bwlimit 40M ${REMOTE[*]} src/$1/ tern://127.0.0.1:$PORT/m/dst" ;;
    pull) echo "$T copy -q --chunk-size 1M --bwlimit 40M ${REMOTE[*]} tern://127.0.0.1:$PORT/m/src/$1/ $DST" ;;
  esac
}

failures=0 kills=0 daemon_kills=0
for trial in $(seq 1 "$TRIALS"); do
  W=${WORKLOADS[$(((trial - 1) % ${#WORKLOADS[@]}))]}
  rm -rf "$DST" "$WORK/watch.stop"
  # Every file at its final name must be whole at every moment it is seen,
  # not only at the end: large files are published only once verified,
  # small ones whole or not at all.
  python3 "$ROOT/tools/watch_final.py" "src/$W" "$DST" "$WORK/watch.stop" >"$WORK/watch.out" &
  WPID=$!
  attempts=0
  while :; do
    attempts=$((attempts + 1))
    # Throttled so that a kill lands mid-transfer; a resumed run continues.
    $(copy_cmd "$W") &
    pid=$!
    # Killed within the first 0.5 s, a window that widens by 0.05 s an
    # attempt: on a loaded machine a run may need longer than 0.5 s to
    # commit its first batch of small files, and then could never finish.
    cs=$((RANDOM % (50 + 5 * attempts)))
    sleep "$((cs / 100)).$((cs % 100 / 10))$((cs % 10))"
    if kill -0 "$pid" 2>/dev/null; then
      if [ "$MODE" != local ] && [ $((RANDOM % 2)) = 0 ]; then
        kill -9 "$DPID"
        wait "$DPID" 2>/dev/null || true
        DPID=
        daemon_kills=$((daemon_kills + 1))
        # The client notices, retries once, and gives up or resumes.
        start_daemon
        wait "$pid" 2>/dev/null || true
      else
        kill -9 "$pid"
        wait "$pid" 2>/dev/null || true
      fi
      kills=$((kills + 1))
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
  touch "$WORK/watch.stop"
  wait "$WPID" || { sed "s/^/trial $trial: /" "$WORK/watch.out"; failures=$((failures + 1)); }
  "$T" check -q "src/$W" "$DST" || { echo "trial $trial: check found differences"; failures=$((failures + 1)); }
  left=$(find "$DST" -name '*.tern.*' | wc -l)
  [ "$left" = 0 ] || { echo "trial $trial: $left temporary files left"; failures=$((failures + 1)); }
  echo "trial $trial ($W): done after $attempts runs"
done
echo "crash_resume ($MODE${REMOTE:+, $TRANSPORT}): $TRIALS trials, $kills kills ($daemon_kills of the daemon), $failures failures"
[ "$failures" = 0 ]
