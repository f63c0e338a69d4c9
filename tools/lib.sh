# Shared by the tools scripts (sourced).

# daemon_fingerprint OUT PID: waits (up to 10 s) for the daemon whose
# stdout goes to OUT to print its banner, and prints its key fingerprint.
# Fails if the daemon exits first or never gets there.
daemon_fingerprint() {
  local i fp
  for ((i = 0; i < 500; i++)); do
    # Read once: a file truncated between two reads (the daemon's own
    # redirect, racing this loop) must not yield an empty fingerprint.
    fp=$(sed -n 's/^fingerprint: //p' "$1" 2>/dev/null)
    if [ -n "$fp" ]; then
      echo "$fp"
      return 0
    fi
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.02
  done
  return 1
}

# tern_binary ROOT: prints the tern to run, $TERN if set (made absolute, as
# the scripts change directory) or a release build made now.
tern_binary() {
  if [ -n "${TERN:-}" ]; then
    realpath "$TERN"
  else
    (cd "$1" && cargo build --release -q -p tern) >&2
    echo "$1/target/release/tern"
  fi
}
