#!/usr/bin/env bash
# Mount benchmark: a tern daemon and `tern mount` on 127.0.0.1 against
# sshfs to a local sshd (aes128-gcm, as fast a cipher as OpenSSH has), and
# against `tern copy` where the same data can be moved without a mount, in
# one run, the tools alternating in a seeded order each round.
#   read-cold    dd bs=1M of a BIG_MB file, the client's caches dropped
#                (tern copy: the same file pulled to tmpfs)
#   read-warm    the same read again at once
#   ls-cold      ls -lR of 20,000 files in 200 directories, freshly mounted
#   ls-warm      the same again at once
#   tar          extracting a tar of 8,000 small files into the mount
#                (tern copy: the same tree pushed; tern-wb: a mount with
#                --write-back, timed until `sync DIR` says all is uploaded)
#   write        dd bs=1M conv=fsync of a 1 GiB file into the mount
#   read-wan     dd bs=1M of a WAN_MB file across tern-wan (WAN_RATE, 50 ms
#                RTT: the daemon and sshd in one namespace, the mounts in
#                the other), caches dropped, fresh mount (tern copy: the
#                same file pulled)
# The served data lives on tmpfs (no disk in the way on either side; the
# daemon's fsyncs are free there, as sshfs's sftp server makes none).
#
# Usage: bench/mount.sh     (ROUNDS=3 BIG_MB=2048 CASES="read-cold ...")
# Needs root, /dev/fuse, sshfs, openssh-server, python3 (installed if
# missing). Writes docs/benchmarks/mount.md; raw figures go to
# $TERN_BENCH_DIR (default /tmp/tern-bench-mount).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/bench/lib.sh"
WORK=${TERN_BENCH_DIR:-${TMPDIR:-/tmp}/tern-bench-mount}
ROUNDS=${ROUNDS:-3}
BIG_MB=${BIG_MB:-2048}
CASES=${CASES:-read-cold read-warm ls-cold ls-warm tar write read-wan}
WAN_MB=${WAN_MB:-256} WAN_RATE=${WAN_RATE:-500mbit}
OUT_MD=${OUT_MD:-$ROOT/docs/benchmarks/mount.md}
TERN_PORT=17391 SSH_PORT=17392

[ "$(id -u)" = 0 ] || { echo "bench/mount.sh needs root (tmpfs, dropping caches, sshd)" >&2; exit 1; }
need=()
for pair in sshfs:sshfs /usr/sbin/sshd:openssh-server python3:python3 tar:tar; do
  command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

(cd "$ROOT" && cargo build --release -q -p tern)
TERN=$ROOT/target/release/tern

mkdir -p "$WORK"
RAM=$WORK/ram MT=$WORK/mnt-tern MS=$WORK/mnt-sshfs MW=$WORK/mnt-tern-wb
mkdir -p "$RAM" "$MT" "$MS" "$MW"
DAEMON_PIDS=() WAN_PID= SSHD_PID= MOUNT_PID= WB_PID=
unmount_one() {
  if mountpoint -q "$1"; then umount "$1" 2>/dev/null || umount -l "$1" || true; fi
  if [ "$1" = "$MT" ] && [ -n "$MOUNT_PID" ]; then wait "$MOUNT_PID" 2>/dev/null || true; MOUNT_PID=; fi
}
unmount_all() {
  unmount_one "$MT"
  unmount_one "$MS"
  if mountpoint -q "$MW"; then umount "$MW" 2>/dev/null || umount -l "$MW" || true; fi
  if [ -n "$WB_PID" ]; then wait "$WB_PID" 2>/dev/null || true; WB_PID=; fi
}
cleanup() {
  unmount_all
  stop_daemons
  [ -n "$SSHD_PID" ] && kill "$SSHD_PID" 2>/dev/null
  mountpoint -q "$RAM" 2>/dev/null && umount "$RAM"
  return 0
}
trap cleanup EXIT

mount -t tmpfs -o size=$((BIG_MB * 3 + 4096))M tmpfs "$RAM"
MOD=$RAM/module
mkdir -p "$MOD" "$RAM/out" "$RAM/staging"
head -c "${BIG_MB}M" /dev/urandom >"$MOD/big.bin"
python3 "$ROOT/bench/gen_small.py" "$MOD/t20k" 20000 100
python3 "$ROOT/bench/gen_small.py" "$RAM/t8k" 8000 80
tar -C "$RAM" -cf "$RAM/t8k.tar" t8k
head -c 1024M /dev/urandom >"$RAM/w.bin"

# The daemon, and sshd with its own keys, config and sftp server.
tern_credentials "$WORK" "$TERN"
"$TERN" serve --listen "127.0.0.1:$TERN_PORT" --module "data=$MOD" --read-write --token-file "$TOKEN" \
  >"$WORK/daemon.log" 2>&1 &
DAEMON_PIDS+=($!)
for k in host user; do [ -f "$WORK/$k" ] || ssh-keygen -q -t ed25519 -N '' -f "$WORK/$k"; done
mkdir -p /run/sshd
cat >"$WORK/sshd_config" <<CONF
Port $SSH_PORT
ListenAddress 127.0.0.1
HostKey $WORK/host
AuthorizedKeysFile $WORK/user.pub
PermitRootLogin prohibit-password
PasswordAuthentication no
StrictModes no
Ciphers aes128-gcm@openssh.com
Subsystem sftp internal-sftp
PidFile $WORK/sshd.pid
CONF
/usr/sbin/sshd -D -e -f "$WORK/sshd_config" 2>"$WORK/sshd.log" &
SSHD_PID=$!
wait_for bash -c "ss -Hln 'sport = :$TERN_PORT' | grep -q . && ss -Hln 'sport = :$SSH_PORT' | grep -q ."

mount_tern() {
  "$TERN" mount --fingerprint "$FP" --token-file "$TOKEN" --staging-dir "$RAM/staging" \
    "tern://127.0.0.1:$TERN_PORT/data" "$MT" 2>>"$WORK/mount.log" &
  MOUNT_PID=$!
  wait_for mountpoint -q "$MT"
}
mount_tern_wb() {
  "$TERN" mount --write-back --fingerprint "$FP" --token-file "$TOKEN" --staging-dir "$RAM/staging-wb" \
    "tern://127.0.0.1:$TERN_PORT/data" "$MW" 2>>"$WORK/mount.log" &
  WB_PID=$!
  wait_for mountpoint -q "$MW"
}
mount_sshfs() {
  sshfs -p "$SSH_PORT" -o "IdentityFile=$WORK/user,StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null" \
    -o "Ciphers=aes128-gcm@openssh.com" "root@127.0.0.1:$MOD" "$MS"
  wait_for mountpoint -q "$MS"
}
# remount TOOL: its mount made afresh (nothing cached in it).
remount() {
  case $1 in
    tern-mount) unmount_one "$MT"; mount_tern ;;
    sshfs) unmount_one "$MS"; mount_sshfs ;;
  esac
}
mount_tern
mount_tern_wb
mount_sshfs

RESULTS=$WORK/results.tsv
: >"$RESULTS"
LOOPBACK_CASES=${CASES/read-wan/}
# run CASE TOOL ROUND: times one case for one tool, appends a row.
run() {
  local case=$1 tool=$2 round=$3 dir t0 t1
  case $tool in tern-mount) dir=$MT ;; tern-wb) dir=$MW ;; sshfs) dir=$MS ;; *) dir= ;; esac
  case $case in
    read-cold | ls-cold) remount "$tool"; sync; echo 3 >/proc/sys/vm/drop_caches ;;
  esac
  t0=$EPOCHREALTIME
  case $case/$tool in
    read-*/tern-copy) "$TERN" copy -q --fingerprint "$FP" --token-file "$TOKEN" \
      "tern://127.0.0.1:$TERN_PORT/data/big.bin" "$RAM/out/big-$round.bin" ;;
    read-*/*) dd if="$dir/big.bin" of=/dev/null bs=1M status=none ;;
    ls-*/*) ls -lR "$dir/t20k" >/dev/null ;;
    tar/tern-copy) "$TERN" copy -q --fingerprint "$FP" --token-file "$TOKEN" \
      "$RAM/t8k/" "tern://127.0.0.1:$TERN_PORT/data/x-copy-$round/" ;;
    tar/tern-wb) mkdir -p "$dir/x-$tool-$round" && tar --no-same-owner -C "$dir/x-$tool-$round" -xf "$RAM/t8k.tar" &&
      sync "$dir/x-$tool-$round" ;;
    tar/*) mkdir -p "$dir/x-$tool-$round" && tar --no-same-owner -C "$dir/x-$tool-$round" -xf "$RAM/t8k.tar" ;;
    write/*) dd if="$RAM/w.bin" of="$dir/w-$tool-$round.bin" bs=1M conv=fsync status=none ;;
  esac
  t1=$EPOCHREALTIME
  printf '%s\t%s\t%s\t%s\n' "$case" "$tool" "$round" "$(python3 -c "print($t1 - $t0)")" >>"$RESULTS"
  # What a case wrote is not kept (tmpfs holds everything).
  rm -f "$RAM/out/big-$round.bin" "$MOD/w-$tool-$round.bin"
}

for ((r = 1; r <= ROUNDS; r++)); do
  for case in $LOOPBACK_CASES; do
    tools="tern-mount sshfs"
    case $case in read-cold) tools="$tools tern-copy" ;; tar) tools="$tools tern-copy tern-wb" ;; esac
    for tool in $(python3 -c 'import random, sys; t = sys.argv[2].split(); random.Random(sys.argv[1]).shuffle(t); print(*t)' "$case$r" "$tools"); do
      if [ "${case%-warm}" != "$case" ]; then
        # Warm: the same read once just before, through the same mount.
        run "${case%-warm}-cold" "$tool" 0
        sed -i '$d' "$RESULTS"
      fi
      run "$case" "$tool" "$r"
      echo "round $r $case $tool: $(tail -1 "$RESULTS" | cut -f4) s" >&2
    done
  done
done
RSS=$(awk '/VmHWM/ {print $2}' "/proc/$MOUNT_PID/status" 2>/dev/null || echo 0)
unmount_all

# The read across an emulated long path. `ip netns exec` gives each call a
# mount namespace of its own, so a mount, its read and its unmount run in
# one call.
if [[ " $CASES " == *" read-wan "* ]]; then
  (cd "$ROOT" && cargo build --release -q -p tern-wan)
  NS=ternmnt A=ternmnt-a B=ternmnt-b ADDR=10.99.0.2
  "$ROOT/target/release/tern-wan" --name "$NS" --replace --rate "$WAN_RATE" --delay 25ms \
    >"$WORK/wan.out" 2>"$WORK/wan.err" &
  WAN_PID=$!
  wait_for grep -q ready "$WORK/wan.out"
  head -c "${WAN_MB}M" /dev/urandom >"$MOD/wan.bin"
  ip netns exec "$B" "$TERN" serve --listen "$ADDR:$TERN_PORT" --module "data=$MOD" --token-file "$TOKEN" \
    >"$WORK/daemon-wan.log" 2>&1 &
  DAEMON_PIDS+=($!)
  sed "s/^ListenAddress .*/ListenAddress $ADDR/; s|^PidFile .*|PidFile $WORK/sshd-wan.pid|" \
    "$WORK/sshd_config" >"$WORK/sshd_config_wan"
  ip netns exec "$B" /usr/sbin/sshd -D -e -f "$WORK/sshd_config_wan" 2>"$WORK/sshd-wan.log" &
  DAEMON_PIDS+=($!)
  wait_for listening "$TERN_PORT"
  wait_for listening "$SSH_PORT"
  MWAN=$WORK/mnt-wan
  mkdir -p "$MWAN" "$RAM/staging-wan"
  drop='sync; echo 3 >/proc/sys/vm/drop_caches'
  timed='t0=$EPOCHREALTIME; dd if='"$MWAN"'/wan.bin of=/dev/null bs=1M status=none; t1=$EPOCHREALTIME'
  for ((r = 1; r <= ROUNDS; r++)); do
    for tool in $(python3 -c 'import random, sys; t = ["tern-mount", "sshfs", "tern-copy"]; random.Random(sys.argv[1]).shuffle(t); print(*t)' "wan$r"); do
      case $tool in
        tern-mount) secs=$(ip netns exec "$A" bash -c "set -e
          '$TERN' mount --daemon --read-only --staging-dir '$RAM/staging-wan' --fingerprint '$FP' \
            --token-file '$TOKEN' 'tern://$ADDR:$TERN_PORT/data' '$MWAN'
          $drop; $timed
          '$TERN' unmount '$MWAN'
          python3 -c \"print(\$t1 - \$t0)\"") ;;
        sshfs) secs=$(ip netns exec "$A" bash -c "set -e
          sshfs -p $SSH_PORT -o 'IdentityFile=$WORK/user,StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null' \
            -o 'Ciphers=aes128-gcm@openssh.com' 'root@$ADDR:$MOD' '$MWAN'
          $drop; $timed
          fusermount3 -u '$MWAN'
          python3 -c \"print(\$t1 - \$t0)\"") ;;
        tern-copy) secs=$(ip netns exec "$A" bash -c "set -e
          $drop; t0=\$EPOCHREALTIME
          '$TERN' copy -q --fingerprint '$FP' --token-file '$TOKEN' 'tern://$ADDR:$TERN_PORT/data/wan.bin' '$RAM/out/wan.bin'
          t1=\$EPOCHREALTIME; rm -f '$RAM/out/wan.bin'
          python3 -c \"print(\$t1 - \$t0)\"") ;;
      esac
      printf 'read-wan\t%s\t%s\t%s\n' "$tool" "$r" "$secs" >>"$RESULTS"
      echo "round $r read-wan $tool: $secs s" >&2
    done
  done
  stop_daemons
  stop_link
fi
write_report "$OUT_MD" bench/mount.sh python3 "$ROOT/bench/report_mount.py" "$RESULTS" "$BIG_MB" "$RSS" \
  "$WAN_MB" "$WAN_RATE"
echo "wrote $OUT_MD" >&2
