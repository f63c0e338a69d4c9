#!/usr/bin/env bash
# Latency benchmark: trees of small files between a client and a daemon
# one emulated long link apart, tern against rsync to an rsync daemon, in
# one run. Two profiles (crates/tern-wan, docs/wan-emulator.md), no loss:
#   wan100   100 Mbit/s, 50 ms RTT
#   lan1g    1 Gbit/s,   10 ms RTT
# Cases, each with a fresh destination name, tools alternating in a seeded
# order each round:
#   push-1k / pull-1k    1,000 files of 1-16 KiB in 100 directories
#   push-20k / pull-20k  20,000 such files in 200 directories
#   sync-20k             `tern sync` / `rsync -a` of the 20k tree when nothing changed
#   check-20k            `tern check` / `rsync -a -c -n` of the 20k tree
#   one                  one 1-byte file pushed: the fixed cost of a run
# Data lives on tmpfs on both sides (no disk in the way; tern's fsyncs are
# free there, as rsync makes none). tern runs with its defaults (the
# transport `auto` picks, BBR where it is TCP); rsync uses the namespaces'
# default TCP (CUBIC).
#
# Usage: bench/latency.sh          (PROFILES="wan100 lan1g" ROUNDS=3 CASES=...)
# Needs root, rsync, python3, iproute2. Writes docs/benchmarks/latency.md;
# raw figures go to $TERN_BENCH_DIR (default /tmp/tern-bench-latency).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/bench/lib.sh"
WORK=${TERN_BENCH_DIR:-${TMPDIR:-/tmp}/tern-bench-latency}
PROFILES=${PROFILES:-wan100 lan1g}
ROUNDS=${ROUNDS:-3}
CASES=${CASES:-one push-1k pull-1k push-20k pull-20k sync-20k check-20k}
OUT_MD=${OUT_MD:-$ROOT/docs/benchmarks/latency.md}
NS=${NS:-ternlat}
A=$NS-a B=$NS-b
ADDR=10.99.0.2
TERN_PORT=17374 RSYNC_PORT=18731

[ "$(id -u)" = 0 ] || { echo "bench/latency.sh needs root (network namespaces, TUN, tmpfs)" >&2; exit 1; }
need=()
for pair in rsync:rsync python3:python3 ss:iproute2; do
  command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

(cd "$ROOT" && cargo build --release -q -p tern -p tern-wan)
TERN=$ROOT/target/release/tern
WAN=$ROOT/target/release/tern-wan

mkdir -p "$WORK"
RAM=$WORK/ram
mkdir -p "$RAM"
WAN_PID= DAEMON_PIDS=()
cleanup() {
  stop_daemons
  stop_link
  mountpoint -q "$RAM" 2>/dev/null && umount "$RAM"
  return 0
}
trap cleanup EXIT

mount -t tmpfs -o size=2G tmpfs "$RAM"
# The client's trees (a), and the daemon's module (b) holding the same trees
# for pulls, the no-change sync and the check (copied with their times).
mkdir -p "$RAM/a" "$RAM/b/m" "$RAM/a/pulled"
python3 "$ROOT/bench/gen_small.py" "$RAM/a/t1k" 1000 10
python3 "$ROOT/bench/gen_small.py" "$RAM/a/t20k" 20000 100
printf x >"$RAM/a/one"
cp -a "$RAM/a/t1k" "$RAM/a/t20k" "$RAM/b/m/"

tern_credentials "$WORK" "$TERN"
cat >"$WORK/rsyncd.conf" <<CONF
port = $RSYNC_PORT
address = $ADDR
use chroot = no
uid = root
gid = root
[m]
path = $RAM/b/m
read only = false
CONF


start_link() { # PROFILE
  local spec
  case $1 in
    wan100) spec=(--rate 100mbit --delay 25ms) ;;
    lan1g) spec=(--rate 1gbit --delay 5ms) ;;
    *) echo "unknown profile $1" >&2; exit 2 ;;
  esac
  "$WAN" --name "$NS" --replace "${spec[@]}" >"$WORK/wan.out" 2>"$WORK/wan.err" &
  WAN_PID=$!
  wait_for grep -q ready "$WORK/wan.out"
  ip netns exec "$B" "$TERN" serve --listen "$ADDR:$TERN_PORT" --module "m=$RAM/b/m" \
    --read-write --token-file "$TOKEN" >/dev/null 2>"$WORK/daemon.err" &
  DAEMON_PIDS+=($!)
  ip netns exec "$B" rsync --daemon --no-detach --config="$WORK/rsyncd.conf" 2>"$WORK/rsyncd.err" &
  DAEMON_PIDS+=($!)
  wait_for listening "$TERN_PORT"
  wait_for listening "$RSYNC_PORT"
}

RESULTS=$WORK/results.tsv
: >"$RESULTS"
# record PROFILE CASE TOOL ROUND SECONDS REQUESTS WAITS TRANSPORT
record() {
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$RESULTS"
  printf '%-7s %-10s %-6s round %s: %7.3fs requests %s waits %s %s\n' "$@" >&2
}

run_case() { # PROFILE CASE TOOL ROUND
  local prof=$1 case=$2 tool=$3 round=$4 name="$1-$2-$3-$4" c t0 t1 rc=0
  local tu="tern://$ADDR:$TERN_PORT/m" ru="rsync://$ADDR:$RSYNC_PORT/m"
  local tern=("$TERN" --json --no-progress --fingerprint "$FP" --token-file "$TOKEN")
  local tree=t1k
  [[ $case == *20k ]] && tree=t20k
  case $case/$tool in
    one/tern) c=("$TERN" copy "${tern[@]:1}" "$RAM/a/one" "$tu/$name") ;;
    one/rsync) c=(rsync -a "$RAM/a/one" "$ru/$name") ;;
    push-*/tern) c=("$TERN" copy "${tern[@]:1}" "$RAM/a/$tree/" "$tu/$name/") ;;
    push-*/rsync) c=(rsync -a "$RAM/a/$tree/" "$ru/$name/") ;;
    pull-*/tern) c=("$TERN" copy "${tern[@]:1}" "$tu/$tree/" "$RAM/a/pulled/$name/") ;;
    pull-*/rsync) c=(rsync -a "$ru/$tree/" "$RAM/a/pulled/$name/") ;;
    sync-*/tern) c=("$TERN" sync "${tern[@]:1}" "$RAM/a/$tree/" "$tu/$tree/") ;;
    sync-*/rsync) c=(rsync -a "$RAM/a/$tree/" "$ru/$tree/") ;;
    check-*/tern) c=("$TERN" check "${tern[@]:1}" "$RAM/a/$tree/" "$tu/$tree/") ;;
    check-*/rsync) c=(rsync -a -c -n "$RAM/a/$tree/" "$ru/$tree/") ;;
  esac
  t0=$(date +%s.%N)
  ip netns exec "$A" "${c[@]}" >"$WORK/client.out" 2>"$WORK/client.err" || rc=$?
  t1=$(date +%s.%N)
  if [ "$rc" != 0 ]; then
    echo "FAILED ($rc): ${c[*]}" >&2
    cat "$WORK/client.err" "$WORK/daemon.err" >&2
    exit 1
  fi
  local req=- waits=- transport=-
  if [ "$tool" = tern ]; then
    read -r req waits transport < <(python3 -c '
import json, sys
s = json.load(sys.stdin)
assert s["errors"] == 0 and s.get("differences", 0) == 0, s["error_messages"]
print(s["requests"], s["waits"], s["transport"])' <"$WORK/client.out")
  fi
  record "$prof" "$case" "$tool" "$round" "$(python3 -c "print($t1 - $t0)")" "$req" "$waits" "$transport"
  # Fresh names each time: nothing pushed or pulled is reused.
  rm -rf "$RAM/b/m/$name" "$RAM/a/pulled/$name"
}

for prof in $PROFILES; do
  start_link "$prof"
  grep '→' "$WORK/wan.err" >&2 || true
  for ((r = 1; r <= ROUNDS; r++)); do
    for case in $CASES; do
      for t in $(python3 -c 'import random, sys; t = ["tern", "rsync"]; random.Random(sys.argv[1]).shuffle(t); print(*t)' "$prof$case$r"); do
        run_case "$prof" "$case" "$t" "$r"
      done
    done
  done
  stop_daemons
  stop_link
done

write_report "$OUT_MD" bench/latency.sh python3 "$ROOT/bench/report_latency.py" "$RESULTS" "$TERN"
cat "$OUT_MD"
