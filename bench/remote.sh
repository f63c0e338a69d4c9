#!/usr/bin/env bash
# Remote transfer benchmark on loopback: tern over QUIC and over TCP+TLS vs
# rsync to an rsync daemon (rsync://, unencrypted) vs iperf3 (one TCP stream,
# no disk, no encryption: the link's ceiling), side by side in one run:
#   big-push    a 2 GiB random file, client -> daemon
#   big-pull    the same file, daemon -> client
#   small-push  20,000 random files of 1-16 KiB in nested directories
# plus one 4 GiB push and pull per tern transport (memory check).
#
# Every run gets a fresh daemon (started untimed, under GNU time, stopped with
# SIGTERM afterwards), so each side's CPU seconds and peak RSS belong to that
# run alone; rsync's daemon forks a child per connection, whose figures GNU
# time folds into the daemon's. A run's time is the client's wall time plus a
# `sync`, since tern's daemon makes the data durable and rsync's does not.
# Tools alternate in a new seeded random order each round; each run writes to
# a fresh destination name; the source is read into the page cache first.
#
# Storage: ext4 on a loop device backed by RAM (needs root), as in
# bench/local.sh: the same file system code with the virtual disk's noise
# removed. The 4 GiB check runs on the machine's disk (it would not fit in
# RAM twice); it reports memory, its times are only indicative.
#
# Usage: bench/remote.sh                     (ROUNDS=5 BIG=2G SMALL=20000 HUGE=4G)
#        ROUNDS=2 BIG=512M SMALL=5000 HUGE=0 bench/remote.sh     (quicker; HUGE=0 skips)
# Needs root, rsync, iperf3, GNU time, python3, ss (iproute2); installs the
# missing Debian packages when it can. Writes docs/benchmarks/remote.md; data
# and raw figures go to $TERN_BENCH_DIR (default /tmp/tern-bench-remote).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/bench/lib.sh"
WORK=${TERN_BENCH_DIR:-${TMPDIR:-/tmp}/tern-bench-remote}
ROUNDS=${ROUNDS:-5}
BIG=${BIG:-2G}
SMALL=${SMALL:-20000}
HUGE=${HUGE:-4G}
OUT_MD=${OUT_MD:-$ROOT/docs/benchmarks/remote.md}
TERN_PORT=${TERN_PORT:-17373}
RSYNC_PORT=${RSYNC_PORT:-18730}
IPERF_PORT=${IPERF_PORT:-15201}

need=()
for pair in rsync:rsync iperf3:iperf3 /usr/bin/time:time python3:python3 ss:iproute2 bc:bc; do
  command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "bench/remote.sh needs: ${need[*]} (apt-get install ${need[*]})" >&2
    exit 1
  fi
fi
[ "$(id -u)" = 0 ] || { echo "bench/remote.sh needs root (it mounts a RAM-backed ext4)" >&2; exit 1; }

(cd "$ROOT" && cargo build --release -q -p tern)
TERN=$ROOT/target/release/tern

mkdir -p "$WORK"
RAM=$WORK/ram
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  mountpoint -q "$RAM/ext4" 2>/dev/null && umount "$RAM/ext4"
  mountpoint -q "$RAM/tmpfs" 2>/dev/null && umount "$RAM/tmpfs"
  return 0
}
trap cleanup EXIT

BIG_BYTES=$(numfmt --from=iec "$BIG")
HUGE_BYTES=0
[ "$HUGE" != 0 ] && HUGE_BYTES=$(numfmt --from=iec "$HUGE")
DATA=$WORK/data
mkdir -p "$DATA"
if [ ! -f "$DATA/big.bin" ] || [ "$(stat -c %s "$DATA/big.bin")" != "$BIG_BYTES" ]; then
  echo "generating $BIG random file..." >&2
  head -c "$BIG_BYTES" /dev/urandom >"$DATA/big.bin.tmp" && mv "$DATA/big.bin.tmp" "$DATA/big.bin"
fi
if [ ! -f "$DATA/small.count" ] || [ "$(cat "$DATA/small.count")" != "$SMALL" ]; then
  echo "generating $SMALL small files..." >&2
  rm -rf "$DATA/small"
  python3 "$ROOT/bench/gen_small.py" "$DATA/small" "$SMALL"
  echo "$SMALL" >"$DATA/small.count"
fi
if [ "$HUGE_BYTES" != 0 ]; then
  mkdir -p "$DATA/huge"
  if [ ! -f "$DATA/huge/huge.bin" ] || [ "$(stat -c %s "$DATA/huge/huge.bin")" != "$HUGE_BYTES" ]; then
    echo "generating $HUGE random file..." >&2
    head -c "$HUGE_BYTES" /dev/urandom >"$DATA/huge/huge.bin.tmp" && mv "$DATA/huge/huge.bin.tmp" "$DATA/huge/huge.bin"
  fi
fi

mkdir -p "$RAM/tmpfs" "$RAM/ext4"
img_mb=$((BIG_BYTES * 3 / 1048576 + 1024))
mount -t tmpfs -o "size=$((img_mb + 64))M" tmpfs "$RAM/tmpfs"
# Allocate the image's memory up front, and no lazy inode-table init (it would
# run in the background during the runs).
fallocate -l "${img_mb}M" "$RAM/tmpfs/ext4.img"
mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$RAM/tmpfs/ext4.img"
mount -o loop "$RAM/tmpfs/ext4.img" "$RAM/ext4"
BASE=$RAM/ext4
mkdir -p "$BASE/src" "$BASE/push" "$BASE/pull"
cp "$DATA/big.bin" "$BASE/src/" && cp -a "$DATA/small" "$BASE/src/"

# One identity, token and pinned key for all tern daemons and clients.
tern_credentials "$WORK" "$TERN"

cat >"$WORK/rsyncd.conf" <<EOF
port = $RSYNC_PORT
address = 127.0.0.1
use chroot = no
uid = root
gid = root
[src]
path = $BASE/src
read only = true
[push]
path = $BASE/push
read only = false
[huge]
path = $DATA/huge
read only = true
[hugepush]
path = $WORK/hugepush
read only = false
EOF

wait_listening() { # PORT PID
  local i
  for ((i = 0; i < 500; i++)); do
    ss -Hltn "sport = :$1" | grep -q . && return 0
    kill -0 "$2" 2>/dev/null || { echo "daemon exited before listening" >&2; cat "$WORK/daemon.err" >&2; exit 1; }
    sleep 0.02
  done
  echo "daemon did not listen on port $1" >&2
  exit 1
}

DAEMON_PID=
start_daemon() { # KIND SRC_DIR PUSH_DIR
  if [ "$1" = rsync ]; then
    /usr/bin/time -f '%U %S %M' -o "$WORK/daemon.time" \
      rsync --daemon --no-detach --config="$WORK/rsyncd.conf" 2>"$WORK/daemon.err" &
    DAEMON_PID=$!
    wait_listening "$RSYNC_PORT" "$DAEMON_PID"
  else
    /usr/bin/time -f '%U %S %M' -o "$WORK/daemon.time" \
      "$TERN" serve --listen "127.0.0.1:$TERN_PORT" --module "src=$2" --module "push=$3" \
      --read-write --token-file "$TOKEN" >/dev/null 2>"$WORK/daemon.err" &
    DAEMON_PID=$!
    wait_listening "$TERN_PORT" "$DAEMON_PID"
  fi
  PIDS+=("$DAEMON_PID")
}

# /usr/bin/time runs the daemon as its child: signal the daemon itself.
stop_daemon() {
  local child
  child=$(pgrep -P "$DAEMON_PID" | head -1 || true)
  [ -n "$child" ] && kill -TERM "$child" 2>/dev/null
  wait "$DAEMON_PID" 2>/dev/null || true
  PIDS=("${PIDS[@]/$DAEMON_PID/}")
}

# cmd WORKLOAD TOOL RUN: the client command (destinations are fresh names).
cmd() {
  local t=(--fingerprint "$FP" --token-file "$TOKEN")
  case $1/$2 in
    big-push/tern-*) echo "$TERN copy -q --transport ${2#tern-} ${t[*]} $BASE/src/big.bin tern://127.0.0.1:$TERN_PORT/push/$3/" ;;
    big-pull/tern-*) echo "$TERN copy -q --transport ${2#tern-} ${t[*]} tern://127.0.0.1:$TERN_PORT/src/big.bin $BASE/pull/$3/" ;;
    small-push/tern-*) echo "$TERN copy -q --transport ${2#tern-} ${t[*]} $BASE/src/small/ tern://127.0.0.1:$TERN_PORT/push/$3" ;;
    huge-push/tern-*) echo "$TERN copy -q --transport ${2#tern-} ${t[*]} $DATA/huge/huge.bin tern://127.0.0.1:$TERN_PORT/push/$3/" ;;
    huge-pull/tern-*) echo "$TERN copy -q --transport ${2#tern-} ${t[*]} tern://127.0.0.1:$TERN_PORT/src/huge.bin $WORK/hugepull/$3/" ;;
    big-push/rsync) echo "rsync -a $BASE/src/big.bin rsync://127.0.0.1:$RSYNC_PORT/push/$3/" ;;
    big-pull/rsync) echo "rsync -a rsync://127.0.0.1:$RSYNC_PORT/src/big.bin $BASE/pull/$3/" ;;
    small-push/rsync) echo "rsync -a $BASE/src/small/ rsync://127.0.0.1:$RSYNC_PORT/push/$3/" ;;
    huge-push/rsync) echo "rsync -a $DATA/huge/huge.bin rsync://127.0.0.1:$RSYNC_PORT/hugepush/$3/" ;;
    huge-pull/rsync) echo "rsync -a rsync://127.0.0.1:$RSYNC_PORT/huge/huge.bin $WORK/hugepull/$3/" ;;
  esac
}

RESULTS=$WORK/results.tsv
: >"$RESULTS"

# record WORKLOAD TOOL ROUND SECONDS CLIENT(U S RSS) SERVER(U S RSS)
record() {
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" >>"$RESULTS"
  printf '%-10s %-9s round %s: %6.2fs\n' "$1" "$2" "$3" "$4" >&2
}

measure() { # WORKLOAD TOOL ROUND
  local wl=$1 tool=$2 round=$3 run="$1-$2-$3" src dest srcdir pushdir c t0 t1
  case $wl in
    big-*) src=$BASE/src/big.bin ;;
    small-*) src=$BASE/src/small ;;
    huge-*) src=$DATA/huge/huge.bin ;;
  esac
  case $wl in
    big-push | small-push) dest=$BASE/push/$run ;;
    big-pull) dest=$BASE/pull/$run ;;
    huge-push) dest=$WORK/hugepush/$run ;;
    huge-pull) dest=$WORK/hugepull/$run ;;
  esac
  srcdir=$BASE/src pushdir=$BASE/push
  [ "${wl%-*}" = huge ] && srcdir=$DATA/huge pushdir=$WORK/hugepush
  mkdir -p "$WORK/hugepush" "$WORK/hugepull" "$BASE/pull"
  # rsync creates only the last level of a destination; make pull parents.
  [ "${wl#*-}" = pull ] && mkdir -p "$dest"
  if [ "$tool" = rsync ]; then start_daemon rsync; else start_daemon tern "$srcdir" "$pushdir"; fi
  c=$(cmd "$wl" "$tool" "$run")
  find "$src" -type f -exec cat {} + >/dev/null
  sync
  t0=$(date +%s.%N)
  if ! /usr/bin/time -f '%U %S %M' -o "$WORK/client.time" $c >/dev/null 2>"$WORK/err"; then
    echo "FAILED: $c" >&2
    cat "$WORK/err" "$WORK/daemon.err" >&2
    exit 1
  fi
  sync
  t1=$(date +%s.%N)
  stop_daemon
  # A copy that is not complete does not count.
  case $wl in
    big-*) [ "$(stat -c %s "$dest/big.bin")" = "$BIG_BYTES" ] || { echo "$tool: wrong size in $dest" >&2; exit 1; } ;;
    huge-*) [ "$(stat -c %s "$dest/huge.bin")" = "$HUGE_BYTES" ] || { echo "$tool: wrong size in $dest" >&2; exit 1; } ;;
    small-*) [ "$(find "$dest" -type f | wc -l)" = "$SMALL" ] || { echo "$tool: wrong file count in $dest" >&2; exit 1; } ;;
  esac
  [ "$round" -gt 0 ] && record "$wl" "$tool" "$round" "$(echo "$t1 - $t0" | bc)" "$(cat "$WORK/client.time")" "$(cat "$WORK/daemon.time")"
  rm -rf "$dest" && sync
  sleep 1
  return 0
}

iperf() { # WORKLOAD ROUND: iperf3 sends as many bytes as the big file
  local rev=() out secs
  [ "$1" = big-pull ] && rev=(-R)
  iperf3 -s -1 -p "$IPERF_PORT" -B 127.0.0.1 >/dev/null 2>&1 &
  DAEMON_PID=$!
  PIDS+=("$DAEMON_PID")
  wait_listening "$IPERF_PORT" "$DAEMON_PID"
  out=$(iperf3 -c 127.0.0.1 -p "$IPERF_PORT" -n "$BIG_BYTES" "${rev[@]}" -J)
  wait "$DAEMON_PID" 2>/dev/null || true
  secs=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["seconds"])' <<<"$out")
  [ "$2" -gt 0 ] && record "$1" iperf3 "$2" "$secs" "0 0 0" "0 0 0"
  sleep 1
  return 0
}

tools=(tern-quic tern-tcp rsync iperf3)
for wl in big-push big-pull small-push; do
  for ((r = 0; r <= ROUNDS; r++)); do
    for t in $(python3 -c 'import random, sys; t = sys.argv[2:]; random.Random(int(sys.argv[1])).shuffle(t); print(*t)' "$r" "${tools[@]}"); do
      if [ "$t" = iperf3 ]; then
        [ "$wl" != small-push ] && iperf "$wl" "$r"
      else
        measure "$wl" "$t" "$r"
      fi
    done
  done
done
if [ "$HUGE_BYTES" != 0 ]; then
  for wl in huge-push huge-pull; do
    for t in tern-quic tern-tcp rsync; do measure "$wl" "$t" 1; done
  done
fi

write_report "$OUT_MD" bench/remote.sh python3 "$ROOT/bench/report_remote.py" "$RESULTS" "$BIG_BYTES" "$SMALL" "$(du -sb "$DATA/small" | cut -f1)" "$HUGE_BYTES" "$ROUNDS" "$TERN"
cat "$OUT_MD"
