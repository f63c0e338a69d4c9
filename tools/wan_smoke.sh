#!/usr/bin/env bash
# tern across an emulated bad link: 20 ms RTT, 1 % loss, 0.1 % of packets
# with a flipped bit, 0.1 % duplicated, some reordering, 200 Mbit/s. Pushes
# and pulls a 32 MiB file over each transport, checks both copies by BLAKE3
# and that the summary saw the path (RTT of at least 20 ms; lost packets on
# a push).
# Needs root (tern-wan); prints why and exits 0 without it.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/tools/lib.sh"
if [ "$(id -u)" != 0 ] || [ ! -e /dev/net/tun ]; then
  echo "wan_smoke: skipped (needs root and /dev/net/tun)"
  exit 0
fi
(cd "$ROOT" && cargo build --release -q -p tern -p tern-wan)
T=$ROOT/target/release/tern
W=$ROOT/target/release/tern-wan
WORK=$(mktemp -d /tmp/tern-wan-smoke.XXXXXX)
WAN_PID= DPID=
cleanup() {
  [ -n "$DPID" ] && kill "$DPID" 2>/dev/null && wait "$DPID" 2>/dev/null
  [ -n "$WAN_PID" ] && kill "$WAN_PID" 2>/dev/null && wait "$WAN_PID" 2>/dev/null
  rm -rf "$WORK"
  return 0
}
trap cleanup EXIT
NS=tws$$
"$W" --name "$NS" --delay 10ms --loss 1% --corrupt 0.1% --duplicate 0.1% --reorder 0.2% --rate 200mbit \
  >"$WORK/wan.out" 2>"$WORK/wan.err" &
WAN_PID=$!
for ((i = 0; i < 500; i++)); do grep -q ready "$WORK/wan.out" && break; sleep 0.02; done
grep -q ready "$WORK/wan.out" || { cat "$WORK/wan.err" >&2; exit 1; }

mkdir -p "$WORK/module" "$WORK/local"
head -c 32M /dev/urandom >"$WORK/module/down.bin"
head -c 32M /dev/urandom >"$WORK/local/up.bin"
(umask 077; echo smoke-token-of-twenty-four >"$WORK/token")
export TERN_STATE_DIR=$WORK/state TERN_CONFIG_DIR=$WORK/config
ip netns exec "$NS-b" "$T" serve --listen 10.99.0.2:17676 --module "m=$WORK/module" --read-write \
  --token-file "$WORK/token" >"$WORK/daemon.out" 2>"$WORK/daemon.err" &
DPID=$!
FP=$(daemon_fingerprint "$WORK/daemon.out" "$DPID") || { cat "$WORK/daemon.err" >&2; exit 1; }

fail=0
for tr in tcp quic; do
  A=(--transport "$tr" --fingerprint "$FP" --token-file "$WORK/token" --json)
  ip netns exec "$NS-a" "$T" copy "${A[@]}" "$WORK/local/up.bin" "tern://10.99.0.2:17676/m/$tr/" >"$WORK/push.json"
  ip netns exec "$NS-a" "$T" copy "${A[@]}" "tern://10.99.0.2:17676/m/down.bin" "$WORK/local/$tr/" >"$WORK/pull.json"
  cmp -s "$WORK/local/up.bin" "$WORK/module/$tr/up.bin" || { echo "FAIL: $tr push damaged" >&2; fail=1; }
  cmp -s "$WORK/module/down.bin" "$WORK/local/$tr/down.bin" || { echo "FAIL: $tr pull damaged" >&2; fail=1; }
  python3 - "$tr" "$WORK/push.json" "$WORK/pull.json" <<'PY' || fail=1
import json, sys
tr = sys.argv[1]
for f in sys.argv[2:]:
    s = json.load(open(f))
    p = s["paths"][0]
    push = "push" in f
    # A pusher sends the data and sees its losses; a puller sends only
    # acknowledgements.
    ok = p["transport"] == tr and p["rtt_ms"] >= 20 and (p["packets_lost"] > 0 or not push) and s["errors"] == 0
    print(f"wan_smoke: {tr} {'push' if push else 'pull'}: {s['bytes_per_sec'] * 8 / 1e6:.0f} Mbit/s, "
          f"RTT {p['rtt_ms']:.1f} ms, {p['packets_lost']} of {p['packets_sent']} lost or resent, "
          f"{p['wire_bytes_sent']} bytes sent on the wire" + ("" if ok else "  <- FAIL"))
    if not ok:
        sys.exit(1)
PY
done
# --transport auto on this long path: a pull of a tree of small files goes
# over TCP when the daemon says its TCP has BBR (this kernel's: both run
# here), over QUIC otherwise; across the link's delay it still waits a
# constant number of times (tests/round_trips.rs asserts the same counts
# on loopback).
python3 "$ROOT/bench/gen_small.py" "$WORK/module/tree" 300 10
A=(--fingerprint "$FP" --token-file "$WORK/token" --json)
ip netns exec "$NS-a" "$T" copy "${A[@]}" "tern://10.99.0.2:17676/m/tree/" "$WORK/local/tree/" >"$WORK/tree.json"
diff -r "$WORK/module/tree" "$WORK/local/tree" >/dev/null || { echo "FAIL: auto pull of a tree differs" >&2; fail=1; }
python3 - "$WORK/tree.json" <<'PY' || fail=1
import json, sys
s = json.load(open(sys.argv[1]))
bbr = "bbr" in open("/proc/sys/net/ipv4/tcp_available_congestion_control").read().split()
want = "tcp" if bbr else "quic"
ok = s["transport"] == want and s["errors"] == 0 and s["copied"] == 300 and s["waits"] <= 12
print(f"wan_smoke: auto pull of 300 files in 30 directories: {s['transport']} (daemon's TCP has BBR: {bbr}), "
      f"{s['requests']} requests, {s['waits']} waits, {s['elapsed_secs']:.2f} s" + ("" if ok else "  <- FAIL"))
sys.exit(0 if ok else 1)
PY
kill "$DPID" && wait "$DPID" 2>/dev/null || true
DPID=
kill "$WAN_PID" && wait "$WAN_PID" 2>/dev/null || true
WAN_PID=
grep 'packets' "$WORK/wan.err" | sed 's/^/wan_smoke: /'
[ "$fail" = 0 ] && echo "wan_smoke: ok"
