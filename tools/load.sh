#!/usr/bin/env bash
# Load run against one daemon: CLIENTS concurrent clients loop on push,
# pull and check for SECONDS, while one more client is frozen mid-pull
# (SIGSTOP, a reader that stops reading) and one TCP connection sends
# nothing. Every push and pull is verified by BLAKE3 against its source.
# Samples the daemon's resident memory and open descriptors every second;
# after the clients are gone its descriptors must return to where they
# started.
#
# Usage: tools/load.sh [CLIENTS] [SECONDS]     (defaults: 64 clients, 120 s)
#   TRANSPORT=tcp|quic (default tcp)
#   NOFILE=N             run the daemon with an open-file limit of N
#   TERN=path            a tern binary to use instead of building one
#   FLOOD=1              meanwhile, unauthenticated peers (tools/flood.py):
#                        40 TLS connections that never speak and 40 that
#                        stall mid-frame, each from two addresses and
#                        reopened when dropped, and QUIC Initials with real
#                        ClientHellos from random addresses at FLOOD_RATE/s
#                        (default 200); the real clients must not notice
# Prints one summary; exits non-zero on any failure, on a client that never
# completed an operation, or on leaked descriptors.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/tools/lib.sh"
CLIENTS=${1:-64}
SECONDS_=${2:-120}
TRANSPORT=${TRANSPORT:-tcp}
WORK=${TMPDIR:-/tmp}/tern-load
PORT=${PORT:-17575}
T=$(tern_binary "$ROOT")
LIMIT=()
[ -n "${NOFILE:-}" ] && LIMIT=(prlimit "--nofile=$NOFILE:$NOFILE")

rm -rf "$WORK" && mkdir -p "$WORK"/{module/pull,module/push,client,state,out}
cd "$WORK"
head -c 8M /dev/urandom >module/pull/big.bin
python3 "$ROOT/bench/gen_small.py" module/pull/small 200
head -c 64M /dev/urandom >module/slow.bin
cp -a module/pull src
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >token
export TERN_CONFIG_DIR=$WORK/client

DPID=
SILENT=
cleanup() {
  [ -n "$DPID" ] && kill "$DPID" 2>/dev/null && wait "$DPID" 2>/dev/null
  jobs -p | xargs -r kill 2>/dev/null
  return 0
}
trap cleanup EXIT

${LIMIT[@]+"${LIMIT[@]}"} "$T" serve --listen "127.0.0.1:$PORT" --module "m=$WORK/module" --read-write \
  --token-file token --state-dir state >daemon.out 2>daemon.log &
DPID=$!
FP=$(daemon_fingerprint daemon.out "$DPID") || { echo "daemon did not start" >&2; cat daemon.log >&2; exit 1; }
fds() { ls "/proc/$DPID/fd" | wc -l; }
rss_kib() { awk '/^VmRSS/ { print $2 }' "/proc/$DPID/status"; }
threads() { awk '/^Threads/ { print $2 }' "/proc/$DPID/status"; }
FD0=$(fds)
URL=tern://127.0.0.1:$PORT/m
A=(--transport "$TRANSPORT" --fingerprint "$FP" --token-file token -q)

# A connection that never says anything: the daemon must drop it on its
# handshake timeout without holding anything up.
exec 3<>"/dev/tcp/127.0.0.1/$PORT"
SILENT=open

FLOODERS=()
if [ -n "${FLOOD:-}" ]; then
  python3 "$ROOT/tools/flood.py" tls 40 127.0.0.1 "$PORT" 2 >out/flood.tls &
  FLOODERS+=($!)
  python3 "$ROOT/tools/flood.py" frame 40 127.0.0.1 "$PORT" 2 >out/flood.frame &
  FLOODERS+=($!)
  python3 "$ROOT/tools/flood.py" quic "${FLOOD_RATE:-200}" 127.0.0.1 "$PORT" >out/flood.quic &
  FLOODERS+=($!)
fi

# A reader that stops reading: a pull frozen for 20 s mid-transfer.
"$T" copy "${A[@]}" "$URL/slow.bin" out/slow/ 2>out/slow.err &
SLOW=$!

client() { # N
  local n=$1 ops=0 fails=0 end=$((SECONDS + SECONDS_)) op
  while [ $SECONDS -lt $end ]; do
    op=$(( (n + ops) % 3 ))
    case $op in
      0) "$T" copy "${A[@]}" src/ "$URL/push/c$n/" &&
           "$T" check "${A[@]}" src/ "$URL/push/c$n/" ;;
      1) rm -rf "out/c$n" && "$T" copy "${A[@]}" "$URL/pull/" "out/c$n/" &&
           "$T" check "${A[@]}" src/ "out/c$n/" ;;
      2) "$T" check "${A[@]}" "$URL/pull/" src/ ;;
    esac >>"out/c$n.log" 2>&1 || fails=$((fails + 1))
    ops=$((ops + 1))
  done
  echo "$ops $fails" >"out/c$n.result"
}
for ((n = 0; n < CLIENTS; n++)); do client "$n" & done

PEAK_RSS=0 PEAK_FD=0 PEAK_THREADS=0 t=0 froze=
while [ "$(ls out/*.result 2>/dev/null | wc -l)" -lt "$CLIENTS" ]; do
  r=$(rss_kib) f=$(fds)
  [ "$r" -gt "$PEAK_RSS" ] && PEAK_RSS=$r
  [ "$f" -gt "$PEAK_FD" ] && PEAK_FD=$f
  h=$(threads)
  [ "$h" -gt "$PEAK_THREADS" ] && PEAK_THREADS=$h
  if [ -z "$froze" ] && [ $t -ge 5 ]; then kill -STOP "$SLOW" 2>/dev/null || true; froze=$t; fi
  if [ -n "$froze" ] && [ "$froze" != done ] && [ $t -ge $((froze + 20)) ]; then
    kill -CONT "$SLOW" 2>/dev/null || true; froze=done
  fi
  sleep 1
  t=$((t + 1))
done
[ "$froze" = done ] || kill -CONT "$SLOW" 2>/dev/null || true
FLOODED=
if [ ${#FLOODERS[@]} -gt 0 ]; then
  kill -TERM "${FLOODERS[@]}"
  wait "${FLOODERS[@]}" || true
  FLOODED="; unauthenticated: $(cat out/flood.tls out/flood.frame out/flood.quic | tr '\n' ' ')"
fi
fail=0
if wait "$SLOW"; then
  cmp -s module/slow.bin out/slow/slow.bin || { echo "FAIL: the frozen pull landed damaged" >&2; fail=1; }
else
  echo "FAIL: the frozen pull did not complete: $(cat out/slow.err)" >&2
  fail=1
fi
# The silent connection must be closed by the daemon within its handshake
# timeout (10 s), however short the run was.
for ((i = 0; i < 150; i++)); do
  ss -Htn state established "( sport = :$PORT )" | grep -q . || break
  sleep 0.1
done
if ss -Htn state established "( sport = :$PORT )" | grep -q .; then
  echo "FAIL: connections still open after every client left:" >&2
  ss -Htn state established "( sport = :$PORT )" >&2
  fail=1
fi
exec 3<&-

ops=0 fails=0 starved=0
for ((n = 0; n < CLIENTS; n++)); do
  read -r o f <"out/c$n.result"
  ops=$((ops + o)) fails=$((fails + f))
  [ "$o" -gt 0 ] || starved=$((starved + 1))
  [ "$f" = 0 ] || { echo "client $n: $f failed operations:" >&2; tail -5 "out/c$n.log" >&2; }
done
# Descriptors return to the idle level once sessions have closed.
for ((i = 0; i < 300; i++)); do
  [ "$(fds)" -le $((FD0 + 2)) ] && break
  sleep 0.1
done
FD_END=$(fds)
echo "load: $CLIENTS clients over $TRANSPORT for ${SECONDS_}s: $ops operations, $fails failed, $starved clients starved;" \
  "daemon peak RSS $((PEAK_RSS / 1024)) MiB, peak threads $PEAK_THREADS, descriptors $FD0 idle / $PEAK_FD peak / $FD_END after;" \
  "frozen reader and silent connection: $([ $fail = 0 ] && echo ok || echo FAILED)${FLOODED}"
[ "$fails" = 0 ] && [ "$starved" = 0 ] && [ "$fail" = 0 ] && [ "$FD_END" -le $((FD0 + 2)) ]
