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
