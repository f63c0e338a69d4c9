#!/usr/bin/env bash
# Delta, deduplication and compression: tern against rsync (to and from an
# rsync daemon) on the cases of issue 15, both ways, on loopback or across
# a tern-wan link (LINK=wan: 100 Mbit/s, 50 ms RTT, in two network
# namespaces). Bytes are what each sent and received on the wire (tern: the
# TCP bytes of its connections, TLS included, from its --json; rsync: its
# --stats "Total bytes sent" and "received"); times are wall clock of the
# client, medians of RUNS.
#
# Cases (the destination holds the old version, the source the new one):
#   scattered  SIZE random, 1 % overwritten in 100 places
#   insert     the same, 1 MiB inserted at the start
#   append     the same, 10 MiB appended
#   rewrite    the same, fully rewritten (tern also with -W)
#   files      FILES files of 4 KiB-8 MiB (log-uniform), 10 % of them edited
#              (4 KiB overwritten and 1 KiB inserted)
#   copies     10 copies of one COPY-byte file, empty destination
#   text       a source tree and logs (compressible), empty destination;
#              rsync with -z, tern with its default --compress auto
#
# Usage: bench/delta.sh                   (LINK=lo SIZE=1G COPY=100M FILES=1000 RUNS=3)
#        LINK=wan SIZE=256M COPY=32M bench/delta.sh
#        CASES="files copies" bench/delta.sh
# Writes docs/benchmarks/delta.md (LINK=lo) or docs/benchmarks/delta-wan.md
# (OUT_MD to write elsewhere, e.g. for a run of some CASES).
# Needs rsync (and root for LINK=wan). Runs on tmpfs (WORK, default
# /dev/shm/tern-delta): about 8 x SIZE of memory.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/bench/lib.sh"
. "$ROOT/tools/lib.sh"
LINK=${LINK:-lo}
SIZE=${SIZE:-1G}
COPY=${COPY:-100M}
FILES=${FILES:-1000}
RUNS=${RUNS:-3}
CASES=(${CASES:-scattered insert append rewrite files copies text})
WORK=${WORK:-/dev/shm/tern-delta}
TERN=$(tern_binary "$ROOT")
TERN_PORT=${TERN_PORT:-17620}
RSYNC_PORT=${RSYNC_PORT:-17621}
command -v rsync >/dev/null || { echo "bench/delta.sh needs rsync (apt-get install rsync)" >&2; exit 1; }

rm -rf "$WORK" && mkdir -p "$WORK"/{cases,tern,rsync,local}
BYTES=$(numfmt --from=iec "$SIZE")
COPY_BYTES=$(numfmt --from=iec "$COPY")

# The cases: an old version and a new one of each.
python3 - "$WORK/cases" "$BYTES" "$COPY_BYTES" "$FILES" "$ROOT" "${CASES[@]}" <<'EOF'
import os, random, shutil, sys
d, size, copy, files, root = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
cases = set(sys.argv[6:])
rng = random.Random(15)
def put(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").write(data)
if cases & {"scattered", "insert", "append", "rewrite"}:
    old = os.urandom(size)
    put(f"{d}/old/f", old)
    b = bytearray(old)
    piece = size // 100 // 100          # 1% of the file in 100 places
    for k in range(100):
        at = k * (size // 100) + 4096
        b[at:at + piece] = os.urandom(piece)
    put(f"{d}/scattered/f", bytes(b))
    put(f"{d}/insert/f", os.urandom(1 << 20) + old)
    put(f"{d}/append/f", old + os.urandom(10 << 20))
    put(f"{d}/rewrite/f", os.urandom(size))
if "files" in cases:
    # Log-uniform sizes; the new tree is the old one with 10% edited (the
    # others keep their times, so both tools skip them).
    names = []
    for i in range(files):
        n = int(4096 * 2 ** rng.uniform(0, 11))
        p = f"d{i % 20:02}/f{i:04}.bin"
        put(f"{d}/files-old/{p}", rng.randbytes(n))
        names.append(p)
    shutil.copytree(f"{d}/files-old", f"{d}/files", copy_function=shutil.copy2)
    for p in rng.sample(names, files // 10):
        b = bytearray(open(f"{d}/files/{p}", "rb").read())
        at = rng.randrange(len(b))
        b[at:at + 4096] = rng.randbytes(4096)
        at = rng.randrange(len(b))
        b[at:at] = rng.randbytes(1024)
        open(f"{d}/files/{p}", "wb").write(b)
if "copies" in cases:
    one = os.urandom(copy)
    for k in range(10):
        put(f"{d}/copies/c{k % 3}/copy{k}.img", one)
if "text" in cases:
    # The project's own sources, twenty times over, and logs.
    src = [os.path.join(r, f) for r, _, fs in os.walk(f"{root}/crates") for f in fs if f.endswith(".rs")]
    for k in range(20):
        for f in src:
            put(f"{d}/text/src{k}/{os.path.relpath(f, root)}", open(f, "rb").read())
    levels = ["INFO", "DEBUG", "WARN", "ERROR"]
    for k in range(8):
        lines = []
        for i in range(200_000):
            lines.append(f"2026-12-02T15:{i // 6000 % 60:02}:{i // 100 % 60:02}.{i % 1000:03}Z {rng.choice(levels)} "
                         f"tern::engine: copied path=d{rng.randrange(100)}/f{rng.randrange(10**6)}.bin "
                         f"bytes={rng.randrange(10**7)} elapsed_ms={rng.randrange(5000)}\n")
        put(f"{d}/text/logs/app{k}.log", "".join(lines).encode())
EOF

# Where the daemons listen and how clients reach them.
if [ "$LINK" = wan ]; then
  [ "$(id -u)" = 0 ] || { echo "LINK=wan needs root (network namespaces, TUN)" >&2; exit 1; }
  (cd "$ROOT" && cargo build --release -q -p tern-wan)
  NS=ternd A=$NS-a B=$NS-b ADDR=10.99.0.2
  IN_A=(ip netns exec "$A") IN_B=(ip netns exec "$B")
  OUT_MD=${OUT_MD:-$ROOT/docs/benchmarks/delta-wan.md}
  WHERE="across tern-wan at 100 Mbit/s and 50 ms RTT (namespaces on this machine)"
else
  ADDR=127.0.0.1 IN_A=() IN_B=()
  OUT_MD=${OUT_MD:-$ROOT/docs/benchmarks/delta.md}
  WHERE="on loopback"
fi

tern_credentials "$WORK" "$TERN"
cat >"$WORK/rsyncd.conf" <<EOF
port = $RSYNC_PORT
address = $ADDR
use chroot = no
$([ "$(id -u)" = 0 ] && printf 'uid = root\ngid = root')
[m]
path = $WORK/rsync
read only = false
EOF
WAN_PID= DAEMON_PIDS=()
cleanup() { stop_daemons; stop_link; }
trap cleanup EXIT
if [ "$LINK" = wan ]; then
  "$ROOT/target/release/tern-wan" --name "$NS" --replace --rate 100mbit --delay 25ms \
    >"$WORK/wan.out" 2>"$WORK/wan.err" &
  WAN_PID=$!
  wait_for grep -q ready "$WORK/wan.out"
fi
"${IN_B[@]}" rsync --daemon --no-detach --config="$WORK/rsyncd.conf" 2>"$WORK/rsyncd.err" &
DAEMON_PIDS+=($!)
"${IN_B[@]}" "$TERN" serve --listen "$ADDR:$TERN_PORT" --module "m=$WORK/tern" --read-write \
  --token-file "$TOKEN" >/dev/null 2>"$WORK/ternd.err" &
DAEMON_PIDS+=($!)
for port in "$TERN_PORT" "$RSYNC_PORT"; do
  wait_for sh -c "${IN_B[*]} ss -Hltn 'sport = :$port' | grep -q ."
done
T=(--fingerprint "$FP" --token-file "$TOKEN" --transport tcp --json -q)
TERN_URL=tern://$ADDR:$TERN_PORT/m
RSYNC_URL=rsync://$ADDR:$RSYNC_PORT/m

# The old and new versions of case C: a single file f, or a tree.
old_of() { case $1 in scattered | insert | append | rewrite) echo "$WORK/cases/old" ;; files) echo "$WORK/cases/files-old" ;; *) echo "" ;; esac; }
new_of() { case $1 in scattered | insert | append | rewrite) echo "$WORK/cases/$1" ;; *) echo "$WORK/cases/$1" ;; esac; }
# fill DIR FROM: DIR holds exactly what FROM holds (nothing if FROM is
# empty). DIR itself stays: a daemon holds its module's root open.
fill() { mkdir -p "$1" && find "$1" -mindepth 1 -delete && { [ -z "$2" ] || cp -a "$2/." "$1/"; }; }

# run CASE TOOL DIR: one transfer; prints "seconds wire_bytes".
run() {
  local c=$1 tool=$2 dir=$3 out t0 t1 far
  far=$WORK/$([ "${tool%%-*}" = rsync ] && echo rsync || echo tern)
  case $dir in
    push) fill "$far" "$(old_of "$c")"; fill "$WORK/local" "$(new_of "$c")" ;;
    pull) fill "$far" "$(new_of "$c")"; fill "$WORK/local" "$(old_of "$c")" ;;
  esac
  sync
  local rflags=(--stats -a) tflags=()
  case $c in scattered | insert | append | rewrite) rflags+=(-I) ;; text) rflags+=(-z) ;; esac
  [ "$tool" = tern-W ] && tflags=(-W)
  t0=$(date +%s.%N)
  case $tool/$dir in
    tern*/push) out=$("${IN_A[@]}" "$TERN" copy "${tflags[@]}" "${T[@]}" "$WORK/local/" "$TERN_URL/") ;;
    tern*/pull) out=$("${IN_A[@]}" "$TERN" copy "${tflags[@]}" "${T[@]}" "$TERN_URL/" "$WORK/local/") ;;
    rsync/push) out=$("${IN_A[@]}" rsync "${rflags[@]}" "$WORK/local/" "$RSYNC_URL/") ;;
    rsync/pull) out=$("${IN_A[@]}" rsync "${rflags[@]}" "$RSYNC_URL/" "$WORK/local/") ;;
  esac
  t1=$(date +%s.%N)
  # The last run's report, for a closer look.
  printf '%s\n' "$out" >"$WORK/last-$c-$tool-$dir.out"
  local sent
  case $tool in
    rsync) sent=$(echo "$out" | awk -F': ' '/^Total bytes sent/ {gsub(",", "", $2); s=$2} /^Total bytes received/ {gsub(",", "", $2); r=$2} END {print s + r}') ;;
    *) sent=$(echo "$out" | python3 -c 'import json,sys; j=json.load(sys.stdin); print(sum(p["wire_bytes_sent"] + p["wire_bytes_received"] for p in j["paths"]))') ;;
  esac
  # Every run must land the new version.
  local got=$WORK/local
  [ "$dir" = push ] && got=$far
  diff -rq "$(new_of "$c")" "$got" >/dev/null || { echo "FAIL: $tool $dir $c landed damaged" >&2; exit 1; }
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
  echo "# Delta, deduplication and compression: tern vs rsync, $WHERE"
  echo
  echo "\`LINK=$LINK bench/delta.sh\` (SIZE=$SIZE, COPY=$COPY, FILES=$FILES, medians of $RUNS), $(date -u +%Y-%m-%d), this machine (2 cores, files on tmpfs, TCP)."
  echo "Each run starts with the old version at the destination (nothing for copies and text) and the new one at the source."
  echo "Bytes are both directions of the transfer's connections: tern's TCP bytes (TLS included), rsync's --stats totals."
  echo
  python3 - "$RESULTS" "$BYTES" <<'EOF'
import sys
rows = [l.split() for l in open(sys.argv[1])]
size = int(sys.argv[2])
r = {(c, d, t): (float(s), int(b)) for c, d, t, s, b in rows}
names = {"scattered": "1% overwritten in 100 places", "insert": "1 MiB inserted at the start",
         "append": "10 MiB appended", "rewrite": "fully rewritten", "files": "files, 10% edited",
         "copies": "10 copies of one file", "text": "source tree and logs (rsync -z)"}
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
write_report "$OUT_MD" bench/delta.sh report
echo "written: $OUT_MD"
