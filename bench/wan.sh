#!/usr/bin/env bash
# WAN benchmark: tern (QUIC, TCP, auto) vs rsync to an rsync daemon vs iperf3
# (one TCP stream, CUBIC and BBR) across emulated links, in one run. Each
# link is a pair of network namespaces joined by tern-wan (crates/tern-wan,
# docs/wan-emulator.md); every tool pushes the same 512 MiB random file from
# namespace a to a daemon in namespace b:
#   lan        1 Gbit/s,   0.5 ms RTT, no loss
#   continent  1 Gbit/s,    50 ms RTT, 0.1 % loss
#   lossy      1 Gbit/s,    50 ms RTT, 1 % loss
#   far        200 Mbit/s, 150 ms RTT, 0.5 % loss, 0.1 % of packets reordered
# Loss applies in each direction (so to acknowledgements too).
#
# Both namespaces run CUBIC, Linux's default (the host's allowed list gets
# cubic for the run, restored at exit), and allow TCP buffers of up to
# 64 MiB (tcp_rmem/tcp_wmem), as a host tuned for long paths would: with the
# default 6 MiB a single TCP stream cannot exceed about 500 Mbit/s at 50 ms
# whatever the loss. iperf3 picks its congestion control per run (-C).
#
# A run that has not finished after CAP seconds is stopped; its goodput is
# what it delivered by then (rsync runs with --partial; tern keeps its
# partial file for the resume; blocks in use on the destination tmpfs are
# counted). iperf3 sends for IPERF_SECS seconds; its goodput is what the
# receiver got. Data lives on tmpfs, so disks play no part.
#
# Usage: bench/wan.sh                       (PROFILES="lan continent lossy far" SIZE=512M CAP=60 IPERF_SECS=20 ROUNDS=1)
#        PROFILES=lossy SIZE=128M bench/wan.sh
# Needs root, rsync, iperf3, python3, iproute2. Writes docs/benchmarks/wan.md
# and docs/benchmarks/wan.svg; raw figures go to $TERN_BENCH_DIR
# (default /tmp/tern-bench-wan).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/bench/lib.sh"
WORK=${TERN_BENCH_DIR:-${TMPDIR:-/tmp}/tern-bench-wan}
PROFILES=${PROFILES:-lan continent lossy far}
SIZE=${SIZE:-512M}
CAP=${CAP:-60}
IPERF_SECS=${IPERF_SECS:-20}
ROUNDS=${ROUNDS:-1}
TOOLS=${TOOLS:-tern-quic tern-tcp tern-auto rsync iperf3-cubic iperf3-bbr}
OUT_MD=${OUT_MD:-$ROOT/docs/benchmarks/wan.md}
NS=${NS:-ternbench}
A=$NS-a B=$NS-b
ADDR=10.99.0.2
TERN_PORT=17373 RSYNC_PORT=18730 IPERF_PORT=15201

need=()
for pair in rsync:rsync iperf3:iperf3 python3:python3 ss:iproute2 bc:bc; do
  command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
[ "$(id -u)" = 0 ] || { echo "bench/wan.sh needs root (network namespaces, TUN, tmpfs)" >&2; exit 1; }
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
ALLOWED_CC=$(sysctl -n net.ipv4.tcp_allowed_congestion_control)
cleanup() {
  stop_daemons
  stop_link
  sysctl -q -w net.ipv4.tcp_allowed_congestion_control="$ALLOWED_CC" || true
  mountpoint -q "$RAM" 2>/dev/null && umount "$RAM"
  return 0
}
trap cleanup EXIT

# A namespace may only default to a congestion control the host allows.
case " $ALLOWED_CC " in
  *" cubic "*) ;;
  *) sysctl -q -w net.ipv4.tcp_allowed_congestion_control="$ALLOWED_CC cubic" ;;
esac

BYTES=$(numfmt --from=iec "$SIZE")
mount -t tmpfs -o "size=$((BYTES * 3 / 1048576 + 256))M" tmpfs "$RAM"
mkdir -p "$RAM/src" "$RAM/push"
head -c "$BYTES" /dev/urandom >"$RAM/src/file.bin"

tern_credentials "$WORK" "$TERN"
cat >"$WORK/rsyncd.conf" <<CONF
port = $RSYNC_PORT
address = $ADDR
use chroot = no
uid = root
gid = root
[push]
path = $RAM/push
read only = false
CONF


start_link() { # PROFILE
  "$WAN" --name "$NS" --replace --profile "$1" >"$WORK/wan.out" 2>"$WORK/wan.err" &
  WAN_PID=$!
  wait_for grep -q ready "$WORK/wan.out"
  local ns
  for ns in "$A" "$B"; do
    ip netns exec "$ns" sysctl -q -w net.ipv4.tcp_congestion_control=cubic \
      net.ipv4.tcp_rmem="4096 131072 67108864" net.ipv4.tcp_wmem="4096 16384 67108864"
  done
  ip netns exec "$B" "$TERN" serve --listen "$ADDR:$TERN_PORT" --module "push=$RAM/push" \
    --read-write --token-file "$TOKEN" >/dev/null 2>"$WORK/daemon.err" &
  DAEMON_PIDS+=($!)
  ip netns exec "$B" rsync --daemon --no-detach --config="$WORK/rsyncd.conf" 2>"$WORK/rsyncd.err" &
  DAEMON_PIDS+=($!)
  ip netns exec "$B" iperf3 -s -B "$ADDR" -p "$IPERF_PORT" >/dev/null 2>&1 &
  DAEMON_PIDS+=($!)
  wait_for listening "$TERN_PORT"
  wait_for listening "$RSYNC_PORT"
  wait_for listening "$IPERF_PORT"
}

RESULTS=$WORK/results.tsv
: >"$RESULTS"
# record PROFILE TOOL ROUND SECONDS BYTES FINISHED NOTE
record() {
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$RESULTS"
  printf '%-10s %-13s round %s: %7.2fs %12s bytes %s %s\n' "$1" "$2" "$3" "$4" "$5" "$6" "$7" >&2
}

run_tool() { # PROFILE TOOL ROUND
  local prof=$1 tool=$2 round=$3 dest=$RAM/push/$1-$2-$3 t0 t1 rc=0 secs bytes done_ note=-
  if [[ $tool == iperf3-* ]]; then
    local out
    out=$(ip netns exec "$A" iperf3 -c "$ADDR" -p "$IPERF_PORT" -t "$IPERF_SECS" -C "${tool#iperf3-}" -J) || true
    read -r secs bytes < <(python3 -c 'import json,sys; e=json.load(sys.stdin)["end"]["sum_received"]; print(e["seconds"], e["bytes"])' <<<"$out")
    record "$prof" "$tool" "$round" "$secs" "$bytes" timed -
    return 0
  fi
  mkdir -p "$dest"
  local c
  case $tool in
    tern-*) c=("$TERN" copy -q --json --transport "${tool#tern-}" --fingerprint "$FP" --token-file "$TOKEN"
      "$RAM/src/file.bin" "tern://$ADDR:$TERN_PORT/push/$(basename "$dest")/") ;;
    rsync) c=(rsync -a --partial "$RAM/src/file.bin" "rsync://$ADDR:$RSYNC_PORT/push/$(basename "$dest")/") ;;
  esac
  t0=$(date +%s.%N)
  ip netns exec "$A" timeout "$CAP" "${c[@]}" >"$WORK/client.out" 2>"$WORK/client.err" || rc=$?
  t1=$(date +%s.%N)
  secs=$(echo "$t1 - $t0" | bc)
  if [ "$rc" = 0 ]; then
    done_=yes
    bytes=$(stat -c %s "$dest/file.bin")
    [ "$bytes" = "$BYTES" ] || { echo "$tool: wrong size at $dest" >&2; exit 1; }
    if [[ $tool == tern-* ]]; then
      note=$(python3 -c 'import json,sys; s=json.load(sys.stdin); print(s.get("transport","-"))' <"$WORK/client.out" 2>/dev/null || echo -)
    fi
  elif [ "$rc" = 124 ]; then
    done_=no
    secs=$CAP
    bytes=$(du -s -B1 "$dest" | cut -f1)
  else
    echo "FAILED ($rc): ${c[*]}" >&2
    cat "$WORK/client.err" "$WORK/daemon.err" >&2
    exit 1
  fi
  record "$prof" "$tool" "$round" "$secs" "$bytes" "$done_" "$note"
  rm -rf "$dest"
}

for prof in $PROFILES; do
  start_link "$prof"
  grep '→' "$WORK/wan.err" >&2 || true
  for ((r = 1; r <= ROUNDS; r++)); do
    # A new seeded order each round, so no tool always runs first.
    for t in $(python3 -c 'import random, sys; t = sys.argv[2:]; random.Random(sys.argv[1]).shuffle(t); print(*t)' "$prof$r" $TOOLS); do
      run_tool "$prof" "$t" "$r"
    done
  done
  stop_daemons
  stop_link
  grep 'packets' "$WORK/wan.err" >&2 || true
  cp "$WORK/wan.err" "$WORK/wan-$prof.log"
done

write_report "$OUT_MD" bench/wan.sh python3 "$ROOT/bench/report_wan.py" "$RESULTS" "$BYTES" "$CAP" "$IPERF_SECS" "${OUT_MD%.md}.svg" "$TERN"
cat "$OUT_MD"
