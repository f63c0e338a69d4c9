#!/usr/bin/env bash
# Page cache against page cache: `tern copy --no-fsync` vs `cp` vs `rsync`
# copying one large file on the same file system, nothing synced, as a user
# who gives up durability for speed runs them (issue 14). hyperfine times
# each tool's runs in turn, after a warm-up run; each writes a fresh
# destination (removed before the run, not timed), and the source is read
# into the page cache first. Medians, so one run caught by writeback does
# not decide.
#
# Usage: bench/pagecache.sh                 (SIZE=1G RUNS=6, in $TMPDIR)
#        DIR=/mnt/x SIZE=4G bench/pagecache.sh
# Needs: hyperfine, rsync. Writes docs/benchmarks/pagecache.md.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/bench/lib.sh"
. "$ROOT/tools/lib.sh"
SIZE=${SIZE:-1G}
RUNS=${RUNS:-6}
DIR=${DIR:-${TMPDIR:-/tmp}/tern-pagecache}
OUT_MD=${OUT_MD:-$ROOT/docs/benchmarks/pagecache.md}
for tool in hyperfine rsync; do
  command -v "$tool" >/dev/null || { echo "bench/pagecache.sh needs $tool (apt-get install $tool)" >&2; exit 1; }
done
TERN=$(tern_binary "$ROOT")

mkdir -p "$DIR"
SRC=$DIR/big DST=$DIR/out
BYTES=$(numfmt --from=iec "$SIZE")
if [ ! -f "$SRC" ] || [ "$(stat -c %s "$SRC")" != "$BYTES" ]; then
  head -c "$BYTES" /dev/urandom >"$SRC.tmp" && mv "$SRC.tmp" "$SRC"
fi
cat "$SRC" >/dev/null
trap 'rm -f "$DST" "$DIR/times.json"' EXIT

hyperfine -N -w 1 -r "$RUNS" -p "rm -f $DST" --export-json "$DIR/times.json" \
  -n tern "$TERN copy -q --no-fsync $SRC $DST" \
  -n cp "cp $SRC $DST" \
  -n rsync "rsync $SRC $DST" >&2

report() {
  local fs
  fs=$(df -T "$DIR" | awk 'NR == 2 {print $2}')
  echo "# Page cache against page cache: tern --no-fsync vs cp vs rsync"
  echo
  echo "\`bench/pagecache.sh\` (SIZE=$SIZE, $RUNS runs each after a warm-up, medians), $(date -u +%Y-%m-%d), this machine ($(nproc) cores), $fs at $DIR."
  echo "One large random file copied on the same file system, nothing synced; the source is in the page cache."
  echo
  python3 - "$DIR/times.json" "$BYTES" <<'EOF'
import json, sys
r = {x["command"]: x for x in json.load(open(sys.argv[1]))["results"]}
size = int(sys.argv[2])
med = lambda n: sorted(r[n]["times"])[len(r[n]["times"]) // 2]
print("| tool | median s | min s | max s | GB/s | time / cp |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for n in ("tern", "cp", "rsync"):
    t = r[n]["times"]
    print(f"| {n} | {med(n):.3f} | {min(t):.3f} | {max(t):.3f} | {size / med(n) / 1e9:.2f} | {med(n) / med('cp'):.2f} |")
EOF
}
write_report "$OUT_MD" bench/pagecache.sh report
echo "written: $OUT_MD" >&2
