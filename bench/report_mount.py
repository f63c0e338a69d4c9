#!/usr/bin/env python3
"""Turns bench/mount.sh's raw figures into docs/benchmarks/mount.md.

Usage: report_mount.py RESULTS.tsv BIG_MB PEAK_RSS_KIB [WAN_MB WAN_RATE]
RESULTS.tsv rows: case, tool, round, seconds.
"""
import statistics
import sys
from collections import defaultdict
from datetime import datetime, timezone

results, big_mb, rss_kib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
wan_mb = int(sys.argv[4]) if len(sys.argv) > 4 else 0
wan_rate = sys.argv[5] if len(sys.argv) > 5 else ""
times = defaultdict(list)
for line in open(results):
    case, tool, _round, secs = line.rstrip("\n").split("\t")
    times[(case, tool)].append(float(secs))

MB = 1e6
# Bytes each case moves, for a rate; None: not a transfer.
moved = {"read-cold": big_mb << 20, "read-warm": big_mb << 20, "write": 1 << 30, "read-wan": wan_mb << 20}
# (case, tool compared with, the goal for tern-mount's time / theirs, how the issue puts it)
goals = {
    ("read-cold", "tern-copy"): (1 / 0.7, "≥ 0.7× the speed of a `tern copy` pull"),
    ("read-cold", "sshfs"): (1 / 3, "≥ 3× sshfs"),
    ("ls-cold", "sshfs"): (0.5, "≤ 0.5× sshfs's time"),
    ("tar", "tern-copy"): (2, "≥ 0.5× the speed of a `tern copy` push"),
    ("tar-wb", "tern-copy"): (2, "with `--write-back`: ≥ 0.5× the speed of a `tern copy` push"),
    ("read-wan", "tern-copy"): (1 / 0.7, "across the long path: ≥ 0.7× the speed of a `tern copy` pull"),
}
describe = {
    "read-cold": f"dd bs=1M of a {big_mb} MiB file, caches dropped, fresh mount",
    "read-warm": "the same read again at once",
    "ls-cold": "`ls -lR` of 20,000 files in 200 directories, fresh mount",
    "ls-warm": "the same again at once",
    "tar": "extract a tar of 8,000 files of 1-16 KiB into the mount",
    "write": "dd bs=1M conv=fsync of a 1 GiB file into the mount",
    "tar-wb": "the same tar into a `--write-back` mount, until `sync DIR` returns",
    "read-wan": f"dd bs=1M of a {wan_mb} MiB file across tern-wan at {wan_rate}, 50 ms RTT, caches dropped, fresh mount",
}


def med(case, tool):
    v = times.get((case, tool))
    return statistics.median(v) if v else None


print("# Mount benchmark")
print()
print(
    f"`bench/mount.sh`, {datetime.now(timezone.utc):%Y-%m-%d}: a tern daemon and `tern mount` on "
    "127.0.0.1 beside sshfs to a local sshd (`Ciphers=aes128-gcm@openssh.com`) and `tern copy`, "
    "the served data on tmpfs, tools alternating in a seeded order each round. Medians of "
    f"{max(len(v) for v in times.values())} rounds; ratios are tern mount's time over the other's."
)
print()
print("| case | tern mount | sshfs | tern copy | tern mount / sshfs | tern mount / tern copy |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
# The --write-back mount, where it ran: its own row.
rows = ["read-cold", "read-warm", "ls-cold", "ls-warm", "tar", "write"]
for case in rows + (["tar-wb"] if times.get(("tar", "tern-wb")) else []) + (["read-wan"] if times.get(("read-wan", "tern-mount")) else []):
    cells = []
    for tool in ["tern-mount", "sshfs", "tern-copy"]:
        t = med("tar", "tern-wb") if case == "tar-wb" and tool == "tern-mount" else med(case.replace("-wb", ""), tool)
        if t is None:
            cells.append("–")
        elif case in moved:
            cells.append(f"{t:.2f} s ({moved[case] / t / MB:,.0f} MB/s)")
        else:
            cells.append(f"{t:.2f} s")
    ratios = []
    for other in ["sshfs", "tern-copy"]:
        mine = med("tar", "tern-wb") if case == "tar-wb" else med(case, "tern-mount")
        a, b = mine, med(case.replace("-wb", ""), other)
        ratios.append(f"{a / b:.2f}" if a and b else "–")
    print(f"| {case}: {describe[case]} | " + " | ".join(cells + ratios) + " |")
print()
print("| goal (issue 19) | measured | met |")
print("| --- | ---: | --- |")
for (case, other), (limit, words) in goals.items():
    a = med("tar", "tern-wb") if case == "tar-wb" else med(case, "tern-mount")
    b = med(case.replace("-wb", ""), other)
    if a and b:
        print(f"| {case}: {words} | {a / b:.2f} (≤ {limit:.2f}) | {'yes' if a / b <= limit else 'no'} |")
warm = med("read-warm", "tern-mount")
if warm:
    rate = moved["read-warm"] / warm / 1e9
    print(f"| read-warm ≥ 4 GB/s | {rate:.2f} GB/s | {'yes' if rate >= 4 else 'no'} |")
print(f"| peak RSS of the last `tern mount` ≤ cache budget + 64 MiB | {rss_kib / 1024:.0f} MiB | – |")
