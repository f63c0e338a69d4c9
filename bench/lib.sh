# Shared by the bench scripts (sourced).

# tern_credentials WORK TERN: one daemon identity, client config and token
# under WORK for every daemon and client of a run; sets FP and TOKEN.
tern_credentials() {
  export TERN_STATE_DIR=$1/state TERN_CONFIG_DIR=$1/config
  mkdir -p "$TERN_STATE_DIR" "$TERN_CONFIG_DIR"
  FP=$("$2" fingerprint --server)
  TOKEN=$1/token
  [ -f "$TOKEN" ] || head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$TOKEN"
}

# write_report OUT_MD SCRIPT CMD...: replaces OUT_MD with CMD's output,
# keeping the hand-written notes below the marker line of the old file.
write_report() {
  local out=$1 script=$2 notes
  shift 2
  local mark="<!-- notes below are kept when $script rewrites this file -->"
  mkdir -p "$(dirname "$out")"
  notes=$(mktemp)
  if [ -f "$out" ] && grep -qF "$mark" "$out"; then
    awk -v m="$mark" 'f || $0 == m { f = 1; print }' "$out" >"$notes"
  else
    printf '%s\n' "$mark" >"$notes"
  fi
  { "$@"; echo; cat "$notes"; } >"$out.new"
  rm -f "$notes"
  mv "$out.new" "$out"
}

# For the scripts that run daemons across a tern-wan link. They set
# WAN_PID (the link's process), DAEMON_PIDS (daemons started) and B (the
# daemons' namespace).
stop_daemons() {
  local p
  for p in "${DAEMON_PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  DAEMON_PIDS=()
}
stop_link() {
  if [ -n "$WAN_PID" ]; then
    kill -TERM "$WAN_PID" 2>/dev/null || true
    wait "$WAN_PID" 2>/dev/null || true
    WAN_PID=
  fi
}
# wait_for CMD...: retries a readiness check for up to 10 s.
wait_for() {
  local i
  for ((i = 0; i < 500; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.02
  done
  echo "timed out waiting for: $*" >&2
  exit 1
}
# listening PORT: something listens on PORT in namespace B.
listening() { ip netns exec "$B" ss -Hln "sport = :$1" | grep -q .; }
