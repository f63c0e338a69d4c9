#!/usr/bin/env bash
# Local copy benchmark: tern vs cp -a vs rsync -a (vs rclone copy if
# installed), side by side in one run, on
#   (a) one large random file (2 GiB by default), and
#   (b) many small random files (20,000 of 1-16 KiB in nested directories).
#
# Each measurement is the wall time of the copy followed by `sync`, i.e. until
# the data is on disk: tern fsyncs by default and the others do not, so timing
# them without the sync would compare durable writes with page-cache writes.
# `tern --no-fsync` is shown too. Runs alternate between tools, in a new
# (seeded) random order each round, so that no tool always follows the same
# one: a run can leave kernel work (writeback, reclaim) that slows the next.
# rclone's rounds come after the others', because whatever runs right after
# rclone is markedly slower (it also evicts the source from the page cache). Each run writes to a fresh destination name; a one-second pause after
# each run's `sync` lets background work settle, and the source is read into
# the page cache before each run (neither is timed).
#
# Two storage setups are measured, one after the other:
#   disk      the machine's own file system (the directory below). On a shared
#             virtual disk its speed swings several-fold from minute to minute,
#             so look at all runs, not only the medians.
#   ram-ext4  ext4 on a loop device backed by a RAM tmpfs (needs root): the
#             same file system code with the device noise removed, which shows
#             what each tool itself costs. Skipped where it cannot be mounted.
# On the disk, the large file's copies are deleted after each run and small-file
# copies are kept until the end (on ext4, deleting a tree right before a
# small-file run makes that run much slower). On ram-ext4 both are deleted
# after each run, to fit in memory.
#
# Usage: bench/local.sh            (ROUNDS=5 BIG=2G SMALL=20000 by default)
#        ROUNDS=3 BIG=512M SMALL=5000 bench/local.sh   (quicker)
#        SETUPS=disk bench/local.sh                      (one setup only)
# Needs: rsync, GNU time (/usr/bin/time), python3, bc; rclone if present.
# Writes docs/benchmarks/local.md; data and raw figures go to $TERN_BENCH_DIR
# (default /tmp/tern-bench).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${TERN_BENCH_DIR:-${TMPDIR:-/tmp}/tern-bench}
ROUNDS=${ROUNDS:-5}
BIG=${BIG:-2G}
SMALL=${SMALL:-20000}
SETUPS=${SETUPS:-disk ram-ext4}
OUT_MD=${OUT_MD:-$ROOT/docs/benchmarks/local.md}

for tool in rsync python3 bc /usr/bin/time; do
  command -v "$tool" >/dev/null || { echo "bench/local.sh needs $tool (apt-get install rsync time python3 bc)" >&2; exit 1; }
done

(cd "$ROOT" && cargo build --release -q -p tern)
TERN=$ROOT/target/release/tern

mkdir -p "$WORK"
DATA=$WORK/src
mkdir -p "$DATA"
BIG_BYTES=$(numfmt --from=iec "$BIG")
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
RESULTS=$WORK/results.tsv
: >"$RESULTS"

tools=(tern tern-nofsync cp rsync)
HAVE_RCLONE=no
command -v rclone >/dev/null && HAVE_RCLONE=yes

# cmd WORKLOAD TOOL SRC DEST: prints the command copying the workload to DEST
# (for the big file, DEST is an existing directory).
cmd() {
  local src=$3 dest=$4
  case $1/$2 in
    big/tern) echo "$TERN copy -q $src $dest/" ;;
    big/tern-nofsync) echo "$TERN copy -q --no-fsync $src $dest/" ;;
    big/cp) echo "cp -a $src $dest/" ;;
    big/rsync) echo "rsync -a $src $dest/" ;;
    big/rclone) echo "rclone copy -q $src $dest" ;;
    small/tern) echo "$TERN copy -q $src/ $dest" ;;
    small/tern-nofsync) echo "$TERN copy -q --no-fsync $src/ $dest" ;;
    small/cp) echo "cp -a $src $dest" ;;
    small/rsync) echo "rsync -a $src/ $dest/" ;;
    small/rclone) echo "rclone copy -q $src $dest" ;;
  esac
}

measure() { # SETUP BASE WORKLOAD TOOL ROUND KEEP_SMALL
  local setup=$1 base=$2 wl=$3 tool=$4 round=$5
  local src=$base/src/big.bin
  [ "$wl" = small ] && src=$base/src/small
  local dest=$base/runs/$wl-$tool-$round
  [ "$wl" = big ] && mkdir -p "$dest"
  local c t0 t1
  c=$(cmd "$wl" "$tool" "$src" "$dest")
  # Every tool starts with the source in the page cache (rclone evicts what
  # it read with fadvise, which would slow whatever runs next).
  find "$src" -type f -exec cat {} + >/dev/null
  sync
  t0=$(date +%s.%N)
  /usr/bin/time -f %M -o "$WORK/rss" $c >/dev/null 2>"$WORK/err" || { echo "FAILED: $c" >&2; cat "$WORK/err" >&2; exit 1; }
  sync
  t1=$(date +%s.%N)
  # A copy that is not complete does not count.
  if [ "$wl" = big ]; then
    [ "$(stat -c %s "$dest/big.bin")" = "$BIG_BYTES" ] || { echo "$tool produced a wrong size" >&2; exit 1; }
  else
    [ "$(find "$dest" -type f | wc -l)" = "$SMALL" ] || { echo "$tool copied the wrong number of files" >&2; exit 1; }
  fi
  if [ "$round" -gt 0 ]; then
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$setup" "$wl" "$tool" "$round" "$(echo "$t1 - $t0" | bc)" "$(cat "$WORK/rss")" >>"$RESULTS"
  fi
  printf '%-8s %-6s %-13s round %s: %6.2fs\n' "$setup" "$wl" "$tool" "$round" "$(echo "$t1 - $t0" | bc)" >&2
  if [ "$wl" = big ] || [ "$6" = no ]; then rm -rf "$dest" && sync; fi
  sleep 1
  return 0
}

suite() { # SETUP BASE KEEP_SMALL: round 0 warms up and is not recorded
  local wl r t
  mkdir -p "$2/runs"
  for wl in big small; do
    for ((r = 0; r <= ROUNDS; r++)); do
      for t in $(python3 -c 'import random, sys; t = sys.argv[2:]; random.Random(int(sys.argv[1])).shuffle(t); print(*t)' "$r" "${tools[@]}"); do
        measure "$1" "$2" "$wl" "$t" "$r" "$3"
      done
    done
    # rclone slows whatever runs right after it (measured: cp 2.1-4.0 s
    # normally, 5.8 s after rclone, on the same 2 GiB copy), so its rounds
    # come after the others'.
    if [ "$HAVE_RCLONE" = yes ]; then
      for ((r = 0; r <= ROUNDS; r++)); do
        measure "$1" "$2" "$wl" rclone "$r" "$3"
      done
    fi
  done
  rm -rf "$2/runs"
}

RAM=$WORK/ram
cleanup() {
  mountpoint -q "$RAM/ext4" 2>/dev/null && umount "$RAM/ext4"
  mountpoint -q "$RAM/tmpfs" 2>/dev/null && umount "$RAM/tmpfs"
  return 0
}
trap cleanup EXIT

for setup in $SETUPS; do
  case $setup in
    disk)
      mkdir -p "$WORK/disk"
      ln -sfn "$DATA" "$WORK/disk/src"
      suite disk "$WORK/disk" yes
      ;;
    ram-ext4)
      mkdir -p "$RAM/tmpfs" "$RAM/ext4"
      img_mb=$((BIG_BYTES * 2 / 1048576 + 1024))
      if ! mount -t tmpfs -o "size=$((img_mb + 64))M" tmpfs "$RAM/tmpfs" 2>/dev/null; then
        echo "skipping ram-ext4: cannot mount a tmpfs (needs root)" >&2
        continue
      fi
      # Allocate the image's memory up front: otherwise whichever run first
      # writes to a region pays for tmpfs allocating it.
      fallocate -l "${img_mb}M" "$RAM/tmpfs/ext4.img"
      # No lazy inode-table init: it would run in the background during the runs.
      mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$RAM/tmpfs/ext4.img"
      if ! mount -o loop "$RAM/tmpfs/ext4.img" "$RAM/ext4" 2>/dev/null; then
        echo "skipping ram-ext4: cannot mount a loop device" >&2
        cleanup
        continue
      fi
      mkdir -p "$RAM/ext4/src"
      cp "$DATA/big.bin" "$RAM/ext4/src/" && cp -a "$DATA/small" "$RAM/ext4/src/"
      suite ram-ext4 "$RAM/ext4" no
      cleanup
      ;;
    *) echo "unknown setup $setup" >&2; exit 2 ;;
  esac
done

mkdir -p "$(dirname "$OUT_MD")"
python3 "$ROOT/bench/report_local.py" "$RESULTS" "$DATA" "$SMALL" "$ROUNDS" "$TERN" "$WORK" >"$OUT_MD"
cat "$OUT_MD"
