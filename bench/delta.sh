#!/usr/bin/env bash
# Delta transfer: tern against rsync (to and from an rsync daemon), a file
# whose old version is already at the destination, on loopback, both ways.
# Bytes are what each sent on the wire (tern: TCP bytes of its connections,
# TLS included, from its --json; rsync: its --stats "Total bytes sent" and
# "received"); times are wall clock of the client, medians of RUNS.
#
# Usage: bench/delta.sh            (SIZE=1G RUNS=3; TERN=path to use a built binary)
# Writes docs/benchmarks/delta.md. Needs rsync. Runs on tmpfs (WORK,
# default /dev/shm/tern-delta): about 8 x SIZE of memory.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/bench/lib.sh"
. "$ROOT/tools/lib.sh"
SIZE=${SIZE:-1G}
RUNS=${RUNS:-3}
WORK=${WORK:-/dev/shm/tern-delta}
TERN=$(tern_binary "$ROOT")
TERN_PORT=${TERN_PORT:-17620}
RSYNC_PORT=${RSYNC_PORT:-17621}
command -v rsync >/dev/null || { echo "bench/delta.sh needs rsync (apt-get install rsync)" >&2; exit 1; }

rm -rf "$WORK" && mkdir -p "$WORK"/{cases,tern,rsync,local}
BYTES=$(numfmt --from=iec "$SIZE")
MIB=$((1 << 20))

# The cases: an old version and a new one of the same file.
head -c "$BYTES" /dev/urandom >"$WORK/cases/old"
python3 - "$WORK/cases" "$BYTES" <<'EOF'
import os, sys
d, size = sys.argv[1], int(sys.argv[2])
old = open(f"{d}/old", "rb").read()
def put(name, data):
    open(f"{d}/{name}", "wb").write(data)
b = bytearray(old)
piece = size // 100 // 100          # 1% of the file in 100 places
for k in range(100):
    at = k * (size // 100) + 4096
    b[at:at + piece] = os.urandom(piece)
put("scattered", bytes(b))
put("insert", os.urandom(1 << 20) + old)
put("append", old + os.urandom(10 << 20))
put("rewrite", os.urandom(size))
EOF
CASES=(scattered insert append rewrite)

tern_credentials "$WORK" "$TERN"
cat >"$WORK/rsyncd.conf" <<EOF
port = $RSYNC_PORT
address = 127.0.0.1
use chroot = no
$([ "$(id -u)" = 0 ] && printf 'uid = root\ngid = root')
[m]
path = $WORK/rsync
read only = false
EOF
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
rsync --daemon --no-detach --config="$WORK/rsyncd.conf" 2>"$WORK/rsyncd.err" &
PIDS+=($!)
"$TERN" serve --listen "127.0.0.1:$TERN_PORT" --module "m=$WORK/tern" --read-write \
  --token-file "$TOKEN" >/dev/null 2>"$WORK/ternd.err" &
PIDS+=($!)
for port in "$TERN_PORT" "$RSYNC_PORT"; do
  for ((i = 0; i < 500; i++)); do ss -Hltn "sport = :$port" | grep -q . && break; sleep 0.02; done
done
T=(--fingerprint "$FP" --token-file "$TOKEN" --transport tcp --json -q)

# run CASE TOOL DIR: one transfer; prints "seconds sent_bytes".
run() {
  local c=$1 tool=$2 dir=$3 out t0 t1
  # The destination holds the old version; the source the new one.
  case $dir in
    push)
      cp "$WORK/cases/old" "$WORK/$([ "$tool" = rsync ] && echo rsync || echo tern)/f"
      cp "$WORK/cases/$c" "$WORK/local/f" ;;
    pull)
      cp "$WORK/cases/$c" "$WORK/$([ "$tool" = rsync ] && echo rsync || echo tern)/f"
      cp "$WORK/cases/old" "$WORK/local/f" ;;
  esac
  sync
  t0=$(date +%s.%N)
  case $tool/$dir in
    tern/push) out=$("$TERN" copy "${T[@]}" "$WORK/local/f" "tern://127.0.0.1:$TERN_PORT/m/") ;;
    tern-W/push) out=$("$TERN" copy -W "${T[@]}" "$WORK/local/f" "tern://127.0.0.1:$TERN_PORT/m/") ;;
    tern/pull) out=$("$TERN" copy "${T[@]}" "tern://127.0.0.1:$TERN_PORT/m/f" "$WORK/local/") ;;
    tern-W/pull) out=$("$TERN" copy -W "${T[@]}" "tern://127.0.0.1:$TERN_PORT/m/f" "$WORK/local/") ;;
    rsync/push) out=$(rsync --stats -t -I "$WORK/local/f" "rsync://127.0.0.1:$RSYNC_PORT/m/") ;;
    rsync/pull) out=$(rsync --stats -t -I "rsync://127.0.0.1:$RSYNC_PORT/m/f" "$WORK/local/") ;;
  esac
  t1=$(date +%s.%N)
  local sent
  case $tool in
    rsync) sent=$(echo "$out" | awk -F': ' '/^Total bytes sent/ {gsub(",", "", $2); s=$2} /^Total bytes received/ {gsub(",", "", $2); r=$2} END {print s + r}') ;;
    *) sent=$(echo "$out" | python3 -c 'import json,sys; j=json.load(sys.stdin); print(sum(p["wire_bytes_sent"] + p["wire_bytes_received"] for p in j["paths"]))') ;;
  esac
  # Every run must land the new version.
  local got
  if [ "$dir" = push ]; then got="$WORK/$([ "$tool" = rsync ] && echo rsync || echo tern)/f"; else got="$WORK/local/f"; fi
  cmp -s "$WORK/cases/$c" "$got" || { echo "FAIL: $tool $dir $c landed damaged" >&2; exit 1; }
  echo "$(echo "$t1 - $t0" | bc) $sent"
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

RESULTS=$WORK/results
: >"$RESULTS"
for c in "${CASES[@]}"; do
  for dir in push pull; do
    for tool in tern rsync tern-W; do
      [ "$tool" = tern-W ] && [ "$c" != rewrite ] && continue
      : >"$WORK/runs"
      for ((r = 0; r < RUNS; r++)); do run "$c" "$tool" "$dir" >>"$WORK/runs"; done
      secs=$(awk '{print $1}' "$WORK/runs" | median)
      sent=$(awk '{print $2}' "$WORK/runs" | median)
      echo "$c $dir $tool $secs $sent" | tee -a "$RESULTS"
    done
  done
done

report() {
  echo "# Delta transfer: tern vs rsync"
  echo
  echo "\`bench/delta.sh\` (SIZE=$SIZE, medians of $RUNS), $(date -u +%Y-%m-%d), this machine (2 cores, loopback, files on tmpfs)."
  echo "Each run starts with the old version at the destination and the new one at the source."
  echo "Bytes are both directions of the transfer's connections: tern's TCP bytes (TLS included), rsync's --stats totals."
  echo
  python3 - "$RESULTS" "$BYTES" <<'EOF'
import sys
rows = [l.split() for l in open(sys.argv[1])]
size = int(sys.argv[2])
r = {(c, d, t): (float(s), int(b)) for c, d, t, s, b in rows}
names = {"scattered": "1% overwritten in 100 places", "insert": "1 MiB inserted at the start",
         "append": "10 MiB appended", "rewrite": "fully rewritten"}
print("| case | direction | tern bytes | rsync bytes | bytes, tern / rsync | tern s | rsync s | time, tern / rsync |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for c in names:
    for d in ("push", "pull"):
        if (c, d, "tern") not in r:
            continue
        (ts, tb), (rs, rb) = r[(c, d, "tern")], r[(c, d, "rsync")]
        print(f"| {names[c]} | {d} | {tb / 2**20:.2f} MiB | {rb / 2**20:.2f} MiB | {tb / rb:.2f} | {ts:.2f} | {rs:.2f} | {ts / rs:.2f} |")
for d in ("push", "pull"):
    if ("rewrite", d, "tern-W") in r:
        (ts, tb), (ws, wb) = r[("rewrite", d, "tern")], r[("rewrite", d, "tern-W")]
        print()
        print(f"Fully rewritten, {d}: delta on {ts:.2f} s and {tb / size:.3f}x the file size on the wire; "
              f"`-W` {ws:.2f} s and {wb / size:.3f}x; delta / -W time {ts / ws:.2f}.")
EOF
}
write_report "$ROOT/docs/benchmarks/delta.md" bench/delta.sh report
echo "written: docs/benchmarks/delta.md"
