# Shared by the bench scripts (sourced).

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
