#!/usr/bin/env bash
# Runs tern's cargo-fuzz targets (fuzz/): decoder, handshake, requests,
# config, filter.
#
# Usage: tools/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#   tools/fuzz.sh 15                 # CI smoke run: 15 s each
#   tools/fuzz.sh 600 decoder        # a longer run of one target
#
# Needs cargo-fuzz (installed here if missing) and a C++ compiler. The stable
# toolchain builds the AddressSanitizer runtime with RUSTC_BOOTSTRAP=1, as
# nightly would. Each target starts from its seeds (fuzz/seeds/TARGET, valid
# exchanges) and its growing corpus (fuzz/corpus/TARGET, not in git). A crash
# leaves its input in fuzz/artifacts/TARGET and fails the script. Prints the
# executions per target (libFuzzer's final stats).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-15}
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -eq 0 ] && TARGETS=(decoder handshake requests config filter)
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
status=0
for t in "${TARGETS[@]}"; do
  mkdir -p "fuzz/corpus/$t" "fuzz/seeds/$t"
  log=$(mktemp)
  # -timeout: one input taking over 10 s is a hang; -rss_limit_mb: an
  # unbounded allocation shows as an out-of-memory crash.
  if cargo fuzz run -O "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
    -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log")
    echo "fuzz $t: ${runs:-?} executions in ${SECS} s, no crash (peak RSS ${rss:-?} MiB)"
  else
    echo "fuzz $t: FAILED" >&2
    grep -E "ERROR|panicked|SUMMARY|Test unit written" "$log" >&2 || tail -30 "$log" >&2
    status=1
  fi
  rm -f "$log"
done
exit $status
