#!/usr/bin/env bash
# Local copy benchmark: tern vs cp -a vs rsync -a (vs rclone copy if
# installed), side by side in one run, on
#   (a) one large random file (2 GiB by default), and
#   (b) many small random files (20,000 of 1-16 KiB in nested directories).
#
# Each measurement is the wall time of the copy followed by `sync`, i.e. until
# the data is on disk: tern fsyncs by default and the others do not, so timing
# them without the sync would compare durable writes with page-cache writes.
# `tern --no-fsync` is shown too. Runs alternate between tools (the order
# rotates each round) and always write to a fresh destination name. The large
# file's copies are deleted after each run; small-file copies are kept until
# the end, because on ext4 deleting a tree right before a small-file run makes
# that run much slower.
#
# Usage: bench/local.sh            (ROUNDS=5 BIG=2G SMALL=20000 by default)
#        ROUNDS=3 BIG=512M SMALL=5000 bench/local.sh   (quicker)
# Needs: rsync, GNU time (/usr/bin/time), python3; rclone if present.
# Writes docs/benchmarks/local.md; data and raw figures go to $TERN_BENCH_DIR
# (default /tmp/tern-bench).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${TERN_BENCH_DIR:-${TMPDIR:-/tmp}/tern-bench}
ROUNDS=${ROUNDS:-5}
BIG=${BIG:-2G}
SMALL=${SMALL:-20000}
OUT_MD=${OUT_MD:-$ROOT/docs/benchmarks/local.md}

for tool in rsync python3 /usr/bin/time; do
  command -v "$tool" >/dev/null || { echo "bench/local.sh needs $tool (apt-get install rsync time python3)" >&2; exit 1; }
done

(cd "$ROOT" && cargo build --release -q -p tern)
TERN=$ROOT/target/release/tern

mkdir -p "$WORK"
SRC=$WORK/src
mkdir -p "$SRC"
if [ ! -f "$SRC/big.bin" ] || [ "$(stat -c %s "$SRC/big.bin")" != "$(numfmt --from=iec "$BIG")" ]; then
  echo "generating $BIG random file..." >&2
  head -c "$(numfmt --from=iec "$BIG")" /dev/urandom >"$SRC/big.bin.tmp" && mv "$SRC/big.bin.tmp" "$SRC/big.bin"
fi
if [ ! -f "$SRC/small.count" ] || [ "$(cat "$SRC/small.count")" != "$SMALL" ]; then
  echo "generating $SMALL small files..." >&2
  rm -rf "$SRC/small"
  python3 "$ROOT/bench/gen_small.py" "$SRC/small" "$SMALL"
  echo "$SMALL" >"$SRC/small.count"
fi
RUNS=$WORK/runs
rm -rf "$RUNS"
mkdir -p "$RUNS"
RESULTS=$WORK/results.tsv
: >"$RESULTS"

tools=(tern tern-nofsync cp rsync)
command -v rclone >/dev/null && tools+=(rclone)

# cmd WORKLOAD TOOL DEST: prints the command copying the workload to DEST.
cmd() {
  local src
  case $1 in
    big) src=$SRC/big.bin ;;
    small) src=$SRC/small ;;
  esac
  case $2 in
    tern) if [ "$1" = big ]; then echo "$TERN copy -q $src $3/"; else echo "$TERN copy -q $src/ $3"; fi ;;
    tern-nofsync) if [ "$1" = big ]; then echo "$TERN copy -q --no-fsync $src $3/"; else echo "$TERN copy -q --no-fsync $src/ $3"; fi ;;
    cp) if [ "$1" = big ]; then echo "cp -a $src $3/"; else echo "cp -a $src $3"; fi ;;
    rsync) if [ "$1" = big ]; then echo "rsync -a $src $3/"; else echo "rsync -a $src/ $3/"; fi ;;
    rclone) echo "rclone copy -q $src $3" ;;
  esac
}

measure() { # WORKLOAD TOOL ROUND
  local dest=$RUNS/$1-$2-$3
  [ "$1" = big ] && mkdir -p "$dest"
  local c
  c=$(cmd "$1" "$2" "$dest")
  sync
  local t0 t1
  t0=$(date +%s.%N)
  /usr/bin/time -f %M -o "$WORK/rss" $c >/dev/null 2>"$WORK/err" || { echo "FAILED: $c" >&2; cat "$WORK/err" >&2; exit 1; }
  sync
  t1=$(date +%s.%N)
  # A copy that is not complete does not count.
  if [ "$1" = big ]; then
    [ "$(stat -c %s "$dest/big.bin")" = "$(stat -c %s "$SRC/big.bin")" ] || { echo "$2 produced a wrong size" >&2; exit 1; }
  else
    [ "$(find "$dest" -type f | wc -l)" = "$SMALL" ] || { echo "$2 copied the wrong number of files" >&2; exit 1; }
  fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$(echo "$t1 - $t0" | bc)" "$(cat "$WORK/rss")" >>"$RESULTS"
  printf '%-6s %-13s round %s: %6.2fs\n' "$1" "$2" "$3" "$(echo "$t1 - $t0" | bc)" >&2
  [ "$1" = big ] && rm -rf "$dest" && sync
  return 0
}

n=${#tools[@]}
for workload in big small; do
  for ((r = 1; r <= ROUNDS; r++)); do
    for ((i = 0; i < n; i++)); do
      measure "$workload" "${tools[(i + r) % n]}" "$r"
    done
  done
done
rm -rf "$RUNS"

mkdir -p "$(dirname "$OUT_MD")"
python3 "$ROOT/bench/report_local.py" "$RESULTS" "$SRC" "$SMALL" "$ROUNDS" "$TERN" >"$OUT_MD"
cat "$OUT_MD"
